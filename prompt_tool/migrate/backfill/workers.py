"""`orch-migrate backfill --workers N`: several processes share one run.

The run's key range is planned up front into batches of ``--batch-size`` sessions, each a
``pending`` row of ``migration_batches`` with its key range. Every worker process loops: in one
short transaction it claims the first pending batch with ``SELECT ... FOR UPDATE SKIP LOCKED``
(so no two workers ever hold the same batch, and none waits for another), links that range's
sessions exactly as a single-worker batch does (:func:`.batch.run_batch`) and marks the row
``done`` before COMMIT. A claim therefore lives exactly as long as the
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

import dataclasses
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

from prompt_tool.db.dialect import allows_worker_processes
from prompt_tool.db.engine import Connectable, begin, bounded_waits, connect, make_engine
from prompt_tool.db.health import tag_connections
from prompt_tool.db.models import MigrationBatch, OrchestrationSession
from prompt_tool.errors import PromptToolError
from prompt_tool.migrate.backfill.batch import ImportedVersions, KeySpan, matcher_for, run_batch
from prompt_tool.migrate.backfill.ledger import (
    BatchStatus,
    batches_done,
    pending_ranges,
    total_from_ledger,
)
from prompt_tool.migrate.backfill.quarantine import check_error_budget
from prompt_tool.migrate.backfill.steering import Steering
from prompt_tool.migrate.backfill.types import (
    BackfillOptions,
    BackfillRun,
    BackfillScope,
    BackfillSummary,
    BatchResult,
    PlannedBatch,
    application_name,
)
from prompt_tool.settings import get_settings

__all__ = [
    "BackfillWorkerError",
    "effective_workers",
    "walk_planned",
    "worker_main",
]

# Ctrl-C on a terminal reaches the whole foreground process group, workers included: a worker
# ignores it from its first statement (before the imports, where it would print a traceback), so
# the parent alone decides, and stops its workers with SIGTERM.
_WORKER = (
    "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "import sys\nfrom prompt_tool.migrate.backfill.workers import worker_main\n"
    "sys.exit(worker_main())"
)
_SESSIONS = OrchestrationSession.__table__


class BackfillWorkerError(PromptToolError):
    """A worker process of a ``--workers`` backfill failed."""


def effective_workers(engine: Connectable, wanted: int) -> int:
    """PostgreSQL runs ``wanted`` processes; SQLite, or the caller's own connection, one."""
    return wanted if allows_worker_processes(engine) else 1


def _pending_row(run_id: int, low: int, high: int) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "key_lo": low,
        "key_hi": high,
        "status": BatchStatus.PENDING.value,
        "rows_seen": 0,
    }


def _plan(connection: Connection, run: BackfillRun, run_id: int) -> int:
    """Cut (after, upper] into ranges of ``--batch-size`` sessions (at most ``--limit`` in
    all): pending ledger rows. Set-based."""
    ids = (
        select(_SESSIONS.c.id)
        .where(_SESSIONS.c.id > run.after, _SESSIONS.c.id <= run.upper, run.scope.sessions())
        .order_by(_SESSIONS.c.id)
    )
    if run.options.limit is not None:
        ids = ids.limit(run.options.limit)
    size = run.options.batch_size
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
    low = run.after
    for high in bounds:
        rows.append(_pending_row(run_id, low, high))
        low = high
    if rows:
        connection.execute(insert(MigrationBatch), rows)
    return len(rows)


def _carry(connection: Connection, run_id: int, ranges: Sequence[tuple[int, int]]) -> None:
    """An interrupted planned run's pending ranges become this run's plan."""
    connection.execute(insert(MigrationBatch), [_pending_row(run_id, lo, hi) for lo, hi in ranges])


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:100]


def _claim_loop(
    run: BackfillRun,
    steering: Steering,
    on_batch: Callable[[], None] | None = None,
    parent: int | None = None,
) -> None:
    """Claim pending batches of the run and do them, one transaction each, until none is left
    or the run is cancelled. A batch takes at most the controller's size from its range; the
    rest stays pending.

    ``parent``: the planning process's pid; a worker whose parent is gone stops."""
    assert run.run_id is not None, "a planned run is never a dry run"
    run_id = run.run_id
    worker = _worker_name()
    claim = (
        select(MigrationBatch.id, MigrationBatch.key_lo, MigrationBatch.key_hi)
        .where(
            MigrationBatch.run_id == run_id,
            MigrationBatch.status == BatchStatus.PENDING.value,
        )
        .order_by(MigrationBatch.key_lo)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    imported = ImportedVersions()

    def work(connection: Connection, size: int) -> BatchResult | None:
        claimed = connection.execute(claim).first()
        if claimed is None:
            return None
        batch_id, low, high = claimed
        span = KeySpan(int(low), int(high), size)
        planned = PlannedBatch(int(batch_id), worker, run_id, int(high))
        return run_batch(connection, run, span, imported, planned)

    summary = run.summary
    while parent is None or os.getppid() == parent:  # an orphaned worker stops
        if not steering.gate():
            return
        result = steering.attempt(work)
        if result is None:
            return
        summary.batches += 1
        summary.sessions_scanned += result.sessions
        summary.quarantined += result.quarantined
        check_error_budget(run, summary)
        if on_batch is not None:
            on_batch()
        if run.options.sleep_ms:
            time.sleep(run.options.sleep_ms / 1000)


def _start_worker(run: BackfillRun) -> subprocess.Popen[bytes]:
    options, settings = run.options, run.settings
    config = {
        "url": run.engine.engine.url.render_as_string(hide_password=False),
        "run_id": run.run_id,
        "parent": os.getpid(),
        "projects": list(options.projects),
        "match_existing": options.match_existing,
        "max_retries": options.max_retries,
        "batch_size": options.batch_size,
        "sleep_ms": options.sleep_ms,
        "min_batch_size": options.min_batch_size,
        "target_batch_ms": options.target_batch_ms,
        "max_errors": options.max_errors,
        "retry_quarantined": options.retry_quarantined,
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


def _planned_sessions(connection: Connection, run_id: int, scope: BackfillScope) -> int:
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
                batches.c.status == BatchStatus.PENDING.value,
                scope.sessions(),
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


def _plan_or_carry(run: BackfillRun, run_id: int) -> BackfillRun:
    """Write the run's plan (or carry an interrupted one's pending ranges on); the run, with
    the total of the carried ranges when there were some."""
    with begin(run.engine) as connection:
        if not run.carried:
            _plan(connection, run, run_id)
            return run
        _carry(connection, run_id, run.carried)
        return dataclasses.replace(run, total=_planned_sessions(connection, run_id, run.scope))


def walk_planned(run: BackfillRun, steering: Steering) -> None:
    """Plan the run (or carry an interrupted one's pending ranges on) and walk it with
    ``--workers`` processes. Same signature as the single-worker walk."""
    run_id = run.run_id
    assert run_id is not None, "a planned run is never a dry run"
    run = _plan_or_carry(run, run_id)
    steering.run = run  # the carried ranges' total
    run.summary.total = run.total
    summary = run.summary
    summary.workers = effective_workers(run.engine, run.options.workers)
    children: list[subprocess.Popen[bytes]] = []

    def report() -> None:
        done, batches = summary.sessions_scanned, summary.batches
        if children:  # the whole run's progress, every worker's batches
            done, batches = batches_done(run.engine, run_id)
        steering.report(done, batches)

    try:
        for _ in range(summary.workers - 1):
            children.append(_start_worker(run))
        _claim_loop(run, steering, report)
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
        _claim_loop(run, steering, report)
        with connect(run.engine) as connection:
            left = len(pending_ranges(connection, run_id))
        if left:
            raise BackfillWorkerError(
                f"{len(failed)} of {summary.workers} backfill workers failed (exit codes "
                f"{', '.join(map(str, failed))}) and {left} batches are left; run "
                "`orch-migrate backfill` again to finish: it carries on with them"
            )
    total_from_ledger(run.engine, run_id, summary)
    report()


def _worker(config: dict[str, Any]) -> int:
    settings = get_settings().with_(
        migration_lock_timeout_ms=config["lock_timeout_ms"],
        migration_statement_timeout_ms=config["statement_timeout_ms"],
    )
    options = BackfillOptions(
        projects=tuple(config["projects"]),
        match_existing=config["match_existing"],
        max_retries=config["max_retries"],
        batch_size=config["batch_size"],
        sleep_ms=config["sleep_ms"],
        min_batch_size=config["min_batch_size"],
        target_batch_ms=config["target_batch_ms"],
        max_errors=config["max_errors"],
        retry_quarantined=config["retry_quarantined"],
    )
    base = make_engine(config["url"])
    # Every query of the worker waits for locks as the planning process's do (bounded).
    engine = tag_connections(
        bounded_waits(
            base, settings.migration_lock_timeout_ms, settings.migration_statement_timeout_ms
        ),
        application_name(config["run_id"]),
    )
    try:
        with connect(engine) as connection:
            scope = BackfillScope.of(connection, options)
        run = BackfillRun(
            engine,
            settings,
            options,
            scope,
            config["run_id"],
            BackfillSummary(config["run_id"], False, scope.slugs, 0),
            matcher=matcher_for(engine, options, scope),
        )
        _claim_loop(run, Steering(run, leader=False), parent=config["parent"])
    finally:
        base.dispose()
    return 0
