"""The migration-runs ledger: every export, restore, backfill, verify and rehearse run is
recorded with its parameters, outcome and summary, so `orch-migrate status` can say what was
done last and whether it worked."""

from __future__ import annotations

import enum
import getpass
import os
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.orm import Session

from prompt_tool.db.dialect import backends_alive
from prompt_tool.db.engine import Connectable, begin
from prompt_tool.db.models import MigrationRun, Project

__all__ = [
    "RunInfo",
    "RunKind",
    "RunStatus",
    "dead_runs",
    "finish_run",
    "last_runs",
    "outcome_of",
    "start_run",
]


class RunKind(enum.StrEnum):
    EXPORT = "export"
    RESTORE = "restore"
    BACKFILL = "backfill"
    VERIFY = "verify"
    REHEARSE = "rehearse"


class RunStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    # Stopped by Ctrl-C or SIGTERM: what it committed stands, a rerun carries on from there.
    INTERRUPTED = "interrupted"
    # Not stored: how `status` shows a run still marked running whose process is gone (SIGKILL,
    # a crash, a lost host).
    ABANDONED = "abandoned"


@dataclass(frozen=True, slots=True)
class RunInfo:
    id: int
    kind: str
    status: str
    project: str | None
    started_at: datetime
    finished_at: datetime | None
    summary: dict[str, Any] | None
    error: str | None


def _who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"[:100]


def outcome_of(error: BaseException) -> RunStatus:
    """How a run that raised ``error`` ends: Ctrl-C and SIGTERM (raised as KeyboardInterrupt)
    interrupt it, anything else fails it."""
    return RunStatus.INTERRUPTED if isinstance(error, KeyboardInterrupt) else RunStatus.FAILED


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def dead_runs(connection: Connection, runs: Iterable[Any]) -> set[int]:
    """The ids of those ``runs`` (ledger rows) marked running whose process is gone.

    A run records where it runs (``params``: host, pid, and on PostgreSQL the server backend of
    the connection it holds for its whole length). On PostgreSQL a run is dead when that backend
    is no longer in ``pg_stat_activity`` (whichever host ran it); otherwise, on the same host,
    when its process no longer exists. A run of another host without a backend is assumed alive.
    """
    running = [run for run in runs if run.status == RunStatus.RUNNING.value]
    backends = {
        int(run.params["backend_pid"])
        for run in running
        if isinstance(run.params, dict) and run.params.get("backend_pid")
    }
    alive_backends = backends_alive(connection, backends) if backends else None
    host = socket.gethostname()
    dead: set[int] = set()
    for run in running:
        params = run.params if isinstance(run.params, dict) else {}
        backend = params.get("backend_pid")
        if backend and alive_backends is not None:
            gone = int(backend) not in alive_backends
        elif params.get("host") == host and params.get("pid"):
            gone = not _process_alive(int(params["pid"]))
        else:
            gone = False
        if gone:
            dead.add(run.id)
    return dead


def start_run(
    engine: Connectable,
    kind: RunKind,
    *,
    project_id: int | None = None,
    params: dict[str, Any] | None = None,
    key_upper_bound: int | None = None,
    backend_pid: int | None = None,
) -> int:
    """Record a run as started (its own short transaction) and return its id.

    ``params`` gets the host and process id, and ``backend_pid`` when given (the server backend
    of a connection the run holds open until it ends): what :func:`dead_runs` checks.
    """
    params = {**(params or {}), "host": socket.gethostname(), "pid": os.getpid()}
    if backend_pid is not None:
        params["backend_pid"] = backend_pid
    with begin(engine) as connection:
        return int(
            connection.execute(
                insert(MigrationRun)
                .values(
                    kind=kind.value,
                    status=RunStatus.RUNNING.value,
                    project_id=project_id,
                    params=params,
                    key_upper_bound=key_upper_bound,
                    started_by=_who(),
                )
                .returning(MigrationRun.id)
            ).scalar_one()
        )


def finish_run(
    engine: Connectable,
    run_id: int,
    status: RunStatus,
    *,
    summary: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """Record how a run ended.

    A run recorded as failed while a KeyboardInterrupt is being handled (Ctrl-C, or SIGTERM,
    which the CLI raises as one) was interrupted, not failed: every caller's ``except
    BaseException`` gets that right without telling the two apart itself.
    """
    if status is RunStatus.FAILED and isinstance(sys.exc_info()[1], KeyboardInterrupt):
        status = RunStatus.INTERRUPTED
        error = "interrupted"
    with begin(engine) as connection:
        connection.execute(
            update(MigrationRun)
            .where(MigrationRun.id == run_id)
            .values(status=status.value, summary=summary, error=error, finished_at=func.now())
        )


def last_runs(engine: Connectable) -> dict[tuple[str, str | None], RunInfo]:
    """The latest run of each kind per project (``None``: runs over all projects)."""
    latest = (
        select(func.max(MigrationRun.id))
        .group_by(MigrationRun.kind, MigrationRun.project_id)
        .scalar_subquery()
    )
    query = (
        select(MigrationRun, Project.slug)
        .outerjoin(Project, Project.id == MigrationRun.project_id)
        .where(MigrationRun.id.in_(latest))
    )
    with Session(engine) as session:
        rows = [(run, slug) for run, slug in session.execute(query)]
    return {
        (run.kind, slug): RunInfo(
            run.id,
            run.kind,
            run.status,
            slug,
            run.started_at,
            run.finished_at,
            run.summary,
            run.error,
        )
        for run, slug in rows
    }
