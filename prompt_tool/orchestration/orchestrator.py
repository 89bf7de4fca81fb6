"""The integrated orchestrator: runs orchestration sessions stored in the database.

A run reads the session's prompts through the read shim only (so the project's flag decides
whether they come from the legacy columns or from rendered templates), runs them through the
shared step loop (:mod:`prompt_tool.orchestration.steps`) and records every step in
``orchestration_steps`` while moving the session ``pending -> running -> completed | failed``.

Runs and re-runs:

- a ``pending`` session runs;
- a session that already ran (``completed``, ``failed``, or any other status a legacy row may
  carry) is refused unless ``rerun=True``, which deletes its recorded steps and runs it afresh:
  the table holds the latest run only, so what ``show`` prints is always one coherent run;
- a ``running`` session is always refused: another run is under way. Starting is a
  compare-and-set on the status, so two concurrent starts cannot both win.

No database transaction is held during a model call: each step is written when it starts and
again when it ends, in short transactions of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, overload

from sqlalchemy import Engine, delete, func, insert, select, update
from sqlalchemy.engine import Connection

from prompt_tool.compat import (
    CreatedSession,
    SessionPrompts,
    SessionReader,
    TemplateChoice,
    create_session,
)
from prompt_tool.db.engine import make_engine, make_session_factory, session_scope
from prompt_tool.db.models import (
    OrchestrationSession,
    OrchestrationStep,
    Project,
    PromptRole,
)
from prompt_tool.db.projects import get_project
from prompt_tool.errors import InvalidInputError, NotFoundError
from prompt_tool.orchestration.clients import ModelClient, resolve_client
from prompt_tool.orchestration.errors import SessionStateError
from prompt_tool.orchestration.steps import Clock, PlannedStep, run_steps, utc_now
from prompt_tool.orchestration.types import (
    PromptInfo,
    RunResult,
    RunStatus,
    SessionDetail,
    SessionStatus,
    SessionSummary,
    StepRecord,
    StepStatus,
)
from prompt_tool.settings import Settings
from prompt_tool.templates import TemplateManager

__all__ = ["DEFAULT_LIST_LIMIT", "Orchestrator"]

logger = logging.getLogger("prompt_tool.orchestration")

DEFAULT_LIST_LIMIT = 50
_ROLES = tuple(PromptRole)


@overload
def _aware(value: datetime) -> datetime: ...
@overload
def _aware(value: None) -> None: ...
def _aware(value: datetime | None) -> datetime | None:
    # SQLite keeps no offset; everything this package writes, and CURRENT_TIMESTAMP, is UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class _Claimed:
    name: str
    variables: dict[str, Any]


class _SessionSteps:
    """Writes each step of one session's run as it happens (see :class:`StepRecorder`)."""

    def __init__(self, engine: Engine, session_id: int) -> None:
        self._engine = engine
        self._session_id = session_id
        self._started: set[int] = set()

    def _values(self, step: StepRecord) -> dict[str, Any]:
        return {
            "role": step.role,
            "status": step.status.value,
            "input_text": step.input_text,
            "output_text": step.output_text,
            "model": step.model,
            "error": step.error,
            "started_at": step.started_at,
            "finished_at": step.finished_at,
        }

    def step_started(self, step: StepRecord) -> None:
        with self._engine.begin() as connection:
            connection.execute(
                insert(OrchestrationStep).values(
                    session_id=self._session_id, position=step.position, **self._values(step)
                )
            )
        self._started.add(step.position)

    def step_finished(self, step: StepRecord) -> None:
        with self._engine.begin() as connection:
            if step.position in self._started:
                connection.execute(
                    update(OrchestrationStep)
                    .where(
                        OrchestrationStep.session_id == self._session_id,
                        OrchestrationStep.position == step.position,
                    )
                    .values(**self._values(step))
                )
            else:
                connection.execute(
                    insert(OrchestrationStep).values(
                        session_id=self._session_id, position=step.position, **self._values(step)
                    )
                )


class Orchestrator:
    """Create, list, show and run orchestration sessions.

    Hold one for a while (it shares the template manager's caches and the flag service); close
    it, or use it as a context manager, to stop the flag service it started.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        reader: SessionReader | None = None,
        manager: TemplateManager | None = None,
        settings: Settings | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.engine = engine
        if manager is None:
            manager = (
                reader.manager if reader is not None else TemplateManager(engine, settings=settings)
            )
        self.manager = manager
        self._owns_reader = reader is None
        self.reader = reader if reader is not None else SessionReader(engine, manager=manager)
        self._clock = clock
        self._owned_engine: Engine | None = None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Orchestrator:
        orchestrator = cls(make_engine(url), **kwargs)
        orchestrator._owned_engine = orchestrator.engine
        return orchestrator

    def close(self) -> None:
        if self._owns_reader:
            self.reader.flags.close()
        if self._owned_engine is not None:
            self._owned_engine.dispose()

    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- create, list, show --------------------------------------------------------------

    def create_session(
        self,
        project: str,
        templates: Mapping[str, str | TemplateChoice | None]
        | Mapping[PromptRole, str | TemplateChoice | None],
        variables: Mapping[str, Any] | None = None,
        *,
        name: str,
        user: str | None = None,
        unit_key: str | None = None,
    ) -> CreatedSession:
        """A new ``pending`` session through templates: references and legacy text both written.

        A role mapped to ``None`` (or left out) gets no prompt: a NULL legacy column. Unless the
        project's flag is ``legacy``, the session joins the running A/B test of each template it
        uses, its variant chosen by ``unit_key`` (else the session id).
        """
        chosen: dict[str | PromptRole, str | TemplateChoice] = {
            role: choice for role, choice in templates.items() if choice is not None
        }
        if not chosen:
            raise InvalidInputError(
                "give at least one template: --system, --planner or --synthesis"
            )
        if not name.strip():
            raise InvalidInputError("a session needs a name (--name)")
        return create_session(
            self.manager,
            project,
            chosen,
            variables,
            name=name,
            user=user,
            flags=self.reader.flags,
            unit_key=unit_key,
        )

    def list_sessions(
        self, project: str | None = None, *, limit: int = DEFAULT_LIST_LIMIT
    ) -> list[SessionSummary]:
        """Sessions, newest first, with how many steps their last run recorded."""
        if limit < 1:
            raise InvalidInputError(f"--limit must be at least 1, not {limit}")
        steps = (
            select(OrchestrationStep.session_id, func.count().label("steps"))
            .group_by(OrchestrationStep.session_id)
            .subquery()
        )
        query = (
            select(
                OrchestrationSession.id,
                OrchestrationSession.name,
                Project.slug,
                OrchestrationSession.status,
                func.coalesce(steps.c.steps, 0),
                OrchestrationSession.created_at,
                OrchestrationSession.updated_at,
            )
            .join(Project, Project.id == OrchestrationSession.project_id)
            .outerjoin(steps, steps.c.session_id == OrchestrationSession.id)
            .order_by(OrchestrationSession.id.desc())
            .limit(limit)
        )
        with session_scope(make_session_factory(self.engine)) as session:
            if project is not None:
                query = query.where(
                    OrchestrationSession.project_id == get_project(session, project).id
                )
            rows = session.execute(query).all()
        return [
            SessionSummary(
                session_id=session_id,
                name=name,
                project=slug,
                status=status,
                steps=int(count),
                created_at=_aware(created),
                updated_at=_aware(updated),
            )
            for session_id, name, slug, status, count, created, updated in rows
        ]

    def show(self, session_id: int) -> SessionDetail:
        """A session's prompts as the shim serves them (with their sources) and its steps."""
        with self.engine.connect() as connection:
            prompts = self.reader.read(session_id, connection=connection)
            row = connection.execute(
                select(
                    OrchestrationSession.name,
                    OrchestrationSession.status,
                    OrchestrationSession.variables,
                    OrchestrationSession.created_at,
                    OrchestrationSession.updated_at,
                ).where(OrchestrationSession.id == session_id)
            ).one_or_none()
            if row is None:
                raise NotFoundError(f"no orchestration session with id {session_id}")
            steps = self._recorded_steps(connection, session_id)
        infos = self._prompt_infos(prompts)
        name, status, variables, created, updated = row
        return SessionDetail(
            session_id=session_id,
            name=name,
            project=prompts.project,
            status=status,
            variant=prompts.variant,
            variables=dict(variables or {}),
            prompts=infos,
            steps=steps,
            created_at=_aware(created),
            updated_at=_aware(updated),
        )

    @staticmethod
    def _recorded_steps(connection: Connection, session_id: int) -> tuple[StepRecord, ...]:
        rows = connection.execute(
            select(
                OrchestrationStep.position,
                OrchestrationStep.role,
                OrchestrationStep.status,
                OrchestrationStep.input_text,
                OrchestrationStep.output_text,
                OrchestrationStep.model,
                OrchestrationStep.error,
                OrchestrationStep.started_at,
                OrchestrationStep.finished_at,
            )
            .where(OrchestrationStep.session_id == session_id)
            .order_by(OrchestrationStep.position)
        )
        return tuple(
            StepRecord(
                position=int(position),
                role=role,
                status=StepStatus(status),
                input_text=input_text,
                output_text=output_text,
                model=model,
                error=error,
                started_at=_aware(started),
                finished_at=_aware(finished),
            )
            for (
                position,
                role,
                status,
                input_text,
                output_text,
                model,
                error,
                started,
                finished,
            ) in rows
        )

    @staticmethod
    def _prompt_infos(prompts: SessionPrompts) -> tuple[PromptInfo, ...]:
        """The shim's answer per role, with the referenced template's name where there is one
        (the shim read it with the version)."""
        by_role = prompts.by_role()
        infos = []
        for role in _ROLES:
            prompt = by_role[role]
            infos.append(
                PromptInfo(
                    role=role.value,
                    text=prompt.text,
                    source=prompt.source.value,
                    template=prompt.template,
                    version=prompt.version,
                    version_id=prompt.version_id,
                )
            )
        return tuple(infos)

    # --- run -----------------------------------------------------------------------------

    def run(
        self,
        session_id: int,
        client: ModelClient | str | None = None,
        *,
        rerun: bool = False,
    ) -> RunResult:
        """Run a session's steps through ``client`` (a client, a name, an import path; default
        ``echo``) and record them. A failed step is recorded and returned, not raised: call
        :meth:`RunResult.raise_for_status` to turn it into an error."""
        model_client, client_name = resolve_client(client)
        claimed = self._claim(session_id, rerun=rerun)
        try:
            # Read once the run owns the session: a refused run costs no read (and no shadow
            # comparison), and the prompts are those of the moment it ran.
            prompts = self.reader.read(session_id)
            infos = self._prompt_infos(prompts)
            by_role = prompts.by_role()
            plan = [PlannedStep(role, by_role[role].text) for role in _ROLES]
            status, steps = run_steps(
                plan,
                model_client,
                variables=claimed.variables,
                recorder=_SessionSteps(self.engine, session_id),
                clock=self._clock,
            )
        except BaseException as error:
            self._abandon(session_id, error)
            raise
        self._set_status(
            session_id,
            SessionStatus.COMPLETED if status is RunStatus.COMPLETED else SessionStatus.FAILED,
        )
        return RunResult(
            name=claimed.name,
            status=status,
            client=client_name,
            prompts=infos,
            steps=steps,
            project=prompts.project,
            session_id=session_id,
        )

    def _claim(self, session_id: int, *, rerun: bool) -> _Claimed:
        """``running`` now, its earlier steps gone; one transaction, or nothing changes."""
        with self.engine.begin() as connection:
            row = connection.execute(
                select(
                    OrchestrationSession.status,
                    OrchestrationSession.name,
                    OrchestrationSession.variables,
                ).where(OrchestrationSession.id == session_id)
            ).one_or_none()
            if row is None:
                raise NotFoundError(f"no orchestration session with id {session_id}")
            status, name, variables = row
            if status == SessionStatus.RUNNING:
                raise SessionStateError(
                    f"session {session_id} is running; wait for that run to end before "
                    "starting another"
                )
            if status != SessionStatus.PENDING and not rerun:
                raise SessionStateError(
                    f"session {session_id} already ran (status {status}); pass --rerun to run "
                    "it again, which replaces its recorded steps"
                )
            # Compare-and-set: of two concurrent starts, only one sees its status unchanged.
            changed = connection.execute(
                update(OrchestrationSession)
                .where(OrchestrationSession.id == session_id, OrchestrationSession.status == status)
                .values(status=SessionStatus.RUNNING.value, updated_at=self._clock())
            ).rowcount
            if changed != 1:
                raise SessionStateError(
                    f"session {session_id} changed while the run was starting (another run?); "
                    "look at it with `prompt-tool sessions show` and try again"
                )
            connection.execute(
                delete(OrchestrationStep).where(OrchestrationStep.session_id == session_id)
            )
        return _Claimed(name, dict(variables or {}))

    def _set_status(self, session_id: int, status: SessionStatus) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                update(OrchestrationSession)
                .where(OrchestrationSession.id == session_id)
                .values(status=status.value, updated_at=self._clock())
            )

    def _abandon(self, session_id: int, error: BaseException) -> None:
        """A run cut short by an interrupt or a database error: mark it failed if we still can."""
        reason = f"run interrupted: {type(error).__name__}: {error}".rstrip(": ")
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    update(OrchestrationStep)
                    .where(
                        OrchestrationStep.session_id == session_id,
                        OrchestrationStep.status == StepStatus.RUNNING.value,
                    )
                    .values(status=StepStatus.FAILED.value, error=reason, finished_at=self._clock())
                )
                connection.execute(
                    update(OrchestrationSession)
                    .where(OrchestrationSession.id == session_id)
                    .values(status=SessionStatus.FAILED.value, updated_at=self._clock())
                )
        except Exception:
            # The original error is what the caller must see; this one only goes to the log.
            logger.exception("could not mark session %s failed after %s", session_id, reason)
