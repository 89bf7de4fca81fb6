"""The keyset walk of a single-process backfill: batches follow the primary key from the run's
start to its upper bound, each in one short transaction, under the run's control loop
(:mod:`.steering`: the batch size steered toward the target time, waits while throttled,
paused or outside the window, a cancel between batches)."""

from __future__ import annotations

import time

from sqlalchemy import Connection

from prompt_tool.db.dialect import refresh_statistics, stale_statistics
from prompt_tool.db.engine import Connectable, begin
from prompt_tool.migrate.backfill.batch import WRITTEN_TABLES, ImportedVersions, KeySpan, run_batch
from prompt_tool.migrate.backfill.quarantine import check_error_budget
from prompt_tool.migrate.backfill.steering import Steering
from prompt_tool.migrate.backfill.types import BackfillRun, BatchResult

__all__ = ["refresh_stale_statistics", "walk"]

_PLANNED_TABLES = ("orchestration_sessions", *WRITTEN_TABLES)


def walk(run: BackfillRun, steering: Steering) -> None:
    """Walk ``run``'s keys in batches, from ``run.after`` to ``run.upper`` (or ``--limit``),
    until done or cancelled (``steering.cancelled_by`` then says who)."""
    options, summary = run.options, run.summary
    after = run.after
    imported = ImportedVersions()
    while options.limit is None or summary.sessions_scanned < options.limit:
        if not steering.gate():
            return
        cap = None if options.limit is None else options.limit - summary.sessions_scanned

        def batch(connection: Connection, size: int, after: int = after) -> BatchResult | None:
            return run_batch(connection, run, KeySpan(after, run.upper, size), imported)

        result = steering.attempt(batch, cap)
        if result is None:
            break
        after = result.last_id
        summary.add(result)
        steering.report(summary.sessions_scanned, summary.batches)
        check_error_budget(run, summary)
        if options.sleep_ms:
            time.sleep(options.sleep_ms / 1000)


def refresh_stale_statistics(engine: Connectable) -> list[str]:
    """``ANALYZE`` the tables the walk plans over when the planner knows nothing (or little)
    about them, as after a bulk load: its batch queries follow the primary key whatever the
    statistics (see :meth:`BackfillScope.sessions`), but its reference and template lookups are
    planned too. Best effort: without the privilege, or behind a lock, it goes on without."""
    with begin(engine) as connection:
        stale = stale_statistics(connection, _PLANNED_TABLES)
        if stale and refresh_statistics(connection, stale):
            return stale
    return []
