"""`orch-migrate backfill --estimate`: what a run would cost, measured, before it runs.

A few sample batches spread over the run's key range each run for real, imports and links
included, inside a transaction that is then rolled back: nothing they wrote stays (only their
WAL and dead rows, as any rolled-back write leaves). Each sample gives its time, the sessions it
walked, the WAL it wrote (PostgreSQL) and the templates it imported. The projection:

- duration: the run's sessions at the samples' time per session, plus the templates the run
  creates at the samples' time per template (a sample imports every distinct text it meets; the
  run imports each text once, the first time it meets it);
- WAL volume in the same way;
- templates to create: the distinct legacy texts of the scope without an imported template yet
  (one aggregate over the scope);
- lock hold per batch: the batch the controller settles on (the size that takes 90% of
  ``--target-ms``, within its bounds) at the samples' time per session.

The range says how far the samples spread: the slowest and the fastest sample's rates.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from sqlalchemy import Connection, delete, func, select

from prompt_tool.db.dialect import sha256_hex, wal_insert_position
from prompt_tool.db.engine import Connectable, begin, bounded_waits, connect
from prompt_tool.db.models import OrchestrationSession, Prompt, PromptRole, SessionPromptRef
from prompt_tool.db.revision_guard import require_known_revision
from prompt_tool.db.revisions import QUARANTINE
from prompt_tool.migrate.backfill.batch import IMPORTED_PREFIX, ImportedVersions, KeySpan, run_batch
from prompt_tool.migrate.backfill.steering import FIRST_BATCH
from prompt_tool.migrate.backfill.types import (
    BackfillOptions,
    BackfillRun,
    BackfillScope,
    BackfillSummary,
    BatchResult,
)
from prompt_tool.migrate.backfill.walk import refresh_stale_statistics
from prompt_tool.settings import Settings, get_settings

__all__ = ["SAMPLES", "BackfillEstimate", "estimate"]

SAMPLES = 5
_SESSIONS = OrchestrationSession.__table__


@dataclass(frozen=True, slots=True)
class _Sample:
    """One sample batch, run twice in its transaction: first as the run would meet it
    (importing its texts and linking), then again with its references removed and its
    templates there (linking only). The difference is what its imports cost."""

    sessions: int
    templates: int
    seconds: float  # importing and linking
    link_seconds: float  # linking only
    wal_bytes: int | None
    link_wal_bytes: int | None

    @property
    def import_seconds(self) -> float:
        return max(0.0, self.seconds - self.link_seconds)


@dataclass(frozen=True, slots=True)
class BackfillEstimate:
    """What a backfill of the scope would take, projected from rolled-back sample batches."""

    projects: list[str]
    sessions: int  # the run would walk
    samples: int
    sampled_sessions: int
    duration_s: float
    duration_low_s: float
    duration_high_s: float
    templates: int  # the run would create
    wal_bytes: int | None  # None: not measurable here (SQLite)
    batch_size: int  # what the controller would settle on
    lock_hold_ms: float  # one batch's transaction at that size
    elapsed_s: float  # what the estimate itself took

    def describe(self) -> str:
        if not self.sessions:
            return "backfill estimate: nothing to walk (no session in the scope)"
        wal = "" if self.wal_bytes is None else f", WAL about {_size(self.wal_bytes)}"
        span = (
            f"about {_duration(self.duration_s)} ({_duration(self.duration_low_s)} to "
            f"{_duration(self.duration_high_s)})"
            if self.duration_high_s >= 1
            else "under 1s"
        )
        return (
            f"backfill estimate: {self.sessions:,} sessions, {span} without "
            f"waits, {self.templates:,} templates to create{wal}; batches of about "
            f"{self.batch_size:,} holding locks about {self.lock_hold_ms:,.0f} ms each; from "
            f"{self.samples} sample batches ({self.sampled_sessions:,} sessions) rolled back, "
            f"in {self.elapsed_s:.1f}s; nothing was written"
        )


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1s"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count //= 1024
    raise AssertionError("unreachable")


def _templates_to_create(connection: Connection, scope: BackfillScope) -> int:
    """Distinct (project, role, text) of the scope, less the imported templates already there."""
    distinct = 0
    for role in PromptRole:
        column = _SESSIONS.c[role.legacy_column]
        texts = (
            select(_SESSIONS.c.project_id, sha256_hex(column).label("digest"))
            .where(scope.sessions(), column.is_not(None))
            .distinct()
            .subquery()
        )
        distinct += int(connection.execute(select(func.count()).select_from(texts)).scalar_one())
    imported = select(func.count()).where(Prompt.name.startswith(IMPORTED_PREFIX))
    if scope.scoped:
        imported = imported.where(Prompt.project_id.in_(scope.project_ids))
    return max(0, distinct - int(connection.execute(imported).scalar_one()))


def _timed(
    connection: Connection, run: BackfillRun, span: KeySpan
) -> tuple[BatchResult | None, float, int | None]:
    """One batch in ``connection``'s transaction: its result, time and WAL."""
    wal_before = wal_insert_position(connection)
    began = time.perf_counter()
    result = run_batch(connection, run, span, ImportedVersions())
    seconds = time.perf_counter() - began
    wal_after = wal_insert_position(connection)
    wal = None if wal_before is None or wal_after is None else wal_after - wal_before
    return result, seconds, wal


def _sample(run: BackfillRun, after: int, size: int) -> _Sample | None:
    """One batch after ``after``, for real, twice (see :class:`_Sample`), rolled back."""
    span = KeySpan(after, run.upper, size)
    with begin(run.engine) as connection:
        result, seconds, wal = _timed(connection, run, span)
        if result is None or not result.sessions:
            connection.rollback()
            return None
        connection.execute(
            delete(SessionPromptRef).where(
                SessionPromptRef.session_id > after, SessionPromptRef.session_id <= result.last_id
            )
        )
        _, link_seconds, link_wal = _timed(connection, run, span)
        connection.rollback()
    return _Sample(result.sessions, result.templates, seconds, link_seconds, wal, link_wal)


def _count(connection: Connection, scope: BackfillScope) -> int:
    counted = select(func.count()).select_from(_SESSIONS).where(scope.sessions())
    return int(connection.execute(counted).scalar_one())


def _starts(connection: Connection, scope: BackfillScope, total: int, count: int) -> list[int]:
    """Keys spread evenly over the scope's sessions: each sample walks from one of them."""
    starts: list[int] = []
    for index in range(count):
        offset = total * index // count
        if offset == 0:
            starts.append(0)
            continue
        key = connection.execute(
            select(_SESSIONS.c.id)
            .where(scope.sessions())
            .order_by(_SESSIONS.c.id)
            .offset(offset - 1)
            .limit(1)
        ).scalar()
        if key is not None:
            starts.append(int(key))
    return sorted(set(starts))


def estimate(
    engine: Connectable, options: BackfillOptions | None = None, settings: Settings | None = None
) -> BackfillEstimate:
    """Project a backfill of ``options``' scope from :data:`SAMPLES` rolled-back batches."""
    require_known_revision(engine, "backfill --estimate", needs=QUARANTINE)
    options = dataclasses.replace(options or BackfillOptions(), dry_run=False)
    settings = settings or get_settings()
    began = time.monotonic()
    engine = bounded_waits(
        engine, settings.migration_lock_timeout_ms, settings.migration_statement_timeout_ms
    )
    # As the run does: batches planned for tables never analysed cost many times more.
    refresh_stale_statistics(engine)
    with connect(engine) as connection:
        scope = BackfillScope.of(connection, options)
        upper = int(
            connection.execute(
                select(func.coalesce(func.max(_SESSIONS.c.id), 0)).where(scope.sessions())
            ).scalar_one()
        )
        sessions = _count(connection, scope)
        starts = _starts(connection, scope, sessions, SAMPLES)
        templates = _templates_to_create(connection, scope)
    run = BackfillRun(
        engine,
        settings,
        options,
        scope,
        None,
        BackfillSummary(None, False, scope.slugs, upper),
        upper=upper,
    )
    # Samples of the size the run settles near, apart: never more than the scope's share.
    size = max(1, min(options.batch_size, FIRST_BATCH * 5, -(-sessions // SAMPLES)))
    samples = [sample for after in starts if (sample := _sample(run, after, size)) is not None]
    return _project(
        _Projection(scope.slugs, sessions, templates, samples, options),
        time.monotonic() - began,
    )


@dataclass(frozen=True, slots=True)
class _Projection:
    projects: list[str]
    sessions: int
    templates: int
    samples: list[_Sample]
    options: BackfillOptions


def _project(projection: _Projection, elapsed_s: float) -> BackfillEstimate:
    samples, options = projection.samples, projection.options
    walked = sum(sample.sessions for sample in samples)
    if not walked:
        return BackfillEstimate(
            projection.projects, 0, 0, 0, 0.0, 0.0, 0.0, 0, None, 0, 0.0, elapsed_s
        )
    imported = sum(sample.templates for sample in samples)
    link_s = sum(sample.link_seconds for sample in samples) / walked  # per session
    import_s = sum(sample.import_seconds for sample in samples) / imported if imported else 0.0
    imports = projection.templates * import_s
    duration = projection.sessions * link_s + imports
    # The range: the slowest and the fastest sample's linking, imports as measured.
    rates = [sample.link_seconds / sample.sessions for sample in samples]
    low = projection.sessions * min(rates) + imports
    high = projection.sessions * max(rates) + imports
    return BackfillEstimate(
        projection.projects,
        projection.sessions,
        len(samples),
        walked,
        duration,
        low,
        high,
        projection.templates,
        _projected_wal(projection, walked, imported),
        *_settled_batch(options, projection.sessions, link_s),
        elapsed_s,
    )


def _projected_wal(projection: _Projection, walked: int, imported: int) -> int | None:
    """WAL per linked session and per imported template, at the run's counts."""
    samples = projection.samples
    if any(s.wal_bytes is None or s.link_wal_bytes is None for s in samples):
        return None
    link_wal = sum(int(s.link_wal_bytes or 0) for s in samples) / walked
    import_wal = sum(max(0, int(s.wal_bytes or 0) - int(s.link_wal_bytes or 0)) for s in samples)
    per_import = import_wal / imported if imported else 0.0
    return int(projection.sessions * link_wal + projection.templates * per_import)


def _settled_batch(
    options: BackfillOptions, sessions: int, per_session_s: float
) -> tuple[int, float]:
    """The batch size the controller settles on (90% of the target, within its bounds, at most
    the run's sessions) and how long one such batch holds its locks, in ms."""
    target = options.target_batch_ms / 1000 * 0.9
    settled = int(target / per_session_s) if per_session_s > 0 else options.batch_size
    settled = min(sessions, max(options.smallest_batch, min(options.batch_size, settled)))
    return settled, settled * per_session_s * 1000
