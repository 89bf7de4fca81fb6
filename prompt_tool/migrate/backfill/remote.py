"""A running backfill under an operator's hand from another process: `orch-migrate backfill
pause|resume|cancel [--run ID]`.

A request is written into the run's own ledger row, ``migration_runs.params["control"]``
(``{"request": "pause"|"resume"|"cancel", "by": "user@host", "at": "<iso8601 UTC>"}``; absent:
run), read-modify-write under ``SELECT ... FOR UPDATE`` of that row in one short transaction,
every other key of ``params`` kept. Every process of the run (the planning process and each
worker) reads it before every batch with :func:`read_request`, one primary-key read, and so
notices within one batch. A cancel stands once asked: a later pause or resume does not undo it.
"""

from __future__ import annotations

import enum
import getpass
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row, select, update

from prompt_tool.db.engine import Connectable, begin
from prompt_tool.db.models import MigrationRun
from prompt_tool.db.revision_guard import require_known_revision
from prompt_tool.db.revisions import EXPAND
from prompt_tool.errors import InvalidInputError, NotFoundError
from prompt_tool.migrate.runs import MigrationRunStatus, RunKind, RunState, dead_runs, life_of

__all__ = [
    "CONTROL_KEY",
    "ControlAction",
    "ControlOutcome",
    "ControlRequest",
    "read_request",
    "request",
]

CONTROL_KEY = "control"  # the key of migration_runs.params a request is written under

_COLUMNS = (
    MigrationRun.id,
    MigrationRun.kind,
    MigrationRun.status,
    MigrationRun.params,
    MigrationRun.summary,
    MigrationRun.error,
    MigrationRun.finished_at,
)
# How a run that is no longer running ended, as "run 12 ... at <time>".
_ENDED = {
    MigrationRunStatus.COMPLETED.value: "completed",
    MigrationRunStatus.FAILED.value: "failed",
    MigrationRunStatus.INTERRUPTED.value: "was interrupted",
    MigrationRunStatus.CANCELLED.value: "was cancelled",
    MigrationRunStatus.ABANDONED.value: "was abandoned (its process died)",
}
# Ended runs a plain `orch-migrate backfill` of the same scope carries on from.
_RESUMABLE = {
    MigrationRunStatus.INTERRUPTED.value,
    MigrationRunStatus.CANCELLED.value,
    MigrationRunStatus.ABANDONED.value,
}


class ControlAction(enum.StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """The request standing for a run: what, by whom (``user@host``), when (ISO 8601, UTC)."""

    action: ControlAction
    by: str
    at: str

    @classmethod
    def now(cls, action: ControlAction) -> ControlRequest:
        """``action`` asked by this user on this host, now."""
        return cls(
            action,
            f"{getpass.getuser()}@{socket.gethostname()}"[:100],
            datetime.now(UTC).isoformat(timespec="seconds"),
        )

    @classmethod
    def from_params(cls, params: Any) -> ControlRequest | None:
        """The request in a run's ``params`` (None: none, or not one this code knows)."""
        stored = params.get(CONTROL_KEY) if isinstance(params, dict) else None
        if not isinstance(stored, dict):
            return None
        try:
            action = ControlAction(str(stored.get("request")))
        except ValueError:
            return None
        return cls(action, str(stored.get("by") or "?"), str(stored.get("at") or "?"))

    def as_json(self) -> dict[str, str]:
        return {"request": self.action.value, "by": self.by, "at": self.at}

    def asked(self) -> str:
        return f"asked by {self.by} at {self.at}"


def read_request(connection: Connection, run_id: int) -> ControlRequest | None:
    """The control request standing for ``run_id`` (None: carry on): one primary-key read,
    made before every batch by every process of the run."""
    params = connection.execute(
        select(MigrationRun.params).where(MigrationRun.id == run_id)
    ).scalar_one_or_none()
    return ControlRequest.from_params(params)


def _scope_of(params: Any) -> str:
    """A run's scope as the ledger names it: project slugs joined by commas, ``*`` for all."""
    scope = params.get("scope") if isinstance(params, dict) else None
    return str(scope) if scope else "*"


def _short_scope(scope: str) -> str:
    return "all projects" if scope == "*" else scope


def _named_scope(scope: str) -> str:
    return "all projects" if scope == "*" else f"scope {scope}"


@dataclass(frozen=True, slots=True)
class ControlOutcome:
    """What a pause, resume or cancel request did to which run."""

    run_id: int
    action: ControlAction
    scope: str  # the run's scope: project slugs joined by commas, "*" for every project
    # What the run was doing: its own last word (summary["live"]["state"]) where it said one,
    # else what the standing request made it ("paused", "cancelling" or "working").
    state: str
    before: ControlRequest | None  # the request standing before this one
    recorded: bool  # False: nothing to change (already so, or a cancel already stands)

    def describe(self) -> str:
        """One line for the operator: what happens now, and what to type next."""
        run = f"backfill run {self.run_id} ({_named_scope(self.scope)})"
        standing = self.before
        carry_on = "what it committed stands and `orch-migrate backfill` carries on from there"
        resume = "`orch-migrate backfill resume` carries on"
        if standing is not None and standing.action is ControlAction.CANCEL:
            return (
                f"{run} is already being cancelled ({standing.asked()}): it stops before its "
                f"next batch; {carry_on}"
            )
        if self.action is ControlAction.PAUSE:
            if standing is not None and not self.recorded:
                return f"{run} is already paused ({standing.asked()}); {resume}"
            return f"{run} will pause before its next batch; {resume}"
        if self.action is ControlAction.RESUME:
            if not self.recorded:
                return f"{run} is not paused (it is {self.state}); nothing to resume"
            return f"{run} resumes with its next batch"
        if standing is not None and standing.action is ControlAction.PAUSE:
            return f"{run} is paused: it wakes and stops, cancelled; {carry_on}"
        return f"{run} will stop before its next batch, cancelled; {carry_on}"


def _live_backfills(connection: Connection) -> list[Row[Any]]:
    """The backfill runs marked running whose process is there."""
    running = connection.execute(
        select(*_COLUMNS)
        .where(
            MigrationRun.kind == RunKind.BACKFILL.value,
            MigrationRun.status == MigrationRunStatus.RUNNING.value,
        )
        .order_by(MigrationRun.id)
    ).all()
    dead = dead_runs(connection, running) if running else {}
    return [run for run in running if run.id not in dead]


def _the_live_run(connection: Connection) -> int:
    """The one live backfill run (no --run given), or a one-line error saying why not."""
    live = _live_backfills(connection)
    if not live:
        raise NotFoundError("no backfill is running; `orch-migrate status` lists the runs")
    if len(live) > 1:
        named = ", ".join(f"{run.id}: {_short_scope(_scope_of(run.params))}" for run in live)
        raise InvalidInputError(f"{len(live)} backfill runs are live ({named}): pass --run ID")
    return int(live[0].id)


def _ended_at(finished_at: datetime | None) -> str:
    return "?" if finished_at is None else finished_at.isoformat(sep=" ", timespec="seconds")


def _require_live_backfill(
    connection: Connection, run: Row[Any] | None, run_id: int, action: ControlAction
) -> Row[Any]:
    """``run`` (the locked row of ``run_id``), or a one-line error unless it is a live
    backfill."""
    if run is None:
        raise NotFoundError(f"no run {run_id}; `orch-migrate status` lists the runs")
    if run.kind != RunKind.BACKFILL.value:
        raise InvalidInputError(
            f"run {run_id} is a {run.kind} run, not a backfill; nothing to {action}"
        )
    if run.status != MigrationRunStatus.RUNNING.value:
        ended = _ENDED.get(run.status, f"ended ({run.status})")
        hint = "; `orch-migrate backfill` carries on from it" if run.status in _RESUMABLE else ""
        raise InvalidInputError(
            f"run {run_id} {ended} at {_ended_at(run.finished_at)}; nothing to {action}{hint}"
        )
    life = life_of(run, dead_runs(connection, [run]))
    if life.state is not RunState.LIVE:
        raise InvalidInputError(f"run {run_id} is not live: {life.reason}")
    return run


def _state_of(run: Row[Any], before: ControlRequest | None) -> str:
    live = run.summary.get("live") if isinstance(run.summary, dict) else None
    if isinstance(live, dict) and live.get("state"):
        return str(live["state"])
    if before is None:
        return "working"
    return {ControlAction.PAUSE: "paused", ControlAction.CANCEL: "cancelling"}.get(
        before.action, "working"
    )


def _changes(action: ControlAction, before: ControlRequest | None) -> bool:
    """Whether asking ``action`` over the standing request changes anything."""
    standing = before.action if before is not None else None
    if standing is ControlAction.CANCEL:
        return False  # a cancel stands: neither pause nor resume undoes it
    if action is ControlAction.RESUME:
        return standing is ControlAction.PAUSE
    return standing is not action


def request(
    engine: Connectable, action: ControlAction, run_id: int | None = None
) -> ControlOutcome:
    """Ask backfill run ``run_id`` (None: the one live backfill run) to pause, resume or
    cancel, in one short transaction holding its ledger row (``FOR UPDATE``).

    A run that is not a live backfill is refused in one line saying what it is; resuming a run
    that is not paused, or pausing a paused one, changes nothing and says so.
    """
    require_known_revision(engine, f"{action.value} a backfill", needs=EXPAND)
    with begin(engine) as connection:
        chosen = _the_live_run(connection) if run_id is None else run_id
        # Write first, then read: SQLite (which ignores FOR UPDATE) takes its write lock here,
        # before the read, so no other writer's change to params can fall between the two.
        connection.execute(
            update(MigrationRun).where(MigrationRun.id == chosen).values(params=MigrationRun.params)
        )
        run = _require_live_backfill(
            connection,
            connection.execute(
                select(*_COLUMNS).where(MigrationRun.id == chosen).with_for_update()
            ).one_or_none(),
            chosen,
            action,
        )
        before = ControlRequest.from_params(run.params)
        recorded = _changes(action, before)
        if recorded:
            params = dict(run.params) if isinstance(run.params, dict) else {}
            params[CONTROL_KEY] = ControlRequest.now(action).as_json()
            connection.execute(
                update(MigrationRun).where(MigrationRun.id == chosen).values(params=params)
            )
        return ControlOutcome(
            chosen, action, _scope_of(run.params), _state_of(run, before), before, recorded
        )
