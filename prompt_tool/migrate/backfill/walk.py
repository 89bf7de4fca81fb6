"""The keyset walk of a single-process backfill, and the retries every batch transaction gets:
batches follow the primary key from the run's start to its upper bound, each in one short
transaction whose size adapts to keep it near the target time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from prompt_tool.db.dialect import is_lock_timeout, is_retryable
from prompt_tool.db.engine import Connectable, begin
from prompt_tool.errors import LockTimeoutError, PromptToolError
from prompt_tool.migrate.backfill.batch import WRITTEN_TABLES, ImportedVersions, KeySpan, run_batch
from prompt_tool.migrate.backfill.types import (
    BackfillOptions,
    BackfillRun,
    BackfillSummary,
    BatchResult,
)
from prompt_tool.migrate.lock_waits import lock_wait_error

__all__ = ["retrying", "walk", "with_retries"]

_T = TypeVar("_T")
_MIN_BATCH = 50
_FIRST_BATCH = 200
# Every table a run reads or writes: where a lock that outlasted the retries is looked for.
_TOUCHED_TABLES = (
    "orchestration_sessions",
    "projects",
    *WRITTEN_TABLES,
    "prompt_labels",
    "migration_runs",
    "migration_batches",
)


def walk(run: BackfillRun) -> None:
    """Walk ``run``'s keys in batches, from ``run.after`` to ``run.upper`` (or ``--limit``)."""
    options, summary = run.options, run.summary
    # Start small and grow: the first batches import the most templates, so a full-size first
    # batch would be the longest lock of the run.
    size = min(options.batch_size, _FIRST_BATCH)
    after = run.after
    imported = ImportedVersions()
    while options.limit is None or summary.sessions_scanned < options.limit:
        if options.limit is not None:
            size = min(size, options.limit - summary.sessions_scanned)
        span = KeySpan(after, run.upper, size)

        def batch(connection: Connection, span: KeySpan = span) -> BatchResult | None:
            return run_batch(connection, run, span, imported)

        result = with_retries(run, batch)
        if result is None:
            break
        size = next_batch_size(size, summary.batch_seconds[-1], options)
        after = result.last_id
        summary.add(result)
        run.report(summary.sessions_scanned, summary.batches)
        if options.sleep_ms:
            time.sleep(options.sleep_ms / 1000)


def next_batch_size(size: int, seconds: float, options: BackfillOptions) -> int:
    """Keep each batch's transaction near the target: halve after a slow one, grow back after
    fast ones, never above --batch-size. Locks stay short whatever the texts cost to import."""
    target = options.target_batch_ms / 1000
    if seconds > target:
        return max(_MIN_BATCH, size // 2)
    if seconds < target / 2:
        return min(options.batch_size, size * 2)
    return size


def with_retries(
    run: BackfillRun, work: Callable[[Connection], BatchResult | None]
) -> BatchResult | None:
    """One batch in one short transaction (rolled back in a dry run), retried as
    :func:`retrying` does; its time, from the attempt that succeeded, steers the batch size."""
    attempt_began = time.perf_counter()

    def timed(connection: Connection) -> BatchResult | None:
        nonlocal attempt_began
        attempt_began = time.perf_counter()
        return work(connection)

    result = retrying(run.engine, run.options, run.summary, timed, rollback=run.options.dry_run)
    run.summary.batch_seconds.append(time.perf_counter() - attempt_began)
    return result


def retrying(
    engine: Connectable,
    options: BackfillOptions,
    summary: BackfillSummary | None,
    work: Callable[[Connection], _T],
    *,
    rollback: bool,
) -> _T:
    """``work`` in one short transaction; lock timeouts and deadlocks roll it back and retry
    with backoff. Past the last retry: :class:`LockTimeoutError`, saying what waited, who held
    the lock, what stands, and that a re-run carries on. ``summary``: the run's, counting the
    retries (None before the run starts)."""
    attempt = 0
    first_began = time.monotonic()
    while True:
        try:
            with begin(engine) as connection:
                result = work(connection)
                if rollback:
                    connection.rollback()
            return result
        except DBAPIError as error:
            if not is_retryable(error):
                raise
            if attempt >= options.max_retries:
                waited = time.monotonic() - first_began
                raise _gave_up(engine, error, attempt + 1, waited, summary) from None
            attempt += 1
            if summary is not None:
                summary.retried += 1
            # Exponential backoff with a cap: let the lock holder finish before trying again.
            time.sleep(min(2.0, 0.05 * 2**attempt))


def _gave_up(
    engine: Connectable,
    error: DBAPIError,
    attempts: int,
    waited_s: float,
    summary: BackfillSummary | None,
) -> PromptToolError:
    if summary is None or not summary.batches:
        stands = "nothing was written"
    else:
        batches = "the batch" if summary.batches == 1 else f"the {summary.batches:,} batches"
        stands = (
            f"{batches} before it ({summary.sessions_scanned:,} sessions) "
            f"{'is' if summary.batches == 1 else 'are'} committed and a rerun carries on from "
            "its last checkpoint"
        )
    if not is_lock_timeout(error):  # a deadlock, every time
        return LockTimeoutError(
            f"backfill gave up after {attempts} attempts in {waited_s:.1f} s: each was chosen "
            f"as a deadlock victim; {stands}; run the same command again"
        )
    return lock_wait_error(
        engine, "backfill", _TOUCHED_TABLES, stands=stands, attempts=attempts, waited_s=waited_s
    )
