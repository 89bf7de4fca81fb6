"""The migration-runs ledger: every export, restore, backfill, verify and rehearse run is
recorded with its parameters, outcome and summary, so `orch-migrate status` can say what was
done last and whether it worked."""

from __future__ import annotations

import enum
import getpass
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from prompt_tool.db.engine import Connectable, begin
from prompt_tool.db.models import MigrationRun, Project

__all__ = ["RunInfo", "RunKind", "RunStatus", "finish_run", "last_runs", "start_run"]


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


def start_run(
    engine: Connectable,
    kind: RunKind,
    *,
    project_id: int | None = None,
    params: dict[str, Any] | None = None,
    key_upper_bound: int | None = None,
) -> int:
    """Record a run as started (its own short transaction) and return its id."""
    with begin(engine) as connection:
        return int(
            connection.execute(
                insert(MigrationRun)
                .values(
                    kind=kind.value,
                    status=RunStatus.RUNNING.value,
                    project_id=project_id,
                    params=params or {},
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
