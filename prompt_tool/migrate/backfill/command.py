"""The backfill command (see the package): hold the projects' locks, find where an interrupted
run stopped, record the run, walk it (alone or with worker processes) and record how it ended."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select

from prompt_tool import __version__
from prompt_tool.db.dialect import (
    acquire_advisory_lock,
    backend_pid,
    refresh_statistics,
    release_advisory_lock,
)
from prompt_tool.db.engine import Connectable, begin, bounded_waits, connect
from prompt_tool.db.health import tag_connections
from prompt_tool.db.models import OrchestrationSession
from prompt_tool.db.revision_guard import require_known_revision
from prompt_tool.db.revisions import QUARANTINE
from prompt_tool.db.schema import recorded_revisions
from prompt_tool.errors import PromptToolError
from prompt_tool.migrate.adoption import adopt_orphaned_imports
from prompt_tool.migrate.backfill.batch import WRITTEN_TABLES, matcher_for
from prompt_tool.migrate.backfill.health import HealthMonitor, check_throttle_query, signals_for
from prompt_tool.migrate.backfill.ledger import (
    pending_ranges,
    resume_point,
    summary_dict,
    untrusted_checkpoint,
)
from prompt_tool.migrate.backfill.observe import MetricsWriter, check_metrics_path
from prompt_tool.migrate.backfill.steering import Steering, retrying
from prompt_tool.migrate.backfill.types import (
    BackfillOptions,
    BackfillProgress,
    BackfillRun,
    BackfillScope,
    BackfillSummary,
    application_name,
)
from prompt_tool.migrate.backfill.walk import refresh_stale_statistics, walk
from prompt_tool.migrate.backfill.workers import walk_planned
from prompt_tool.migrate.runs import (
    MigrationRunStatus,
    RunKind,
    finish_run,
    outcome_of,
    start_run,
)
from prompt_tool.settings import HealthLimits, Settings, get_settings

__all__ = ["BackfillBusyError", "BackfillCancelledError", "backfill"]

_ANALYZE_AFTER = 10_000  # references written by a run before it refreshes the statistics
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


@dataclass(frozen=True, slots=True)
class _Start:
    """Where a run goes: its upper key, the checkpoint it resumes after (and the run whose it
    is), the pending ranges of a planned run it carries on, how many sessions it walks, and why
    the old checkpoint was not trusted when the run started over instead."""

    upper: int
    resumed_after: int | None
    resumed_run: int | None
    carried: tuple[tuple[int, int], ...]
    total: int
    restarted: str | None = None


def _checkpoint(connection: Connection, options: BackfillOptions) -> dict[str, Any]:
    """What the run's checkpoints are good for (see ledger.untrusted_checkpoint)."""
    revisions = recorded_revisions(connection)
    return {
        "revision": revisions[0] if len(revisions) == 1 else ",".join(revisions),
        "code_version": __version__,
        "match_existing": options.match_existing,
    }


def _prepare(
    engine: Connectable, options: BackfillOptions, scope: BackfillScope, checkpoint: dict[str, Any]
) -> _Start:
    """Where the run goes (see :class:`_Start`)."""

    def prepare(connection: Connection) -> _Start:
        upper = connection.execute(
            select(func.coalesce(func.max(_SESSIONS.c.id), 0)).where(scope.sessions())
        ).scalar_one()
        resumed_after, resumed_run = (
            (None, None) if options.dry_run else resume_point(connection, scope.key)
        )
        restarted = None
        if resumed_run is not None:
            why = untrusted_checkpoint(connection, resumed_run, checkpoint)
            if why is not None:
                restarted = (
                    f"started over from the first session instead of resuming run "
                    f"{resumed_run}: {why}"
                )
                resumed_after, resumed_run = None, None
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
        return _Start(upper, resumed_after, resumed_run, carried, total, restarted)

    return retrying(engine, options, prepare)


class BackfillCancelledError(PromptToolError):
    """The run was cancelled by `orch-migrate backfill cancel`: what it committed stands."""

    exit_code = 1


def _check_before_writing(engine: Connectable, options: BackfillOptions) -> None:
    """Refuse, before anything is written, what would only fail later: a throttle query that
    does not run, a metrics file that cannot be written."""
    if options.throttle_query:
        check_throttle_query(engine, options.throttle_query)
    if options.metrics_file:
        check_metrics_path(options.metrics_file)


def _monitor(run: BackfillRun) -> HealthMonitor | None:
    """The run's health monitor (None: nothing to watch)."""
    options = run.options
    if not options.health_checks and not options.throttle_query:
        return None
    limits = options.health or run.settings.backfill_health
    if not options.health_checks:
        limits = HealthLimits(None, None, False, None, None)
    signals = signals_for(
        limits,
        application_name=application_name(run.run_id),
        tables=WRITTEN_TABLES,
        throttle_query=options.throttle_query,
    )
    return HealthMonitor(run.engine, signals) if signals else None


@contextmanager
def _watched(run: BackfillRun) -> Iterator[Steering]:
    """The run's control loop, with its health monitor and metrics file running meanwhile."""
    monitor = _monitor(run)
    metrics = (
        MetricsWriter(run.engine.engine, run.options.metrics_file, run_id=run.run_id)
        if run.options.metrics_file and run.run_id is not None
        else None
    )
    with ExitStack() as stack:
        if monitor is not None:
            stack.enter_context(monitor)
            run.summary.health_problems = [
                f"{signal} not checked: {why}" for signal, why in monitor.problems().items()
            ]
        if metrics is not None:
            stack.enter_context(metrics)
        yield Steering(run, monitor)


def backfill(
    engine: Connectable,
    options: BackfillOptions | None = None,
    *,
    progress: Callable[[BackfillProgress], None] | None = None,
    settings: Settings | None = None,
) -> BackfillSummary:
    """Link every selected session to imported templates of its legacy texts. See the package."""
    require_known_revision(engine, "backfill", needs=QUARANTINE)
    options = options or BackfillOptions()
    settings = settings or get_settings()
    started = time.monotonic()
    engine = bounded_waits(
        engine, settings.migration_lock_timeout_ms, settings.migration_statement_timeout_ms
    )
    _check_before_writing(engine, options)
    with connect(engine) as connection:
        scope = BackfillScope.of(connection, options)
        checkpoint = _checkpoint(connection, options)
    refreshed = refresh_stale_statistics(engine)
    with _project_locks(engine, scope, options.wait) as holder_pid:
        start = _prepare(engine, options, scope, checkpoint)
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
                    "resumed_after": start.resumed_after,
                    "checkpoint": checkpoint,
                    "options": _recorded_options(options),
                },
                key_upper_bound=start.upper,
                backend_pid=holder_pid,
            )
        engine = tag_connections(engine, application_name(run_id))
        summary = BackfillSummary(
            run_id, options.dry_run, scope.slugs, start.upper, start.resumed_after
        )
        summary.statistics_refreshed = refreshed
        summary.restarted = start.restarted
        summary.total = start.total
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
                after=start.resumed_after or 0,
                upper=start.upper,
                total=start.total,
                started=started,
                progress=progress,
                matcher=matcher_for(engine, options, scope),
                carried=start.carried,
                # A dry run adopts nothing: those texts must not count as imports either.
                dry_run_seen=set(adopted),
            )
            with _watched(run) as steering:
                if run_id is not None and (options.workers > 1 or start.carried):
                    walk_planned(run, steering)
                else:
                    walk(run, steering)
                summary.cancelled_by = steering.cancelled_by
        except BaseException as error:
            _record_end(engine, summary, started, error)
            raise
        if summary.references_created + summary.references_relinked > _ANALYZE_AFTER:
            # Readers and verify would otherwise plan for the empty tables the expand step
            # analysed (seq scans of millions of references) until autovacuum catches up.
            with begin(engine) as connection:
                refresh_statistics(connection, WRITTEN_TABLES)
        _record_end(engine, summary, started)
    if summary.cancelled_by is not None:
        raise BackfillCancelledError(
            f"backfill cancelled by {summary.cancelled_by} after {summary.sessions_scanned:,} "
            f"of {start.total:,} sessions ({summary.batches:,} "
            "batches); what it committed stands and the next `orch-migrate backfill` carries "
            "on from it"
        )
    return summary


def _recorded_options(options: BackfillOptions) -> dict[str, Any]:
    """The options a run records (what ``status`` shows and a resume compares)."""
    return {
        "batch_size": options.batch_size,
        "min_batch_size": options.min_batch_size,
        "target_ms": options.target_batch_ms,
        "match_existing": options.match_existing,
        "max_errors": options.max_errors,
        "retry_quarantined": options.retry_quarantined,
        "window": None if options.window is None else str(options.window),
        "health_checks": options.health_checks,
        "throttle_query": options.throttle_query,
    }


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
        status = (
            MigrationRunStatus.COMPLETED
            if summary.cancelled_by is None
            else MigrationRunStatus.CANCELLED
        )
        finish_run(engine, summary.run_id, status, summary=summary_dict(summary))
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
