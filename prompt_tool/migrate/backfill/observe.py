"""Seeing a backfill run from anywhere: its figures read from the ledger alone.

:func:`observe` turns one run's ledger rows (``migration_runs`` and its ``migration_batches``)
into a :class:`RunView`: where the run is (live, finished, interrupted, dead; and while live what
its controller is doing, from ``summary["live"]``), sessions done of the total, rows per second
over the last minute, an ETA with a range, the batch size, why it waits, the lock hold p50/p99,
retries, errors and quarantined rows. :func:`recent_backfills` gives the running runs and the
latest ones; ``orch-migrate status --watch``, ``status --json``, the backfill's own progress bar
and the Prometheus text file (:func:`write_metrics`, :class:`MetricsWriter`) all show these.

Reading is cheap at any size: one aggregate and one query of at most :data:`SAMPLED_BATCHES`
rows, both on the ``(run_id, key_lo)`` unique index; percentiles are computed here.

Time waited (throttled, paused, outside the window: each batch's ``counts["waited_ms"]``) is
left out of every rate, so an ETA is the time the run still has to *work*: a waiting run's ETA
says so (:data:`EXCLUDES_WAITING`).
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Select, func, inspect, or_, select

from prompt_tool.db.dialect import wall_clock
from prompt_tool.db.engine import connect
from prompt_tool.db.models import MigrationBatch, MigrationQuarantine, MigrationRun
from prompt_tool.errors import InvalidInputError
from prompt_tool.migrate.backfill.ledger import BatchStatus
from prompt_tool.migrate.runs import MigrationRunStatus, RunKind, RunState, dead_runs, life_of

__all__ = [
    "EXCLUDES_WAITING",
    "SAMPLED_BATCHES",
    "WAITING_STATES",
    "MetricsWriter",
    "RunView",
    "check_metrics_path",
    "eta_range",
    "metrics_text",
    "observe",
    "percentile",
    "recent_backfills",
    "sampled_batches_query",
    "server_now",
    "write_metrics",
]

# The latest batches a view reads (rate, ETA spread, lock hold percentiles): bounded, so a view
# of a run of a million sessions costs what one of a thousand does.
SAMPLED_BATCHES = 1000
# Rows per second are measured over the batches that finished in this last stretch.
_RATE_WINDOW = timedelta(seconds=60)
# When none finished in it (a run paused for minutes), the ETA uses the last few batches.
_RECENT_FALLBACK = 20
# The ETA range is at least this much either side of the estimate (the spread of per-batch
# throughput widens it); wider while few batches have been seen.
_BAND = 0.2
_BAND_FEW = 0.5
_FEW_BATCHES = 5
# ETAs are shown to the second: the range is widened by this much at either end.
_ETA_SLACK_S = 1.0
# Rows and imports are told apart only when they do not move in step (1 - correlation^2).
_DISTINCT = 0.05
# The live states in which the run waits instead of working.
WAITING_STATES = frozenset({"throttled", "paused", "outside window"})
EXCLUDES_WAITING = "ETA excludes waiting"
_QUARANTINE_TABLE = MigrationQuarantine.__tablename__
_ALL = "*"


@dataclass(frozen=True, slots=True)
class RunView:
    """One backfill run as its ledger shows it (see the module). Times in seconds; ``None``
    where the ledger does not tell (no batches yet, a total never recorded)."""

    run_id: int
    scope: str  # the projects it walks, comma-separated, or "all"
    status: str  # as stored; "abandoned" for a run marked running whose process is gone
    state: str  # live / finished / interrupted / dead (RunState)
    reason: str  # why it is in that state (RunLife.reason)
    # While live: working / throttled / paused / outside window / cancelling; and why it waits.
    activity: str | None
    throttle_reason: str | None
    done: int
    total: int | None
    batches: int
    # Over the batches that finished in the last minute (of the run, for one that ended).
    rows_per_second: float | None
    eta_s: float | None
    eta_low_s: float | None
    eta_high_s: float | None
    eta_note: str | None  # EXCLUDES_WAITING while the run waits
    batch_size: int | None
    hold_p50_ms: float | None
    hold_p99_ms: float | None
    retries: int  # batch attempts retried (lock or statement timeouts, lost serialisations)
    errors: int  # errors the run met, as it counts them (at least its retries)
    quarantined: int
    waited_s: float  # all the time the run waited (throttled, paused, outside its window)
    workers: int
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None  # how a failed run failed
    updated_at: str | None  # when the live state was last written (ISO 8601 UTC)

    @property
    def live(self) -> bool:
        return self.state == RunState.LIVE.value

    @property
    def waiting(self) -> bool:
        """Whether the live run waits (throttled, paused, outside its window)."""
        return self.live and self.activity in WAITING_STATES

    @property
    def remaining(self) -> int | None:
        return None if self.total is None else max(0, self.total - self.done)


def server_now(connection: Connection) -> datetime:
    """The database server's clock (UTC): what the ledger's timestamps are measured against."""
    return _utc(connection.execute(select(wall_clock())).scalar_one())


def _utc(value: Any) -> datetime:
    if isinstance(value, str):  # SQLite may hand a timestamp back as its text
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"not a timestamp: {value!r}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The ``fraction`` (0..1) percentile of ``values``, interpolated between the two nearest
    ranks (as numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * min(max(fraction, 0.0), 1.0)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True, slots=True)
class _Batch:
    rows: int
    started: datetime | None
    finished: datetime
    hold_s: float | None
    waited_s: float
    size: int | None
    templates: int = 0  # imported by the batch


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _batch(rows_seen: Any, counts: Any, started_at: Any, finished_at: Any) -> _Batch | None:
    if finished_at is None:
        return None
    counts = counts if isinstance(counts, dict) else {}
    finished = _utc(finished_at)
    started = _utc(started_at) if started_at is not None else None
    hold_ms = _number(counts.get("hold_ms"))
    hold_s = hold_ms / 1000 if hold_ms is not None else None
    if hold_s is None and started is not None and finished >= started:
        hold_s = (finished - started).total_seconds()
    size = _number(counts.get("size"))
    return _Batch(
        rows=int(rows_seen or 0),
        started=started,
        finished=finished,
        hold_s=hold_s,
        waited_s=(_number(counts.get("waited_ms")) or 0.0) / 1000,
        size=None if size is None else int(size),
        templates=int(_number(counts.get("templates")) or 0),
    )


def sampled_batches_query(run_id: int) -> Select[Any]:
    """The run's latest done batches, at most SAMPLED_BATCHES: a backward scan of the
    ``(run_id, key_lo)`` unique index (a walk, and its workers, finish batches in key order)."""
    return (
        select(
            MigrationBatch.rows_seen,
            MigrationBatch.counts,
            MigrationBatch.started_at,
            MigrationBatch.finished_at,
        )
        .where(MigrationBatch.run_id == run_id, MigrationBatch.status == BatchStatus.DONE.value)
        .order_by(MigrationBatch.key_lo.desc())
        .limit(SAMPLED_BATCHES)
    )


def _sampled_batches(connection: Connection, run_id: int) -> list[_Batch]:
    """The run's latest done batches, in the order they finished."""
    rows = connection.execute(sampled_batches_query(run_id)).all()
    batches = [batch for row in rows if (batch := _batch(*row)) is not None]
    return sorted(batches, key=lambda batch: batch.finished)


@dataclass(frozen=True, slots=True)
class _Totals:
    batches: int = 0
    rows: int = 0
    retries: int = 0
    quarantined: int = 0
    waited_s: float = 0.0


def _totals(connection: Connection, run_id: int) -> _Totals:
    """The run's whole-ledger sums: one aggregate over its done batches."""
    counts = MigrationBatch.counts
    row = connection.execute(
        select(
            func.count(),
            func.coalesce(func.sum(MigrationBatch.rows_seen), 0),
            func.coalesce(func.sum(counts["retries"].as_integer()), 0),
            func.coalesce(func.sum(counts["quarantined"].as_integer()), 0),
            func.coalesce(func.sum(counts["waited_ms"].as_float()), 0.0),
        ).where(MigrationBatch.run_id == run_id, MigrationBatch.status == BatchStatus.DONE.value)
    ).one()
    return _Totals(int(row[0]), int(row[1]), int(row[2]), int(row[3]), float(row[4]) / 1000)


def _active_seconds(batches: Sequence[_Batch], workers: int) -> float:
    """The time ``batches`` (in finishing order) took, waits between them left out.

    From the first one's start to the last one's end, less what the run waited before each but
    the first (the first one's wait lies before the span); with several workers their waits
    overlap, so a share of them. Never less than the batches' own transactions took.
    """
    first = min((batch.started or batch.finished for batch in batches), default=None)
    if first is None:
        return 0.0
    span = (batches[-1].finished - first).total_seconds()
    earliest = min(batches, key=lambda batch: batch.started or batch.finished)
    waited = sum(batch.waited_s for batch in batches if batch is not earliest) / workers
    held = sum(batch.hold_s or 0.0 for batch in batches) / workers
    return max(span - waited, held, 1e-3)


def _rate(batches: Sequence[_Batch], workers: int) -> float | None:
    if not batches:
        return None
    return sum(batch.rows for batch in batches) / _active_seconds(batches, workers)


def eta_range(
    remaining: int, rate: float, throughputs: Sequence[float]
) -> tuple[float, float, float] | None:
    """(ETA, low, high) in seconds for ``remaining`` sessions at ``rate`` per second.

    The range comes from the spread of per-batch throughput (``throughputs``, rows per second
    of each recent batch's transaction): the 10th and 90th percentiles relative to the median
    scale the rate down and up. It is at least ``_BAND`` either side (``_BAND_FEW`` while fewer
    than ``_FEW_BATCHES`` batches tell), and a second wider at each end (ETAs are shown to the
    second).
    """
    if rate <= 0:
        return None
    eta = remaining / rate
    band = _BAND if len(throughputs) >= _FEW_BATCHES else _BAND_FEW
    middle = percentile(throughputs, 0.5)
    slow, fast = 1.0 - band, 1.0 + band
    if middle:
        slow = min(slow, (percentile(throughputs, 0.1) or middle) / middle)
        fast = max(fast, (percentile(throughputs, 0.9) or middle) / middle)
    low = remaining / (rate * fast)
    high = remaining / (rate * max(slow, 0.05))
    return eta, max(0.0, low - _ETA_SLACK_S), high + _ETA_SLACK_S


def _quarantine_rows(connection: Connection, run_id: int, table_there: bool) -> int:
    """Rows of the quarantine table (revision 0003) last quarantined by this run."""
    if not table_there:
        return 0
    return int(
        connection.execute(
            select(func.count()).where(MigrationQuarantine.run_id == run_id)
        ).scalar_one()
    )


@dataclass(frozen=True, slots=True)
class _Pace:
    rate: float | None  # rows per second over the last minute (0 when none finished in it)
    working_rate: float | None  # what the ETA divides by
    throughputs: list[float]  # rows per second of each recent batch's transaction
    # The working rate without the recent batches' template imports (None: not told apart).
    linking_rate: float | None = None


def _import_seconds(batches: Sequence[_Batch]) -> float | None:
    """What one template import adds to a batch's transaction, fitted over ``batches``
    (hold = a * rows + b * templates, least squares); None when the batches do not tell the
    two apart (imports in step with rows, or too few batches)."""
    fitted = [b for b in batches if b.hold_s is not None and b.rows]
    if len(fitted) < _FEW_BATCHES:
        return None
    rr = sum(b.rows * b.rows for b in fitted)
    tt = sum(b.templates * b.templates for b in fitted)
    rt = sum(b.rows * b.templates for b in fitted)
    rh = sum(b.rows * (b.hold_s or 0.0) for b in fitted)
    th = sum(b.templates * (b.hold_s or 0.0) for b in fitted)
    determinant = rr * tt - rt * rt
    if not tt or determinant <= _DISTINCT * rr * tt:
        return None
    per_row = (rh * tt - th * rt) / determinant
    per_template = (rr * th - rt * rh) / determinant
    return per_template if per_row > 0 and per_template > 0 else None


def _pace(batches: Sequence[_Batch], end: datetime, workers: int) -> _Pace:
    """How fast the run went in the minute up to ``end``, waits left out."""
    window = [batch for batch in batches if batch.finished >= end - _RATE_WINDOW]
    rate = _rate(window, workers) if window else (0.0 if batches else None)
    # None in the last minute (paused for longer) or too few: the last batches, whenever.
    recent = window if len(window) >= _FEW_BATCHES else list(batches[-_RECENT_FALLBACK:])
    # The ETA's rate: the later half of those batches, once there are enough (a run warms up:
    # its first batches, creating most of the templates, are the slowest); their spread: all.
    latest = recent[len(recent) // 2 :] if len(recent) >= 2 * _FEW_BATCHES else recent
    working_rate = _rate(latest, workers)
    linking_rate = None
    per_template = _import_seconds(recent)
    if per_template is not None and latest:
        # The imports of the latest batches, taken out of their active time: how fast the
        # run goes once the texts it meets all have their templates.
        active = _active_seconds(latest, workers)
        importing = min(0.9 * active, per_template * sum(b.templates for b in latest) / workers)
        linking_rate = sum(b.rows for b in latest) / (active - importing)
    return _Pace(
        rate=rate,
        working_rate=working_rate,
        throughputs=[b.rows / b.hold_s for b in recent if b.rows and b.hold_s and b.hold_s > 0],
        linking_rate=linking_rate,
    )


def _int(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _view(
    connection: Connection, run: Any, dead: Mapping[int, str], now: datetime, quarantine: bool
) -> RunView:
    params = run.params if isinstance(run.params, dict) else {}
    summary = run.summary if isinstance(run.summary, dict) else {}
    live_state = summary.get("live") if isinstance(summary.get("live"), dict) else {}
    assert isinstance(live_state, dict)
    life = life_of(run, dead)
    live = life.state is RunState.LIVE
    workers = max(1, _int(live_state.get("workers")) or _int(params.get("workers")) or 1)
    totals = _totals(connection, run.id)
    batches = _sampled_batches(connection, run.id)

    done = totals.rows
    total = _int(summary.get("total"))
    if live_state:  # a dead run's last live state still tells its total; its done is the ledger's
        # Published about once a second: the committed batches may already be further on.
        done = max(_int(live_state.get("done")) or 0, done) if live else done
        total = _int(live_state.get("total")) if "total" in live_state else total
    if total is None and run.status == MigrationRunStatus.COMPLETED.value:
        total = done

    # Of the clock for a live run, of the run's own last minute otherwise.
    pace = _pace(batches, now if live or not batches else batches[-1].finished, workers)
    eta: tuple[float, float, float] | None = None
    remaining = None if total is None else max(0, total - done)
    if live and remaining is not None and pace.working_rate:
        eta = eta_range(remaining, pace.working_rate, pace.throughputs)
        if eta is not None and pace.linking_rate:
            # Most texts get their template early in a run: the imports taper off. The ETA
            # assumes they fade out by the end (halfway between going on at today's rate, the
            # range's top, and stopping now, its bottom).
            linking = eta_range(remaining, pace.linking_rate, pace.throughputs)
            if linking is not None and linking[0] < eta[0]:
                eta = ((eta[0] + linking[0]) / 2, min(eta[1], linking[1]), eta[2])
    activity = str(live_state["state"]) if live and live_state.get("state") else None
    if live and activity is None:
        activity = "working"
    holds = [batch.hold_s * 1000 for batch in batches if batch.hold_s is not None]
    batch_size = _int(live_state.get("batch_size")) if live else None
    if batch_size is None:
        batch_size = next((b.size for b in reversed(batches) if b.size is not None), None)
    quarantined = max(
        _int(live_state.get("quarantined")) or 0,
        _int(summary.get("quarantined")) or 0,
        totals.quarantined,
        _quarantine_rows(connection, run.id, quarantine),
    )
    retries = max(totals.retries, _int(summary.get("retried")) or 0)
    errors = max(_int(live_state.get("errors")) or 0, _int(summary.get("errors")) or 0, retries)
    scope = params.get("scope") or _ALL
    return RunView(
        run_id=int(run.id),
        scope="all" if scope == _ALL else str(scope),
        status=MigrationRunStatus.ABANDONED.value if run.id in dead else str(run.status),
        state=life.state.value,
        reason=life.reason,
        activity=activity,
        throttle_reason=(str(live_state["reason"]) if live and live_state.get("reason") else None),
        done=done,
        total=total,
        batches=totals.batches,
        rows_per_second=pace.rate,
        eta_s=eta[0] if eta else None,
        eta_low_s=eta[1] if eta else None,
        eta_high_s=eta[2] if eta else None,
        eta_note=EXCLUDES_WAITING if eta and activity in WAITING_STATES else None,
        batch_size=batch_size,
        hold_p50_ms=percentile(holds, 0.5),
        hold_p99_ms=percentile(holds, 0.99),
        retries=retries,
        errors=errors,
        quarantined=quarantined,
        waited_s=max(
            _number(live_state.get("waited_s")) or 0.0,
            _number(summary.get("waited_s")) or 0.0,
            totals.waited_s,
        ),
        workers=workers,
        started_at=run.started_at,
        finished_at=run.finished_at,
        error=run.error if run.status == MigrationRunStatus.FAILED.value else None,
        updated_at=str(live_state["updated_at"]) if live_state.get("updated_at") else None,
    )


def _views(connection: Connection, runs: Sequence[Any]) -> list[RunView]:
    if not runs:
        return []
    dead = dead_runs(connection, runs)
    now = server_now(connection)
    # Revision 0003's table: absent from a database still at 0002.
    quarantine = inspect(connection).has_table(_QUARANTINE_TABLE)
    return [_view(connection, run, dead, now, quarantine) for run in runs]


_RUN_COLUMNS = (
    MigrationRun.id,
    MigrationRun.kind,
    MigrationRun.status,
    MigrationRun.params,
    MigrationRun.summary,
    MigrationRun.error,
    MigrationRun.started_at,
    MigrationRun.finished_at,
)


def observe(connection: Connection, run_id: int) -> RunView:
    """The view of backfill run ``run_id``; an id that is not a backfill run is refused."""
    run = connection.execute(
        select(*_RUN_COLUMNS).where(
            MigrationRun.id == run_id, MigrationRun.kind == RunKind.BACKFILL.value
        )
    ).first()
    if run is None:
        raise InvalidInputError(f"no backfill run {run_id} in the migration ledger")
    return _views(connection, [run])[0]


def recent_backfills(connection: Connection, limit: int = 3) -> list[RunView]:
    """The backfill runs still marked running and the latest ``limit`` ones, newest first."""
    latest = (
        select(MigrationRun.id)
        .where(MigrationRun.kind == RunKind.BACKFILL.value)
        .order_by(MigrationRun.id.desc())
        .limit(limit)
        .scalar_subquery()
    )
    runs = connection.execute(
        select(*_RUN_COLUMNS)
        .where(
            MigrationRun.kind == RunKind.BACKFILL.value,
            or_(
                MigrationRun.id.in_(latest),
                MigrationRun.status == MigrationRunStatus.RUNNING.value,
            ),
        )
        .order_by(MigrationRun.id.desc())
    ).all()
    return _views(connection, runs)


# --- the Prometheus text file ------------------------------------------------------------------

_PREFIX = "prompt_tool_backfill_"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{name}="{_escape_label(value)}"' for name, value in pairs) + "}"


def _value(number: float) -> str:
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return repr(float(number)) if not float(number).is_integer() else str(int(number))


@dataclass(frozen=True, slots=True)
class _Metric:
    name: str
    kind: str  # gauge or counter
    help: str


_METRICS = (
    _Metric("info", "gauge", "A backfill run (1), its state and live activity as labels."),
    _Metric("sessions_done", "gauge", "Sessions the run has walked."),
    _Metric("sessions_total", "gauge", "Sessions the run walks in all."),
    _Metric("rows_per_second", "gauge", "Sessions per second, last minute, waits left out."),
    _Metric("eta_seconds", "gauge", "Seconds of work left (time the run will wait excluded)."),
    _Metric("eta_low_seconds", "gauge", "Low end of the ETA range, in seconds."),
    _Metric("eta_high_seconds", "gauge", "High end of the ETA range, in seconds."),
    _Metric("batch_size", "gauge", "The current (or last) batch size, in sessions."),
    _Metric("throttled", "gauge", "1 while the run waits (throttled, paused, outside its window)."),
    _Metric("lock_hold_seconds", "gauge", "Lock hold (batch transaction time) percentiles."),
    _Metric("retries_total", "counter", "Batch attempts retried."),
    _Metric("errors_total", "counter", "Rows that could not be imported."),
    _Metric("quarantined", "gauge", "Rows of the run in quarantine."),
    _Metric("waited_seconds_total", "counter", "Seconds the run has waited so far."),
)


def _samples(view: RunView) -> dict[str, list[tuple[list[tuple[str, str]], float]]]:
    """Per metric name: (extra labels, value) of one run; unknown figures are left out."""
    waiting = view.waiting
    found: dict[str, list[tuple[list[tuple[str, str]], float]]] = {
        "info": [([("state", view.state), ("activity", view.activity or "")], 1.0)],
        "sessions_done": [([], float(view.done))],
        "throttled": [
            (
                [("reason", (view.throttle_reason or view.activity or "") if waiting else "")],
                1.0 if waiting else 0.0,
            )
        ],
        "retries_total": [([], float(view.retries))],
        "errors_total": [([], float(view.errors))],
        "quarantined": [([], float(view.quarantined))],
        "waited_seconds_total": [([], view.waited_s)],
    }
    optional = {
        "sessions_total": view.total,
        "rows_per_second": view.rows_per_second,
        "eta_seconds": view.eta_s,
        "eta_low_seconds": view.eta_low_s,
        "eta_high_seconds": view.eta_high_s,
        "batch_size": view.batch_size,
    }
    for name, value in optional.items():
        if value is not None:
            found[name] = [([], float(value))]
    holds = [("0.5", view.hold_p50_ms), ("0.99", view.hold_p99_ms)]
    found["lock_hold_seconds"] = [
        ([("quantile", quantile)], value / 1000) for quantile, value in holds if value is not None
    ]
    return found


def metrics_text(views: Sequence[RunView]) -> str:
    """``views`` in the Prometheus text exposition format (one series per run and figure)."""
    per_view = [(view, _samples(view)) for view in views]
    lines: list[str] = []
    for metric in _METRICS:
        name = _PREFIX + metric.name
        lines.append(f"# HELP {name} {_escape_help(metric.help)}")
        lines.append(f"# TYPE {name} {metric.kind}")
        for view, samples in per_view:
            for extra, value in samples.get(metric.name, []):
                labels = _labels([("run", str(view.run_id)), ("scope", view.scope), *extra])
                lines.append(f"{name}{labels} {_value(value)}")
    return "\n".join(lines) + "\n"


def check_metrics_path(path: str) -> Path:
    """``path`` as a metrics file that can be written, or one line saying why not (the
    directory is missing or not writable, the path is a directory): checked before a run."""
    target = Path(path)
    directory = target.parent
    if target.is_dir():
        raise InvalidInputError(f"--metrics-file {path}: is a directory; name a file in it")
    if not directory.is_dir():
        raise InvalidInputError(f"--metrics-file {path}: directory {directory} does not exist")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{target.name}.", dir=directory)
    except OSError as error:
        raise InvalidInputError(
            f"--metrics-file {path}: cannot write in {directory} ({error.strerror or error})"
        ) from None
    os.close(handle)
    os.unlink(probe)
    return target


def write_metrics(path: str | Path, views: Sequence[RunView]) -> None:
    """Write ``views`` to ``path`` atomically: a temporary file beside it, fsynced, then
    renamed over it, so a reader (node_exporter's textfile collector) never sees half a file."""
    target = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(metrics_text(views))
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from the collector's user
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class MetricsWriter:
    """Rewrites the metrics file every ``interval_s`` seconds on a daemon thread, each time from
    the ledger on a short connection of its own (``engine``); :meth:`stop` writes a last time.

    ``run_id``: that run only; else :func:`recent_backfills`. A refresh that fails (the database
    briefly away) is skipped and kept in ``last_error``; the next one tries again.
    """

    def __init__(
        self,
        engine: Engine,
        path: str | Path,
        *,
        interval_s: float = 5.0,
        run_id: int | None = None,
    ) -> None:
        self.engine = engine
        self.path = Path(path)
        self.interval_s = interval_s
        self.run_id = run_id
        self.last_error: BaseException | None = None
        self.writes = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="backfill-metrics", daemon=True)

    def views(self) -> list[RunView]:
        with connect(self.engine) as connection:
            if self.run_id is not None:
                return [observe(connection, self.run_id)]
            return recent_backfills(connection)

    def write(self) -> None:
        """One refresh now (in the caller's thread)."""
        write_metrics(self.path, self.views())
        self.writes += 1

    def _loop(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                self.write()
            except Exception as error:  # noqa: BLE001 - a refresh must not end the run
                self.last_error = error

    def start(self) -> MetricsWriter:
        try:
            self.write()
        except Exception as error:  # noqa: BLE001 - as in the loop
            self.last_error = error
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread and write the file a last time (the run's final figures)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self.write()
        except Exception as error:  # noqa: BLE001 - the run's own outcome matters more
            self.last_error = error

    def __enter__(self) -> MetricsWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
