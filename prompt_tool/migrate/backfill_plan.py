"""`orch-migrate backfill --workers N`: several processes share one run.

The run's key range is planned up front into batches of ``--batch-size`` sessions, each a
``pending`` row of ``migration_batches`` with its key range. Every worker process loops: in one
short transaction it claims the first pending batch with ``SELECT ... FOR UPDATE SKIP LOCKED``
(so no two workers ever hold the same batch, and none waits for another), links that range's
sessions exactly as a single-worker batch does (:func:`prompt_tool.migrate.backfill._run_batch`)
and marks the row ``done`` before COMMIT. A claim therefore lives exactly as long as the
batch's transaction: a worker killed at any point (SIGKILL included) leaves its batch
``pending``, and a later run of the same scope carries the run's pending ranges on, with any
number of workers. The result is the same as a single-worker run: every step is idempotent, and
two workers that import the same text at once meet on the unique index (``ON CONFLICT DO
NOTHING``); the loser's next statement, in a fresh READ COMMITTED snapshot, links to the
winner's template.

The process that runs :func:`~prompt_tool.migrate.backfill.backfill` holds the projects'
advisory locks, plans, starts ``N - 1`` more worker processes
(:func:`worker_main`, configured over stdin so the database URL never shows in a
process list), works as one itself, and totals the run from the ledger. A worker whose parent
is gone stops before its next batch.

SQLite has one writer at a time and no ``SKIP LOCKED``: there the plan is walked by one worker,
the calling process, with the same ledger (``--workers`` is accepted and has no other effect).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, and_, func, insert, or_, select

import prompt_tool.migrate.backfill as backfill_module
from prompt_tool.db.engine import Connectable, begin, bounded_waits, connect, make_engine
from prompt_tool.db.models import MigrationBatch, OrchestrationSession
from prompt_tool.db.projects import projects_by_slug
from prompt_tool.errors import PromptToolError
from prompt_tool.migrate.matching import ExistingTemplateMatcher
from prompt_tool.settings import Settings, get_settings

__all__ = [
    "BackfillWorkerError",
    "effective_workers",
    "pending_ranges",
    "walk_planned",
    "worker_main",
]

PENDING = "pending"
# Ctrl-C on a terminal reaches the whole foreground process group, workers included: a worker
# ignores it from its first statement (before the imports, where it would print a traceback), so
# the parent alone decides, and stops its workers with SIGTERM.
_WORKER = (
    "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "import sys\nfrom prompt_tool.migrate.backfill_plan import worker_main\nsys.exit(worker_main())"
)
_SESSIONS = OrchestrationSession.__table__


class BackfillWorkerError(PromptToolError):
    """A worker process of a ``--workers`` backfill failed."""


def pending_ranges(connection: Connection, run_id: int | None) -> list[tuple[int, int]]:
    """The key ranges a planned run left undone (none for an unplanned run)."""
    if run_id is None:
        return []
    return [
        (int(lo), int(hi))
        for lo, hi in connection.execute(
            select(MigrationBatch.key_lo, MigrationBatch.key_hi)
            .where(MigrationBatch.run_id == run_id, MigrationBatch.status == PENDING)
            .order_by(MigrationBatch.key_lo)
        )
    ]


def effective_workers(engine: Connectable, wanted: int) -> int:
    """PostgreSQL runs ``wanted`` processes; SQLite, or the caller's own connection, one."""
    if isinstance(engine, Connection) or engine.dialect.name != "postgresql":
        return 1
    return wanted


def _plan(
    connection: Connection,
    run_id: int,
    after: int,
    upper: int,
    size: int,
    limit: int | None,
    project_ids: Sequence[int],
    scoped: bool,
) -> int:
    """Cut (after, upper] into ranges of ``size`` sessions: pending ledger rows. Set-based."""
    ids = (
        select(_SESSIONS.c.id)
        .where(
            _SESSIONS.c.id > after,
            _SESSIONS.c.id <= upper,
            backfill_module._session_filter(project_ids, scoped),
        )
        .order_by(_SESSIONS.c.id)
    )
    if limit is not None:
        ids = ids.limit(limit)
    chosen = ids.subquery()
    numbered = select(
        chosen.c.id,
        func.row_number().over(order_by=chosen.c.id).label("n"),
        func.count().over().label("total"),
    ).subquery()
    bounds = connection.execute(
        select(numbered.c.id)
        .where(or_(numbered.c.n % size == 0, numbered.c.n == numbered.c.total))
        .order_by(numbered.c.id)
    ).scalars()
    rows: list[dict[str, Any]] = []
    low = after
    for high in bounds:
        rows.append(
            {"run_id": run_id, "key_lo": low, "key_hi": high, "status": PENDING, "rows_seen": 0}
        )
        low = high
    if rows:
        connection.execute(insert(MigrationBatch), rows)
    return len(rows)


def _carry(connection: Connection, run_id: int, ranges: Sequence[tuple[int, int]]) -> None:
    """An interrupted planned run's pending ranges become this run's plan."""
    connection.execute(
        insert(MigrationBatch),
        [
            {"run_id": run_id, "key_lo": lo, "key_hi": hi, "status": PENDING, "rows_seen": 0}
            for lo, hi in ranges
        ],
    )


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:100]


def _claim_loop(
    engine: Connectable,
    run_id: int,
    options: backfill_module.BackfillOptions,
    settings: Settings,
    summary: backfill_module.BackfillSummary,
    project_ids: Sequence[int],
    scoped: bool,
    matcher: ExistingTemplateMatcher | None,
    on_batch: Callable[[], None] | None = None,
    parent: int | None = None,
) -> None:
    """Claim pending batches of the run and do them, one transaction each, until none is left."""
    worker = _worker_name()
    claim = (
        select(MigrationBatch.id, MigrationBatch.key_lo, MigrationBatch.key_hi)
        .where(MigrationBatch.run_id == run_id, MigrationBatch.status == PENDING)
        .order_by(MigrationBatch.key_lo)
        .limit(1)
        .with_for_update(skip_locked=True)
    )

    imported = backfill_module.ImportedVersions()

    def work(connection: Connection) -> backfill_module._BatchResult | None:
        claimed = connection.execute(claim).first()
        if claimed is None:
            return None
        batch_id, low, high = claimed
        return backfill_module._run_batch(
            connection,
            run_id=run_id,
            after=int(low),
            upper=int(high),
            options=options,
            size=max(1, int(high) - int(low)),  # ids are unique integers: at most this many
            project_ids=project_ids,
            scoped=scoped,
            dry_run_seen=set(),
            matcher=matcher,
            planned=backfill_module.PlannedBatch(int(batch_id), worker),
            imported=imported,
        )

    while parent is None or os.getppid() == parent:  # an orphaned worker stops
        result = backfill_module._with_retries(engine, options, summary, work)
        if result is None:
            return
        summary.batches += 1
        summary.sessions_scanned += result.sessions
        if on_batch is not None:
            on_batch()


def _start_worker(
    engine: Connectable, run_id: int, options: backfill_module.BackfillOptions, settings: Settings
) -> subprocess.Popen[bytes]:
    config = {
        "url": engine.engine.url.render_as_string(hide_password=False),
        "run_id": run_id,
        "parent": os.getpid(),
        "projects": list(options.projects),
        "match_existing": options.match_existing,
        "max_retries": options.max_retries,
        "lock_timeout_ms": settings.migration_lock_timeout_ms,
        "statement_timeout_ms": settings.migration_statement_timeout_ms,
    }
    process = subprocess.Popen(  # noqa: S603 - this interpreter running our own worker
        [sys.executable, "-c", _WORKER],
        stdin=subprocess.PIPE,
    )
    assert process.stdin is not None
    process.stdin.write(json.dumps(config).encode())
    process.stdin.close()
    return process


def _planned_sessions(
    connection: Connection, run_id: int, project_ids: Sequence[int], scoped: bool
) -> int:
    """How many sessions the run's pending batches hold: the total to show progress against."""
    batches = MigrationBatch.__table__
    return int(
        connection.execute(
            select(func.count())
            .select_from(
                _SESSIONS.join(
                    batches,
                    and_(_SESSIONS.c.id > batches.c.key_lo, _SESSIONS.c.id <= batches.c.key_hi),
                )
            )
            .where(
                batches.c.run_id == run_id,
                batches.c.status == PENDING,
                backfill_module._session_filter(project_ids, scoped),
            )
        ).scalar_one()
    )


def _reap(child: subprocess.Popen[bytes]) -> None:
    """Wait for a worker; one that does not stop within seconds of SIGTERM is killed."""
    try:
        child.wait(timeout=None if child.returncode is not None else 30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _done_so_far(engine: Connectable, run_id: int) -> tuple[int, int]:
    """(sessions, batches) the run's workers have done so far, from its ledger."""
    with connect(engine) as connection:
        sessions, batches = connection.execute(
            select(func.coalesce(func.sum(MigrationBatch.rows_seen), 0), func.count()).where(
                MigrationBatch.run_id == run_id,
                MigrationBatch.status == backfill_module.BATCH_DONE,
            )
        ).one()
    return int(sessions), int(batches)


class _Stopped(BaseException):
    """SIGTERM reached a worker: its parent stops the run (or someone stopped the worker)."""


def _stop(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the worker is already stopping
    raise _Stopped


def worker_main() -> int:
    """A worker process: configured over stdin by the process that planned the run.

    Ctrl-C on a terminal reaches every process of the foreground group, workers included: a
    worker ignores it and lets the process that planned the run decide, which stops its workers
    with SIGTERM. On SIGTERM a worker rolls its open batch back (the batch stays pending for the
    next run) and exits 143 without a word; the parent says what happened, once.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)
    try:
        return _worker(json.loads(sys.stdin.read()))
    except _Stopped:
        return 128 + signal.SIGTERM


def _totals(engine: Connectable, run_id: int, summary: backfill_module.BackfillSummary) -> None:
    """The run's figures from its ledger: every worker's batches, not only ours."""
    summary.batches = 0
    summary.sessions_scanned = 0
    summary.unreadable = 0
    summary.unreadable_rows.clear()
    with connect(engine) as connection:
        rows = connection.execute(
            select(MigrationBatch.rows_seen, MigrationBatch.counts).where(
                MigrationBatch.run_id == run_id,
                MigrationBatch.status == backfill_module.BATCH_DONE,
            )
        ).all()
    for rows_seen, stored in rows:
        counts = stored or {}
        summary.batches += 1
        summary.sessions_scanned += int(rows_seen)
        summary.references_created += int(counts.get("created", 0))
        summary.references_matched += int(counts.get("matched", 0))
        summary.references_relinked += int(counts.get("relinked", 0))
        summary.references_removed += int(counts.get("removed", 0))
        summary.references_unchanged += int(counts.get("unchanged", 0))
        summary.templates_created += int(counts.get("templates", 0))
        backfill_module.note_unreadable(
            summary, int(counts.get("unreadable", 0)), counts.get("unreadable_rows", [])
        )


def walk_planned(
    engine: Connectable,
    run_id: int | None,
    options: backfill_module.BackfillOptions,
    settings: Settings,
    summary: backfill_module.BackfillSummary,
    project_ids: Sequence[int],
    scoped: bool,
    after: int,
    upper: int,
    total: int,
    started: float,
    progress: Callable[[backfill_module.BackfillProgress], None] | None,
    matcher: ExistingTemplateMatcher | None = None,
    dry_run_seen: set[tuple[int, str, str]] | None = None,
    *,
    carried: Sequence[tuple[int, int]] = (),
) -> None:
    """Plan the run (or carry an interrupted one's pending ranges on) and walk it with
    ``options.workers`` processes. Same signature as the single-worker walk."""
    assert run_id is not None, "a planned run is never a dry run"
    del dry_run_seen  # a dry run is never planned
    with begin(engine) as connection:
        if carried:
            _carry(connection, run_id, carried)
            total = _planned_sessions(connection, run_id, project_ids, scoped)
        else:
            _plan(
                connection,
                run_id,
                after,
                upper,
                options.batch_size,
                options.limit,
                project_ids,
                scoped,
            )
    summary.workers = effective_workers(engine, options.workers)
    children: list[subprocess.Popen[bytes]] = []

    def report() -> None:
        if progress is None:
            return
        done, batches = summary.sessions_scanned, summary.batches
        if children:  # the whole run's progress, every worker's batches
            done, batches = _done_so_far(engine, run_id)
        progress(backfill_module.BackfillProgress(done, total, batches, time.monotonic() - started))

    try:
        for _ in range(summary.workers - 1):
            children.append(_start_worker(engine, run_id, options, settings))
        _claim_loop(
            engine, run_id, options, settings, summary, project_ids, scoped, matcher, report
        )
        while any(child.poll() is None for child in children):  # the last batches
            time.sleep(0.2)
            report()
    except BaseException:
        for child in children:
            child.terminate()  # its open transaction rolls back; its batch stays pending
        raise
    finally:
        for child in children:
            _reap(child)
    failed = [child.returncode for child in children if child.returncode != 0]
    if failed:
        # A worker that died (killed, out of memory) rolled its open batch back to pending:
        # finish what it left here, so the run ends complete if everything else went well.
        summary.workers_lost = failed
        _claim_loop(
            engine, run_id, options, settings, summary, project_ids, scoped, matcher, report
        )
        with connect(engine) as connection:
            left = len(pending_ranges(connection, run_id))
        if left:
            raise BackfillWorkerError(
                f"{len(failed)} of {summary.workers} backfill workers failed (exit codes "
                f"{', '.join(map(str, failed))}) and {left} batches are left; run "
                "`orch-migrate backfill` again to finish: it carries on with them"
            )
    _totals(engine, run_id, summary)
    report()


def _worker(config: dict[str, Any]) -> int:
    settings = get_settings().with_(
        migration_lock_timeout_ms=config["lock_timeout_ms"],
        migration_statement_timeout_ms=config["statement_timeout_ms"],
    )
    options = backfill_module.BackfillOptions(
        projects=tuple(config["projects"]),
        match_existing=config["match_existing"],
        max_retries=config["max_retries"],
    )
    base = make_engine(config["url"])
    # Every query of the worker waits for locks as the planning process's do (bounded).
    engine = bounded_waits(
        base, settings.migration_lock_timeout_ms, settings.migration_statement_timeout_ms
    )
    try:
        with connect(engine) as connection:
            projects = projects_by_slug(connection, options.projects)
        summary = backfill_module.BackfillSummary(
            config["run_id"], False, sorted(projects.values()), 0
        )
        _claim_loop(
            engine,
            config["run_id"],
            options,
            settings,
            summary,
            list(projects),
            bool(options.projects),
            backfill_module._matcher(engine, options, projects),
            parent=config["parent"],
        )
    finally:
        base.dispose()
    return 0
