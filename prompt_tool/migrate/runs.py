"""The migration-runs ledger: every export, restore, backfill, verify and rehearse run is
recorded with its parameters, outcome and summary, so `orch-migrate status` can say what was
done last and whether it worked. A command that only reads (verify, export) runs where it may not
write, on a replica or as a read-only user: its run is then not recorded, and it says so
(:func:`start_read_run`)."""

from __future__ import annotations

import enum
import getpass
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import DBAPIError

from prompt_tool.db.dialect import backends_alive, database_user, write_refusal
from prompt_tool.db.engine import Connectable, begin, connect
from prompt_tool.db.models import MigrationRun

__all__ = [
    "MigrationRunStatus",
    "ReadRun",
    "RunKind",
    "RunLife",
    "RunState",
    "dead_runs",
    "finish_run",
    "life_of",
    "outcome_of",
    "reap_dead_runs",
    "start_read_run",
    "start_run",
]


class RunKind(enum.StrEnum):
    EXPORT = "export"
    RESTORE = "restore"
    BACKFILL = "backfill"
    VERIFY = "verify"
    REHEARSE = "rehearse"


class MigrationRunStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    # Stopped by Ctrl-C or SIGTERM: what it committed stands, a rerun carries on from there.
    INTERRUPTED = "interrupted"
    # Stopped between batches by `orch-migrate backfill cancel`: what it committed stands, and
    # the next run of its scope carries on from there.
    CANCELLED = "cancelled"
    # Its process ended without recording an end (SIGKILL, a crash, a lost host): stored by the
    # next run to start (reap_dead_runs); `status` shows such a run as dead before that too.
    ABANDONED = "abandoned"


class RunState(enum.StrEnum):
    """Where a run is, as `status` shows it."""

    LIVE = "live"  # marked running, and its process (or server backend) is there
    FINISHED = "finished"  # completed or failed, and recorded so
    INTERRUPTED = "interrupted"  # stopped by Ctrl-C or SIGTERM: a rerun carries on
    DEAD = "dead"  # its process is gone without a word: killed, crashed, host lost


@dataclass(frozen=True, slots=True)
class RunLife:
    state: RunState
    reason: str


def _who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"[:100]


def outcome_of(error: BaseException) -> MigrationRunStatus:
    """How a run that raised ``error`` ends: Ctrl-C and SIGTERM (raised as KeyboardInterrupt)
    interrupt it, anything else fails it."""
    return (
        MigrationRunStatus.INTERRUPTED
        if isinstance(error, KeyboardInterrupt)
        else MigrationRunStatus.FAILED
    )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def dead_runs(connection: Connection, runs: Iterable[Any]) -> dict[int, str]:
    """Those ``runs`` (ledger rows) marked running whose process is gone: id -> what is gone.

    A run records where it runs (``params``: host, pid, and on PostgreSQL the server backend of
    the connection it holds for its whole length). On PostgreSQL a run is dead when that backend
    is no longer in ``pg_stat_activity`` (whichever host ran it); otherwise, on the same host,
    when its process no longer exists. A run of another host without a backend is assumed alive.
    """
    running = [run for run in runs if run.status == MigrationRunStatus.RUNNING.value]
    backends = {
        int(run.params["backend_pid"])
        for run in running
        if isinstance(run.params, dict) and run.params.get("backend_pid")
    }
    alive_backends = backends_alive(connection, backends) if backends else None
    host = socket.gethostname()
    dead: dict[int, str] = {}
    for run in running:
        params = run.params if isinstance(run.params, dict) else {}
        backend = params.get("backend_pid")
        if backend and alive_backends is not None:
            if int(backend) not in alive_backends:
                dead[run.id] = f"its server backend {backend} is gone"
        elif (
            params.get("host") == host
            and params.get("pid")
            and not _process_alive(int(params["pid"]))
        ):
            dead[run.id] = f"its process {params['pid']} on {host} is gone"
    return dead


def _dead_reason(gone: str) -> str:
    return (
        f"{gone}: killed or crashed without recording an end; what it committed stands, run "
        "the command again to carry on"
    )


def reap_dead_runs(connection: Connection) -> int:
    """Record the runs still marked running whose process is gone as ``abandoned``, with what
    is gone: a killed run is not left ``running`` for ever. How many were."""
    running = connection.execute(
        select(MigrationRun.id, MigrationRun.status, MigrationRun.params).where(
            MigrationRun.status == MigrationRunStatus.RUNNING.value
        )
    ).all()
    dead = dead_runs(connection, running) if running else {}
    for run_id, gone in dead.items():
        connection.execute(
            update(MigrationRun)
            .where(
                MigrationRun.id == run_id, MigrationRun.status == MigrationRunStatus.RUNNING.value
            )
            .values(
                status=MigrationRunStatus.ABANDONED.value,
                error=_dead_reason(gone),
                finished_at=func.now(),
            )
        )
    return len(dead)


def life_of(run: Any, dead: Mapping[int, str]) -> RunLife:
    """Where ``run`` (a ledger row) is, and why, given :func:`dead_runs` of its rows."""
    params = run.params if isinstance(run.params, dict) else {}
    if run.status == MigrationRunStatus.RUNNING.value:
        if run.id in dead:
            return RunLife(RunState.DEAD, _dead_reason(dead[run.id]))
        where = f"process {params.get('pid', '?')} on {params.get('host', '?')}"
        if params.get("backend_pid"):
            where += f", server backend {params['backend_pid']}"
        return RunLife(RunState.LIVE, f"running as {where}")
    if run.status == MigrationRunStatus.ABANDONED.value:
        return RunLife(RunState.DEAD, run.error or _dead_reason("its process is gone"))
    if run.status == MigrationRunStatus.INTERRUPTED.value:
        why = (
            run.error
            if run.error and run.error != MigrationRunStatus.INTERRUPTED.value
            else "Ctrl-C or SIGTERM"
        )
        return RunLife(
            RunState.INTERRUPTED, f"stopped by {why}; what it committed stands, a rerun carries on"
        )
    if run.status == MigrationRunStatus.FAILED.value:
        return RunLife(RunState.FINISHED, f"failed: {run.error or 'no reason recorded'}")
    summary = run.summary if isinstance(run.summary, dict) else {}
    if "passed" in summary:  # a check (verify): what it found
        return RunLife(RunState.FINISHED, "passed" if summary["passed"] else "found differences")
    return RunLife(RunState.FINISHED, run.status)


def start_run(
    engine: Connectable,
    kind: RunKind,
    *,
    project_id: int | None = None,
    params: dict[str, Any] | None = None,
    key_upper_bound: int | None = None,
    backend_pid: int | None = None,
) -> int:
    """Record a run as started (its own short transaction) and return its id; runs left
    marked running by processes that are gone are recorded as abandoned on the way.

    ``params`` gets the host and process id, and ``backend_pid`` when given (the server backend
    of a connection the run holds open until it ends): what :func:`dead_runs` checks.
    """
    params = {**(params or {}), "host": socket.gethostname(), "pid": os.getpid()}
    if backend_pid is not None:
        params["backend_pid"] = backend_pid
    with begin(engine) as connection:
        reap_dead_runs(connection)
        return int(
            connection.execute(
                insert(MigrationRun)
                .values(
                    kind=kind.value,
                    status=MigrationRunStatus.RUNNING.value,
                    project_id=project_id,
                    params=params,
                    key_upper_bound=key_upper_bound,
                    started_by=_who(),
                )
                .returning(MigrationRun.id)
            ).scalar_one()
        )


@dataclass(frozen=True, slots=True)
class ReadRun:
    """The ledger record of a command that only reads (verify, export): its id, or, when the
    run could not be recorded, None and the one line that says why."""

    id: int | None
    not_recorded: str | None = None


_COMPLETE_ANYWAY = "the result below is complete"


def start_read_run(
    engine: Connectable,
    kind: RunKind,
    *,
    readonly: bool = False,
    project_id: int | None = None,
    params: dict[str, Any] | None = None,
) -> ReadRun:
    """:func:`start_run` for a command that only reads, so that it runs where it may not write.

    ``readonly``: not even tried. A user without the privilege to write the ledger, or a
    database that takes no writes (a hot standby, ``default_transaction_read_only``, a SQLite
    file opened read-only) leaves the run unrecorded: the command carries on, and
    ``not_recorded`` says so. Any other error is raised.
    """
    if readonly:
        return ReadRun(
            None, f"run not recorded: --readonly writes nothing to the database; {_COMPLETE_ANYWAY}"
        )
    try:
        return ReadRun(start_run(engine, kind, project_id=project_id, params=params))
    except DBAPIError as error:
        why = write_refusal(error)
        if why is None:
            raise
    with connect(engine) as connection:
        user = database_user(connection)
    return ReadRun(
        None,
        f"run not recorded: {user} cannot write migration_runs ({why}); {_COMPLETE_ANYWAY}",
    )


def finish_run(
    engine: Connectable,
    run_id: int | None,
    status: MigrationRunStatus,
    *,
    summary: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """Record how a run ended.

    A run recorded as failed while a KeyboardInterrupt is being handled (Ctrl-C, or SIGTERM,
    which the CLI raises as one) was interrupted, not failed: every caller's ``except
    BaseException`` gets that right without telling the two apart itself. A run that was not
    recorded (``run_id`` None, see :func:`start_read_run`) has nothing to record.
    """
    if run_id is None:
        return
    if status is MigrationRunStatus.FAILED and isinstance(sys.exc_info()[1], KeyboardInterrupt):
        status = MigrationRunStatus.INTERRUPTED
        error = MigrationRunStatus.INTERRUPTED.value
    with begin(engine) as connection:
        connection.execute(
            update(MigrationRun)
            .where(MigrationRun.id == run_id)
            .values(status=status.value, summary=summary, error=error, finished_at=func.now())
        )
