"""The read shim: every reader of session prompts goes through here.

The project's flag decides: ``legacy`` returns the legacy TEXT columns; ``templates`` renders the
referenced template versions with their stored variables (a role not yet backfilled, or whose
legacy text changed after it was backfilled, falls back to the legacy text); ``shadow`` returns
the legacy text and compares the template path beside it. A batch of sessions costs a constant
number of SQL statements, and each distinct (version, variables) pair is rendered once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from sqlalchemy import Connection, select

from prompt_tool.compat.shadow import (
    LogPublisher,
    ShadowCounters,
    ShadowEvent,
    ShadowPublisher,
    is_sampled,
    short_diff,
    text_hash,
)
from prompt_tool.compat.types import (
    PromptSource,
    RolePrompt,
    SessionPrompts,
    new_role_prompt,
    new_session_prompts,
)
from prompt_tool.core.errors import TemplateError
from prompt_tool.db.dialect import one_of
from prompt_tool.db.engine import Connectable, connect
from prompt_tool.db.models import (
    OrchestrationSession,
    Project,
    PromptRole,
    SessionPromptRef,
)
from prompt_tool.errors import NotFoundError
from prompt_tool.flags import FlagService, Variant
from prompt_tool.templates import ResolvedTemplate, TemplateManager, load_versions

__all__ = ["SessionReader"]

logger = logging.getLogger("prompt_tool.compat")

# (role, its value): the references are keyed by the stored value, and an enum's ``.value``
# is a property lookup, paid per role per session otherwise.
# In the order of SessionPrompts' fields (system, planner, synthesis).
_ROLE_KEYS = tuple((role, role.value) for role in PromptRole)
# Versions are immutable; what a cached one may go stale on is its template's name, scope and
# declared variables, so entries live as long as resolved names do (settings.name_cache_ttl_s).
_VERSION_CACHE_SIZE = 20_000


# Named tuples, not frozen dataclasses: a batch builds thousands of each, and a frozen
# dataclass's __init__ (object.__setattr__ per field) costs several times a tuple's.
class _Reference(NamedTuple):
    template: ResolvedTemplate
    variables: dict[str, Any]
    legacy_hash: str | None


class _LegacyRow(NamedTuple):
    session_id: int
    project_id: int
    project: str
    texts: dict[PromptRole, str | None]


class _Rendered:
    """Render each distinct (project, version, variables) once per batch.

    The project is part of the key: an ``include`` resolves through the project's hierarchy, so
    one global version can render differently in two projects.
    """

    def __init__(self, manager: TemplateManager) -> None:
        self._manager = manager
        self._done: dict[tuple[str, int, str], str | TemplateError] = {}

    def __call__(self, project: str, reference: _Reference) -> str | TemplateError:
        template = reference.template
        if not template.declared_variables and "{" not in template.source:
            # Not one brace, no declared variable: the text is its own rendering whatever
            # the variables (the engine hands it back unchanged too). Most imported texts.
            return template.source
        key = (
            project,
            reference.template.version_id,
            json.dumps(reference.variables, sort_keys=True, default=str)
            if reference.variables
            else "",
        )
        if key not in self._done:
            try:
                self._done[key] = self._manager.render_resolved(
                    reference.template, reference.variables, project=project
                )
            except TemplateError as error:
                self._done[key] = error
        return self._done[key]


class SessionReader:
    """Reads session prompts the way the project's flag says; never breaks because of it."""

    def __init__(
        self,
        engine: Connectable,
        *,
        flags: FlagService | None = None,
        manager: TemplateManager | None = None,
        publisher: ShadowPublisher | None = None,
    ) -> None:
        self.engine = engine
        self.manager = manager if manager is not None else TemplateManager(engine)
        if flags is None:
            # Flags are read on their own connections, outside any caller's transaction.
            flag_engine = engine.engine if isinstance(engine, Connection) else engine
            flags = FlagService(flag_engine, self.manager.settings)
        self.flags = flags
        self.publisher: ShadowPublisher = publisher if publisher is not None else LogPublisher()
        self.shadow_counts = ShadowCounters()
        self._versions: OrderedDict[int, tuple[float, ResolvedTemplate]] = OrderedDict()
        self._versions_lock = threading.Lock()
        self._version_ttl_s = self.manager.settings.name_cache_ttl_s

    # --- queries -----------------------------------------------------------------------

    def _legacy_rows(self, connection: Connection, session_ids: list[int]) -> list[_LegacyRow]:
        query = (
            select(
                OrchestrationSession.id,
                OrchestrationSession.project_id,
                Project.slug,
                OrchestrationSession.system_prompt,
                OrchestrationSession.planner_prompt,
                OrchestrationSession.synthesis_prompt,
            )
            .join(Project, Project.id == OrchestrationSession.project_id)
            .where(one_of(connection, OrchestrationSession.id, session_ids))
        )
        return [
            _LegacyRow(
                session_id,
                project_id,
                slug,
                {
                    PromptRole.SYSTEM: system,
                    PromptRole.PLANNER: planner,
                    PromptRole.SYNTHESIS: synthesis,
                },
            )
            # .all(): one fetchall, not a fetchone per row as iterating the result does.
            for session_id, project_id, slug, system, planner, synthesis in connection.execute(
                query
            ).all()
        ]

    def _references(
        self, connection: Connection, session_ids: list[int]
    ) -> dict[tuple[int, str], _Reference]:
        """The sessions' references: one narrow query on the references table, then the
        versions it names that are not cached yet (a version never changes)."""
        if not session_ids:
            return {}
        query = select(
            SessionPromptRef.session_id,
            SessionPromptRef.role,
            SessionPromptRef.variables,
            SessionPromptRef.legacy_hash,
            SessionPromptRef.prompt_version_id,
        ).where(one_of(connection, SessionPromptRef.session_id, session_ids))
        rows = connection.execute(query).all()
        templates = self._templates(connection, {row[4] for row in rows})
        return {
            (session_id, role): _Reference(templates[version_id], variables or {}, legacy_hash)
            for session_id, role, variables, legacy_hash, version_id in rows
        }

    def _templates(
        self, connection: Connection, version_ids: set[int]
    ) -> dict[int, ResolvedTemplate]:
        now = time.monotonic()
        found: dict[int, ResolvedTemplate] = {}
        with self._versions_lock:
            for version_id in version_ids:
                cached = self._versions.get(version_id)
                if cached is not None and now - cached[0] < self._version_ttl_s:
                    found[version_id] = cached[1]
        missing = version_ids - found.keys()
        if not missing:
            return found
        found.update(load_versions(connection, missing))
        if self._version_ttl_s > 0:
            with self._versions_lock:
                for version_id in missing:
                    self._versions[version_id] = (now, found[version_id])
                    self._versions.move_to_end(version_id)
                while len(self._versions) > _VERSION_CACHE_SIZE:
                    self._versions.popitem(last=False)
        return found

    # --- reading -----------------------------------------------------------------------

    def read(self, session_id: int) -> SessionPrompts:
        """One session's prompts (see :meth:`read_many`)."""
        found = self.read_many([session_id])
        if session_id not in found:
            raise NotFoundError(f"no orchestration session with id {session_id}")
        return found[session_id]

    def read_many(self, session_ids: Iterable[int]) -> dict[int, SessionPrompts]:
        """The prompts of many sessions, by id, in a constant number of SQL statements."""
        wanted = list(dict.fromkeys(session_ids))
        # One connection for both queries, as a legacy reader uses for its one: a second
        # checkout costs a pool round trip (and a reset on return) per batch.
        with connect(self.engine) as connection:
            rows = self._legacy_rows(connection, wanted)
            decisions = self.flags.variants_for({(row.project, row.project_id) for row in rows})
            needs_templates = [
                row.session_id
                for row in rows
                if decisions[row.project].variant is not Variant.LEGACY
            ]
            references = self._references(connection, needs_templates)
        render = _Rendered(self.manager)
        result: dict[int, SessionPrompts] = {}
        TEMPLATE = PromptSource.TEMPLATE  # noqa: N806 - a local alias for the hot loop
        role_prompt = self._role
        for row in rows:
            decision = decisions[row.project]
            variant = decision.variant
            sample_rate = decision.sample_rate
            if variant is Variant.TEMPLATES:
                # The common case inline, one call per role fewer: a reference whose
                # rendering is the legacy text. Anything else takes the full path.
                system, planner, synthesis = [
                    new_role_prompt(role, rendered, TEMPLATE, reference.template.version_id)
                    if (reference := references.get((row.session_id, key))) is not None
                    and (rendered := render(row.project, reference)) == row.texts[role]
                    else role_prompt(row, role, key, variant, sample_rate, references, render)
                    for role, key in _ROLE_KEYS
                ]
            else:
                system, planner, synthesis = [
                    role_prompt(row, role, key, variant, sample_rate, references, render)
                    for role, key in _ROLE_KEYS
                ]
            result[row.session_id] = new_session_prompts(
                row.session_id, row.project, variant.value, system, planner, synthesis
            )
        return result

    def _role(
        self,
        row: _LegacyRow,
        role: PromptRole,
        key: str,
        variant: Variant,
        sample_rate: float,
        references: Mapping[tuple[int, str], _Reference],
        render: _Rendered,
    ) -> RolePrompt:
        legacy = row.texts[role]
        if variant is Variant.LEGACY:
            return new_role_prompt(role, legacy, PromptSource.LEGACY)
        reference = references.get((row.session_id, key))
        if variant is Variant.SHADOW:
            if reference is not None and is_sampled(row.session_id, sample_rate):
                self._compare(row, role, legacy, reference, render)
            return new_role_prompt(role, legacy, PromptSource.LEGACY)
        if reference is None:
            # NULL stays NULL: a role the session never used has nothing to migrate.
            source = PromptSource.LEGACY if legacy is None else PromptSource.UNMIGRATED
            return new_role_prompt(role, legacy, source)
        version_id = reference.template.version_id
        rendered = render(row.project, reference)
        if rendered == legacy:
            # The templates path gives the legacy text back: whatever the reference was made
            # for, this is the text (and no digest is needed to tell).
            return new_role_prompt(role, rendered, PromptSource.TEMPLATE, version_id)
        if reference.legacy_hash != text_hash(legacy):
            return new_role_prompt(role, legacy, PromptSource.STALE, version_id)
        if isinstance(rendered, TemplateError):
            self._publish(row, role, "render_error", reference, legacy, None, str(rendered))
            return new_role_prompt(role, legacy, PromptSource.RENDER_ERROR, version_id)
        return new_role_prompt(role, rendered, PromptSource.TEMPLATE, version_id)

    def _compare(
        self,
        row: _LegacyRow,
        role: PromptRole,
        legacy: str | None,
        reference: _Reference,
        render: _Rendered,
    ) -> None:
        rendered = render(row.project, reference)
        if isinstance(rendered, TemplateError):
            self.shadow_counts.add(row.project, "render_errors")
            self._publish(row, role, "render_error", reference, legacy, None, str(rendered))
        elif rendered == legacy:
            self.shadow_counts.add(row.project, "matched")
        else:
            self.shadow_counts.add(row.project, "mismatched")
            self._publish(row, role, "mismatch", reference, legacy, rendered, None)

    def _publish(
        self,
        row: _LegacyRow,
        role: PromptRole,
        kind: str,
        reference: _Reference,
        legacy: str | None,
        rendered: str | None,
        error: str | None,
    ) -> None:
        event = ShadowEvent(
            project=row.project,
            session_id=row.session_id,
            role=role.value,
            kind=kind,
            version_id=reference.template.version_id,
            legacy_hash=text_hash(legacy),
            rendered_hash=text_hash(rendered),
            diff=short_diff(legacy, rendered) if rendered is not None else "",
            error=error,
        )
        try:
            self.publisher.publish(event)
        except Exception:
            logger.exception("shadow publisher failed")
