"""The backfill command (see the package): hold the projects' locks, find where an interrupted
run stopped, record the run, walk it (alone or with worker processes) and record how it ended."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, func, select

from prompt_tool.db.dialect import (
    acquire_advisory_lock,
    backend_pid,
    refresh_statistics,
    release_advisory_lock,
    stale_statistics,
)
from prompt_tool.db.engine import Connectable, begin, bounded_waits, connect
from prompt_tool.db.models import OrchestrationSession
from prompt_tool.db.projects import projects_by_slug
from prompt_tool.db.revision_guard import require_known_revision
from prompt_tool.db.revisions import EXPAND
from prompt_tool.errors import PromptToolError
from prompt_tool.migrate.adoption import adopt_orphaned_imports
from prompt_tool.migrate.backfill.batch import WRITTEN_TABLES, matcher_for
from prompt_tool.migrate.backfill.ledger import pending_ranges, resume_point, summary_dict
from prompt_tool.migrate.backfill.types import (
    BackfillOptions,
    BackfillProgress,
    BackfillRun,
    BackfillScope,
    BackfillSummary,
)
from prompt_tool.migrate.backfill.walk import retrying, walk
from prompt_tool.migrate.backfill.workers import walk_planned
from prompt_tool.migrate.runs import (
    MigrationRunStatus,
    RunKind,
    finish_run,
    outcome_of,
    start_run,
)
from prompt_tool.settings import Settings, get_settings

__all__ = ["BackfillBusyError", "backfill"]

_ANALYZE_AFTER = 10_000  # references written by a run before it refreshes the statistics
_PLANNED_TABLES = ("orchestration_sessions", *WRITTEN_TABLES)
_LOCK_NAMESPACE = 0x5054_4246  # "PTBF": keeps our advisory keys apart from the application's
_SESSIONS = OrchestrationSession.__table__


class BackfillBusyError(PromptToolError):
    """Another backfill holds a project's advisory lock."""


def _lock_key(project_id: int) -> int:
    return (_LOCK_NAMESPACE << 32) | project_id


@contextmanager
def _project_locks(engine: Connectable, scope: BackfillScope, wait: bool) -> Iterator[int | None]:
    """Hold every selected project's advisory lock for the whole run (sorted: no deadlocks).

    Yields the server backend of the connection holding them (None on SQLite): it lives exactly
    as long as the run, so the ledger records it to tell a dead run from a live one.
    """
    with connect(engine) as holder:
        taken: list[int] = []
        try:
            for project_id in sorted(scope.project_ids):
                if not acquire_advisory_lock(holder, _lock_key(project_id), wait=wait):
                    raise BackfillBusyError(
                        f"another backfill is running for project {scope.projects[project_id]}; "
                        "wait for it to finish, or pass --wait to queue behind it"
                    )
                taken.append(project_id)
            holder_pid = backend_pid(holder)
            _commit_own(engine, holder)
            yield holder_pid
        finally:
            for project_id in taken:
                release_advisory_lock(holder, _lock_key(project_id))
            _commit_own(engine, holder)


def _commit_own(db: Connectable, connection: Connection) -> None:
    """End the lock holder's implicit transaction, unless it is the caller's transaction."""
    if not isinstance(db, Connection):
        connection.commit()


def _refresh_stale_statistics(engine: Connectable) -> list[str]:
    """``ANALYZE`` the tables the walk plans over when the planner knows nothing (or little)
    about them, as after a bulk load: its batch queries follow the primary key whatever the
    statistics (see :meth:`BackfillScope.sessions`), but its reference and template lookups are
    planned too. Best effort: without the privilege, or behind a lock, it goes on without."""
    with begin(engine) as connection:
        stale = stale_statistics(connection, _PLANNED_TABLES)
        if stale and refresh_statistics(connection, stale):
            return stale
    return []


_Start = tuple[int, int | None, tuple[tuple[int, int], ...], int]


def _prepare(engine: Connectable, options: BackfillOptions, scope: BackfillScope) -> _Start:
    """Where the run goes: its upper key, the checkpoint it resumes after, the pending ranges
    of a planned run it carries on, and how many sessions it walks."""

    def prepare(connection: Connection) -> _Start:
        upper = connection.execute(
            select(func.coalesce(func.max(_SESSIONS.c.id), 0)).where(scope.sessions())
        ).scalar_one()
        resumed_after, resumed_run = (
            (None, None) if options.dry_run else resume_point(connection, scope.key)
        )
        # A planned run (--workers) left ranges to do: carry them on, whatever --workers.
        carried = tuple(pending_ranges(connection, resumed_run))
        if carried:
            resumed_after = None
        total = connection.execute(
            select(func.count()).where(
                _SESSIONS.c.id > (resumed_after or 0),
                _SESSIONS.c.id <= upper,
                scope.sessions(),
            )
        ).scalar_one()
        if options.limit is not None:
            total = min(total, options.limit)
        return upper, resumed_after, carried, total

    return retrying(engine, options, None, prepare, rollback=False)


def backfill(
    engine: Connectable,
    options: BackfillOptions | None = None,
    *,
    progress: Callable[[BackfillProgress], None] | None = None,
    settings: Settings | None = None,
) -> BackfillSummary:
    """Link every selected session to imported templates of its legacy texts. See the package."""
    require_known_revision(engine, "backfill", needs=EXPAND)
    options = options or BackfillOptions()
    settings = settings or get_settings()
    started = time.monotonic()
    engine = bounded_waits(
        engine, settings.migration_lock_timeout_ms, settings.migration_statement_timeout_ms
    )
    with connect(engine) as connection:
        scope = BackfillScope(
            projects_by_slug(connection, options.projects), bool(options.projects)
        )
    refreshed = _refresh_stale_statistics(engine)
    with _project_locks(engine, scope, options.wait) as holder_pid:
        upper, resumed_after, carried, total = _prepare(engine, options, scope)
        run_id = None
        if not options.dry_run:
            one_project = scope.scoped and len(scope.project_ids) == 1
            run_id = start_run(
                engine,
                RunKind.BACKFILL,
                project_id=scope.project_ids[0] if one_project else None,
                params={
                    "scope": scope.key,
                    "batch_size": options.batch_size,
                    "limit": options.limit,
                    "workers": options.workers,
                    "resumed_after": resumed_after,
                },
                key_upper_bound=upper,
                backend_pid=holder_pid,
            )
        summary = BackfillSummary(run_id, options.dry_run, scope.slugs, upper, resumed_after)
        summary.statistics_refreshed = refreshed
        try:
            adopted = adopt_orphaned_imports(
                engine, scope.project_ids, scope.scoped, dry_run=options.dry_run
            )
            summary.templates_adopted = len(adopted)
            run = BackfillRun(
                engine,
                settings,
                options,
                scope,
                run_id,
                summary,
                after=resumed_after or 0,
                upper=upper,
                total=total,
                started=started,
                progress=progress,
                matcher=matcher_for(engine, options, scope),
                carried=carried,
                # A dry run adopts nothing: those texts must not count as imports either.
                dry_run_seen=set(adopted),
            )
            if run_id is not None and (options.workers > 1 or carried):
                walk_planned(run)
            else:
                walk(run)
        except BaseException as error:
            _record_end(engine, summary, started, error)
            raise
        if summary.references_created + summary.references_relinked > _ANALYZE_AFTER:
            # Readers and verify would otherwise plan for the empty tables the expand step
            # analysed (seq scans of millions of references) until autovacuum catches up.
            with begin(engine) as connection:
                refresh_statistics(connection, WRITTEN_TABLES)
        _record_end(engine, summary, started)
    return summary


def _record_end(
    engine: Connectable,
    summary: BackfillSummary,
    started: float,
    error: BaseException | None = None,
) -> None:
    """Record how the run ended (nothing for a dry run): completed, or what ``error`` made it."""
    summary.elapsed_s = time.monotonic() - started
    if summary.run_id is None:
        return
    if error is None:
        finish_run(
            engine, summary.run_id, MigrationRunStatus.COMPLETED, summary=summary_dict(summary)
        )
        return
    outcome = outcome_of(error)
    finish_run(
        engine,
        summary.run_id,
        outcome,
        summary=summary_dict(summary),
        error=(
            MigrationRunStatus.INTERRUPTED.value
            if outcome is MigrationRunStatus.INTERRUPTED
            else str(error)[:2000]
        ),
    )
