"""A backfill's records in the migration ledger: its batches (``migration_batches``: each
checkpoint, planned range and its status), where an interrupted run resumes, and the figures a
run totals from them."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from prompt_tool.db.dialect import transaction_began, wall_clock
from prompt_tool.db.engine import Connectable, begin, connect
from prompt_tool.db.models import MigrationBatch, MigrationRun
from prompt_tool.migrate.backfill.types import (
    UNREADABLE_NAMED,
    BackfillSummary,
    BatchResult,
    PlannedBatch,
)
from prompt_tool.migrate.runs import MigrationRunStatus, RunKind

__all__ = [
    "CHECKPOINT_FIELDS",
    "BatchStatus",
    "batches_done",
    "complete_planned",
    "live_state",
    "pending_ranges",
    "publish_live",
    "record_checkpoint",
    "resume_point",
    "summary_dict",
    "total_from_ledger",
    "untrusted_checkpoint",
]


class BatchStatus(enum.StrEnum):
    """A ``migration_batches`` row's status."""

    PENDING = "pending"  # a planned range (--workers) not done yet: a later run carries it on
    DONE = "done"  # committed with the batch it records


# A run of these statuses, the latest of its scope, is resumed (see resume_point).
_RESUMABLE = (
    MigrationRunStatus.RUNNING.value,
    MigrationRunStatus.INTERRUPTED.value,
    MigrationRunStatus.FAILED.value,
    MigrationRunStatus.ABANDONED.value,
    MigrationRunStatus.CANCELLED.value,
)


def resume_point(connection: Connection, scope_key: str) -> tuple[int | None, int | None]:
    """The last checkpoint of an interrupted run of the same scope, and that run's id.

    The latest run of the scope is resumed when it was interrupted (Ctrl-C, SIGTERM), abandoned
    (its process killed, see :func:`~prompt_tool.migrate.runs.reap_dead_runs`), failed
    (a lock held past the retries, a lost connection: its checkpoints are committed batches,
    each one whole, so what they cover stands), or is
    still marked running: we hold the scope's locks, so such a run is a dead one (SIGKILL, a
    crash), and it is marked interrupted now. Once resumed it is no longer the latest run of the
    scope, so it is resumed once. A run that resumed another and was interrupted before its first
    checkpoint carries on from where that one had got to.
    """
    latest = connection.execute(
        select(MigrationRun.id, MigrationRun.status, MigrationRun.params)
        .where(
            MigrationRun.kind == RunKind.BACKFILL.value,
            MigrationRun.params["scope"].as_string() == scope_key,
        )
        .order_by(MigrationRun.id.desc())
        .limit(1)
    ).first()
    if latest is None or latest.status not in _RESUMABLE:
        return None, None
    run = int(latest.id)
    last = connection.execute(
        select(func.max(MigrationBatch.key_hi)).where(
            MigrationBatch.run_id == run, MigrationBatch.status == BatchStatus.DONE.value
        )
    ).scalar()
    earlier = (latest.params or {}).get("resumed_after")
    if last is None and isinstance(earlier, int):
        last = earlier
    if latest.status == MigrationRunStatus.RUNNING.value:
        connection.execute(
            update(MigrationRun)
            .where(MigrationRun.id == run)
            .values(status=MigrationRunStatus.INTERRUPTED.value, finished_at=func.now())
        )
    return last, run


def pending_ranges(connection: Connection, run_id: int | None) -> list[tuple[int, int]]:
    """The key ranges a planned run left undone (none for an unplanned run)."""
    if run_id is None:
        return []
    return [
        (int(lo), int(hi))
        for lo, hi in connection.execute(
            select(MigrationBatch.key_lo, MigrationBatch.key_hi)
            .where(
                MigrationBatch.run_id == run_id, MigrationBatch.status == BatchStatus.PENDING.value
            )
            .order_by(MigrationBatch.key_lo)
        )
    ]


def _batch_counts(result: BatchResult) -> dict[str, Any]:
    return {
        "created": result.created,
        "matched": result.matched,
        "relinked": result.relinked,
        "removed": result.removed,
        "unchanged": result.unchanged,
        "templates": result.templates,
        "unreadable": len(result.unreadable_rows),
        # The first few, for the run's summary to name (a planned run totals from here).
        "unreadable_rows": [list(row) for row in result.unreadable_rows[:UNREADABLE_NAMED]],
        "quarantined": result.quarantined,
        **(result.notes.as_counts() if result.notes is not None else {}),
    }


def record_checkpoint(
    connection: Connection, run_id: int, after: int, result: BatchResult, checksum: str
) -> None:
    """The checkpoint of an unplanned batch, (after, result.last_id], in its own transaction."""
    connection.execute(
        insert(MigrationBatch).values(
            run_id=run_id,
            key_lo=after,
            key_hi=result.last_id,
            status=BatchStatus.DONE.value,
            rows_seen=result.sessions,
            counts=_batch_counts(result),
            checksum=checksum,
            started_at=transaction_began(),
            finished_at=wall_clock(),
        )
    )


def complete_planned(
    connection: Connection, planned: PlannedBatch, result: BatchResult, checksum: str
) -> None:
    """Mark a claimed planned batch done, in the batch's own transaction.

    ``started_at`` becomes the transaction's start (``now()``) and ``finished_at`` the wall
    clock, as for an unplanned checkpoint: their difference is how long the batch held locks.
    A batch the controller made smaller than its range (``result.last_id`` short of the range's
    end) is done up to there; the rest becomes a pending range of its own.
    """
    if result.last_id < planned.key_hi:
        connection.execute(
            insert(MigrationBatch).values(
                run_id=planned.run_id,
                key_lo=result.last_id,
                key_hi=planned.key_hi,
                status=BatchStatus.PENDING.value,
                rows_seen=0,
            )
        )
    connection.execute(
        update(MigrationBatch)
        .where(MigrationBatch.id == planned.batch_id)
        .values(
            key_hi=min(result.last_id, planned.key_hi),
            status=BatchStatus.DONE.value,
            rows_seen=result.sessions,
            counts=_batch_counts(result),
            checksum=checksum,
            claimed_by=planned.worker,
            started_at=transaction_began(),
            finished_at=wall_clock(),
        )
    )


def batches_done(engine: Connectable, run_id: int) -> tuple[int, int]:
    """(sessions, batches) the run's workers have done so far, from its ledger."""
    with connect(engine) as connection:
        sessions, batches = connection.execute(
            select(func.coalesce(func.sum(MigrationBatch.rows_seen), 0), func.count()).where(
                MigrationBatch.run_id == run_id,
                MigrationBatch.status == BatchStatus.DONE.value,
            )
        ).one()
    return int(sessions), int(batches)


def total_from_ledger(engine: Connectable, run_id: int, summary: BackfillSummary) -> None:
    """The run's figures from its ledger: every worker's batches, not only ours."""
    summary.batches = 0
    summary.sessions_scanned = 0
    summary.unreadable = 0
    summary.unreadable_rows.clear()
    summary.quarantined = 0
    with connect(engine) as connection:
        rows = connection.execute(
            select(MigrationBatch.rows_seen, MigrationBatch.counts).where(
                MigrationBatch.run_id == run_id,
                MigrationBatch.status == BatchStatus.DONE.value,
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
        summary.quarantined += int(counts.get("quarantined", 0))
        summary.note_unreadable(int(counts.get("unreadable", 0)), counts.get("unreadable_rows", []))


def summary_dict(summary: BackfillSummary) -> dict[str, Any]:
    """What the run's ledger row keeps of its summary."""
    return {
        "batches": summary.batches,
        "sessions_scanned": summary.sessions_scanned,
        "total": summary.total,
        "references_created": summary.references_created,
        "references_matched": summary.references_matched,
        "references_relinked": summary.references_relinked,
        "references_removed": summary.references_removed,
        "templates_created": summary.templates_created,
        "templates_adopted": summary.templates_adopted,
        "unreadable": summary.unreadable,
        "unreadable_rows": summary.unreadable_rows,
        "quarantined": summary.quarantined,
        "retried": summary.retried,
        "statistics_refreshed": summary.statistics_refreshed,
        "elapsed_s": round(summary.elapsed_s, 3),
        "batch_size": summary.batch_size,
        "waited_s": round(summary.waited_s, 3),
        "waited_for": summary.waited_for,
        "cancelled_by": summary.cancelled_by,
        "restarted": summary.restarted,
    }


def publish_live(engine: Connectable, run_id: int, live: Mapping[str, Any]) -> None:
    """Show the running run's state (``summary["live"]``) to ``status`` and its workers, in a
    short transaction of its own; the run's final summary replaces it."""
    with begin(engine) as connection:
        connection.execute(
            update(MigrationRun)
            .where(
                MigrationRun.id == run_id,
                MigrationRun.status == MigrationRunStatus.RUNNING.value,
            )
            .values(summary={"live": dict(live)})
        )


def live_state(connection: Connection, run_id: int) -> dict[str, Any]:
    """What the run's planning process last published (empty before it did)."""
    summary = connection.execute(
        select(MigrationRun.summary).where(MigrationRun.id == run_id)
    ).scalar()
    live = summary.get("live") if isinstance(summary, dict) else None
    return dict(live) if isinstance(live, dict) else {}


# What a checkpoint is only good for: a run recorded with other values starts over.
CHECKPOINT_FIELDS = ("revision", "code_version", "match_existing")
# What a verify counts that a walk past the checkpoint would not repair.
_VERIFY_FAULTS = ("mismatched", "render_errors", "stale")


def untrusted_checkpoint(
    connection: Connection, resumed_run: int, checkpoint: Mapping[str, Any]
) -> str | None:
    """Why the checkpoint of ``resumed_run`` must not be trusted by a run recorded with
    ``checkpoint`` (its revision, code version and options), or None: it was made under another
    schema revision, by another version of this tool, with other options, or a verify after it
    found sessions linked wrong (a resume would walk past them)."""
    params = connection.execute(
        select(MigrationRun.params).where(MigrationRun.id == resumed_run)
    ).scalar()
    recorded = params.get("checkpoint") if isinstance(params, dict) else None
    recorded = recorded if isinstance(recorded, dict) else {}
    for name in CHECKPOINT_FIELDS:
        if recorded.get(name) != checkpoint.get(name):
            return (
                f"run {resumed_run}'s checkpoint was made with {name.replace('_', ' ')} "
                f"{recorded.get(name)!r}, this run has {checkpoint.get(name)!r}"
            )
    verifies = connection.execute(
        select(MigrationRun.id, MigrationRun.summary)
        .where(
            MigrationRun.kind == RunKind.VERIFY.value,
            MigrationRun.id > resumed_run,
            MigrationRun.status == MigrationRunStatus.COMPLETED.value,
        )
        .order_by(MigrationRun.id)
    ).all()
    for verify_id, summary in verifies:
        faults = _verify_faults(summary)
        if faults:
            return f"verify run {verify_id} found {faults} after run {resumed_run}'s checkpoint"
    return None


def _verify_faults(summary: Any) -> str:
    if not isinstance(summary, dict) or summary.get("passed", True):
        return ""
    totals = dict.fromkeys(_VERIFY_FAULTS, 0)
    for counts in (summary.get("projects") or {}).values():
        for name in _VERIFY_FAULTS:
            totals[name] += int((counts or {}).get(name, 0) or 0)
    corrupted = len(summary.get("corrupted_versions") or [])
    found = [f"{count:,} {name.replace('_', ' ')}" for name, count in totals.items() if count]
    if corrupted:
        found.append(f"{corrupted:,} corrupted versions")
    return ", ".join(found)
