"""The backfill's control loop measured against itself (issue 20), on fresh copies of the data
set, every figure against a baseline measured in the same run:

- throughput with every health check on (default options and limits) vs
  ``BackfillOptions(health_checks=False)``: the best of two runs each, in the order on, off,
  off, on, so a drift of the machine's speed over the section favours neither;
- ``estimate_backfill`` (rolled-back sample batches) vs the real run on the same copy: duration,
  templates and WAL (``pg_current_wal_lsn`` around the run);
- the ETA ``observe`` computes from the ledger, on a connection of its own, at 10% and 50% of a
  run, vs the time the run really took from there;
- the lock hold per batch (the database's clock) of the runs with the controller on, vs its
  ``--target-ms``.

The backfills run in this process (the progress callback takes the ETA readings between
batches), one after the other, each on its own copy made with ``CREATE DATABASE ... TEMPLATE``.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from benchmarks.harness import Measurement, Target, libpq, log, percentiles, scratch_database
from prompt_tool.db.engine import connect, make_engine
from prompt_tool.migrate import commands
from prompt_tool.migrate.backfill import BackfillOptions, BackfillProgress
from prompt_tool.migrate.backfill.observe import observe
from prompt_tool.settings import HealthLimits

__all__ = [
    "ESTIMATE_TOLERANCE",
    "ETA_POINTS",
    "HOLDS_OFF",
    "HOLD_FACTOR",
    "SECTION",
    "ControlFigures",
    "EtaReading",
    "failing",
    "markdown",
    "run",
]

SECTION = "backfill control"
HOLDS_OFF = "health checks off (BackfillOptions(health_checks=False))"
THROUGHPUT_TARGET = Target(0.95, ">= 0.95x")
ESTIMATE_TOLERANCE = 0.25  # the estimate's duration within 25% of the real run's
HOLD_FACTOR = 2.0  # p99 lock hold at most this many times --target-ms
ETA_POINTS = (0.10, 0.50)  # shares of the run at which the ETA is read


@dataclass
class EtaReading:
    """The ETA ``observe`` gave at one point of a run, and what the run then really took."""

    share: float  # of the run, when read
    done: int
    total: int
    at: float  # perf_counter when the reading came back (the run went on from there)
    read_ms: float  # how long the reading took (the run waited for it)
    eta_s: float | None
    eta_low_s: float | None
    eta_high_s: float | None
    waited_s: float = 0.0  # what the run had waited so far, when read
    # The real time from the reading to the walk's last batch, less what the run waited in it
    # (an ETA is the time the run still has to work: waits are left out of it).
    remaining_s: float = 0.0
    waited_after_s: float = 0.0

    @property
    def error(self) -> float | None:
        if self.eta_s is None or self.remaining_s <= 0:
            return None
        return abs(self.eta_s - self.remaining_s) / self.remaining_s

    @property
    def inside(self) -> bool | None:
        if self.eta_low_s is None or self.eta_high_s is None:
            return None
        return self.eta_low_s <= self.remaining_s <= self.eta_high_s

    def as_json(self) -> dict[str, Any]:
        return {
            "share": self.share,
            "done": self.done,
            "total": self.total,
            "read_ms": self.read_ms,
            "eta_s": self.eta_s,
            "eta_low_s": self.eta_low_s,
            "eta_high_s": self.eta_high_s,
            "real_remaining_s": self.remaining_s,
            "waited_after_s": self.waited_after_s,
            "error": self.error,
            "inside_range": self.inside,
        }


class _EtaProbe:
    """The progress callback of the probed run: at each of ``ETA_POINTS`` (the first report at
    or past it) it reads the run's view from the ledger through an engine of its own (the
    callback runs between batches, outside the run's transactions); it keeps the time of the
    last report, the walk's end."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.readings: list[EtaReading] = []
        self.last_report = 0.0
        self.last_waited = 0.0
        self.run_id: int | None = None

    def __call__(self, progress: BackfillProgress) -> None:
        now = time.perf_counter()
        self.last_report = now
        self.last_waited = progress.waited_s
        self.run_id = progress.run_id
        if progress.run_id is None or not progress.total:
            return
        pending = ETA_POINTS[len(self.readings) :]
        if not pending or progress.done / progress.total < pending[0]:
            return
        with connect(self.engine) as connection:
            view = observe(connection, progress.run_id)
        back = time.perf_counter()
        self.readings.append(
            EtaReading(
                share=pending[0],
                done=progress.done,
                total=progress.total,
                at=back,
                read_ms=(back - now) * 1000,
                eta_s=view.eta_s,
                eta_low_s=view.eta_low_s,
                eta_high_s=view.eta_high_s,
                waited_s=progress.waited_s,
            )
        )
        self.last_report = time.perf_counter()

    def finish(self) -> list[EtaReading]:
        self.engine.dispose()
        for reading in self.readings:
            reading.waited_after_s = self.last_waited - reading.waited_s
            reading.remaining_s = self.last_report - reading.at - reading.waited_after_s
        return self.readings


@dataclass
class _Run:
    health_checks: bool
    elapsed_s: float
    waited_s: float
    run_id: int
    templates: int
    sessions: int
    batch_size: int
    holds_ms: list[float]
    wal_bytes: int | None = None
    health_problems: list[str] = field(default_factory=list)
    waited_for: list[str] = field(default_factory=list)
    walk_s: float | None = None  # the probed run: from its start to its walk's last batch

    def as_json(self) -> dict[str, Any]:
        return {
            "health_checks": self.health_checks,
            "elapsed_s": self.elapsed_s,
            "waited_s": self.waited_s,
            "run_id": self.run_id,
            "templates": self.templates,
            "sessions": self.sessions,
            "batch_size": self.batch_size,
            "wal_bytes": self.wal_bytes,
            "lock_hold": percentiles(self.holds_ms),
            # The batches' transactions together: the walk's time less what lies between them.
            "held_s": sum(self.holds_ms) / 1000,
            "health_problems": self.health_problems,
            "waited_for": self.waited_for,
            "walk_s": self.walk_s,
        }


@dataclass
class ControlFigures:
    """What the section measured: the throughput row (a Measurement, in the main table; its
    ``extra`` is :meth:`as_json`, from which :func:`markdown` and :func:`failing` read the
    estimate, ETA and lock hold figures)."""

    sessions: int
    target_batch_ms: int
    runs: list[_Run]
    estimate: dict[str, Any]
    etas: list[EtaReading]
    measurements: list[Measurement] = field(default_factory=list)

    @property
    def real(self) -> _Run:
        """The run the estimate and the ETA readings are compared with (the first, probed)."""
        return self.runs[0]

    @property
    def holds(self) -> dict[str, float]:
        """Lock hold percentiles over every batch of the runs with the controller on."""
        return percentiles([hold for r in self.runs if r.health_checks for hold in r.holds_ms])

    def as_json(self) -> dict[str, Any]:
        real = self.real
        # The estimate projects the run without its waits (throttled): so is the real run.
        worked = real.elapsed_s - real.waited_s
        estimate = self.estimate
        wal = estimate.get("wal_bytes")
        holds = self.holds
        return {
            "target_batch_ms": self.target_batch_ms,
            "runs": [r.as_json() for r in self.runs],
            "estimate": estimate,
            "estimate_real_s": worked,
            "estimate_error": abs(float(estimate["duration_s"]) - worked) / worked,
            "estimate_inside_range": estimate["duration_low_s"]
            <= worked
            <= estimate["duration_high_s"],
            "estimate_templates_real": real.templates,
            "estimate_wal_real": real.wal_bytes,
            "estimate_wal_error": (
                abs(wal - real.wal_bytes) / real.wal_bytes
                if wal is not None and real.wal_bytes
                else None
            ),
            "eta": [reading.as_json() for reading in self.etas],
            "lock_hold": holds,
            "lock_hold_limit_ms": HOLD_FACTOR * self.target_batch_ms,
            "lock_hold_met": holds.get("p99_ms", 0.0) <= HOLD_FACTOR * self.target_batch_ms,
        }


def _wal_position(url: str) -> int:
    with psycopg.connect(libpq(url)) as connection:
        row = connection.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"
        ).fetchone()
    return int(row[0]) if row else 0


def _settle(url: str) -> None:
    """Before a timed run: a checkpoint (the copy's WAL written out, so no checkpoint it caused
    lands in the run) and a collection, as every run gets. Best effort."""
    gc.collect()
    try:
        with psycopg.connect(libpq(url), autocommit=True) as connection:
            connection.execute("CHECKPOINT")
    except psycopg.Error:
        pass


def _holds(url: str, run_id: int) -> list[float]:
    with psycopg.connect(libpq(url)) as connection:
        return [
            float(ms)
            for (ms,) in connection.execute(
                "SELECT EXTRACT(EPOCH FROM (finished_at - started_at)) * 1000 "
                "FROM migration_batches WHERE run_id = %s AND status = 'done'",
                (run_id,),
            )
        ]


def _backfill(url: str, health_checks: bool, probe: _EtaProbe | None = None) -> tuple[_Run, int]:
    """One timed backfill of the copy at ``url``; and the WAL the server wrote meanwhile."""
    # The default limits themselves, whatever PROMPT_TOOL_BACKFILL_* this environment sets.
    options = BackfillOptions(health=HealthLimits(), health_checks=health_checks)
    _settle(url)
    wal_before = _wal_position(url)
    start = time.perf_counter()
    summary = commands.backfill(url, options, progress=probe)
    elapsed = time.perf_counter() - start
    wal = _wal_position(url) - wal_before
    if summary.run_id is None:
        raise AssertionError("the backfill recorded no run")
    return (
        _Run(
            health_checks=health_checks,
            elapsed_s=elapsed,
            waited_s=summary.waited_s,
            run_id=summary.run_id,
            templates=summary.templates_created,
            sessions=summary.sessions_scanned,
            batch_size=summary.batch_size,
            holds_ms=_holds(url, summary.run_id),
            health_problems=list(summary.health_problems),
            waited_for=list(summary.waited_for),
            walk_s=None if probe is None else probe.last_report - start,
        ),
        wal,
    )


def run(dataset_url: str, sessions: int, *, repeat: int = 2) -> ControlFigures:
    """The section on copies of the data set at ``dataset_url`` (``repeat`` runs each way)."""
    runs: list[_Run] = []
    estimate: dict[str, Any] = {}
    etas: list[EtaReading] = []
    # On, off, off, on (and so on): a drift of the machine over the section favours neither.
    order = [bool((i % 4) in (0, 3)) for i in range(2 * repeat)]
    for index, health_checks in enumerate(order):
        label = "on" if health_checks else "off"
        with scratch_database(f"control_{label}", dataset_url) as url:
            probe = None
            if index == 0:
                log("backfill control: estimate, then the run it estimates (health checks on)")
                _settle(url)
                began = time.perf_counter()
                projected = commands.estimate_backfill(url, BackfillOptions())
                estimate = {
                    "duration_s": projected.duration_s,
                    "duration_low_s": projected.duration_low_s,
                    "duration_high_s": projected.duration_high_s,
                    "templates": projected.templates,
                    "wal_bytes": projected.wal_bytes,
                    "batch_size": projected.batch_size,
                    "lock_hold_ms": projected.lock_hold_ms,
                    "samples": projected.samples,
                    "elapsed_s": time.perf_counter() - began,
                }
                probe = _EtaProbe(url)
            else:
                log(f"backfill control: health checks {label}")
            measured, wal = _backfill(url, health_checks, probe)
            measured.wal_bytes = wal
            if probe is not None:
                etas = probe.finish()
            runs.append(measured)
            log(
                f"backfill control: health checks {label}: {measured.elapsed_s:.1f} s, waited "
                f"{measured.waited_s:.1f} s ({'; '.join(measured.waited_for[:3]) or 'never'})"
            )
    on = min(r.elapsed_s for r in runs if r.health_checks)
    off = min(r.elapsed_s for r in runs if not r.health_checks)
    figures = ControlFigures(
        sessions=sessions,
        target_batch_ms=BackfillOptions().target_batch_ms,
        runs=runs,
        estimate=estimate,
        etas=etas,
    )
    figures.measurements = [
        Measurement(
            section=SECTION,
            what=f"backfill, {sessions:,} sessions, health checks on (default limits), "
            f"best of {repeat}",
            ours_per_s=sessions / on,
            baselines={HOLDS_OFF: sessions / off},
            targets={HOLDS_OFF: THROUGHPUT_TARGET},
            extra=figures.as_json(),
        )
    ]
    return figures


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:,.1f} s"


def _share(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"


def _mib(value: float | None) -> str:
    return "" if value is None else f"{value / 2**20:,.0f} MiB"


def _yes(value: bool | None) -> str:
    return {True: "yes", False: "**NO**", None: ""}[value]


def markdown(figures: dict[str, Any]) -> list[str]:
    """The estimate, ETA and lock hold rows (from :meth:`ControlFigures.as_json`) as a
    Markdown table, one line each, with a blank line before and after."""
    real = figures["runs"][0]
    estimate = figures["estimate"]
    error = figures["estimate_error"]
    lines = [
        "",
        "| backfill control | projected | real | error | target | met |",
        "|---|---:|---:|---:|---|---|",
        f"| estimate: duration without waits (range {_seconds(estimate['duration_low_s'])} to "
        f"{_seconds(estimate['duration_high_s'])}; real inside it: "
        f"{_yes(figures['estimate_inside_range'])}) | {_seconds(estimate['duration_s'])} | "
        f"{_seconds(figures['estimate_real_s'])} | {_share(error)} | "
        f"within {ESTIMATE_TOLERANCE:.0%} | {_yes(error <= ESTIMATE_TOLERANCE)} |",
        f"| estimate: templates to create | {estimate['templates']:,} | {real['templates']:,} | "
        f"{_share(abs(estimate['templates'] - real['templates']) / max(1, real['templates']))}"
        " | report | |",
    ]
    if figures["estimate_wal_error"] is not None:
        lines.append(
            f"| estimate: WAL (real: the server's, pg_current_wal_lsn around the run) | "
            f"{_mib(estimate['wal_bytes'])} | {_mib(figures['estimate_wal_real'])} | "
            f"{_share(figures['estimate_wal_error'])} | report | |"
        )
    readings = {reading["share"]: reading for reading in figures["eta"]}
    for share in ETA_POINTS:
        reading = readings.get(share)
        if reading is None:
            lines.append(f"| ETA at {share:.0%} | (no reading) | | | report | |")
            continue
        lines.append(
            f"| ETA at {share:.0%} of the run ({reading['done']:,} of {reading['total']:,}; "
            f"range {_seconds(reading['eta_low_s'])} to {_seconds(reading['eta_high_s'])}) | "
            f"{_seconds(reading['eta_s'])} | {_seconds(reading['real_remaining_s'])} | "
            f"{_share(reading['error'])} | report; met: the real finish inside the range | "
            f"{_yes(reading['inside_range'])} |"
        )
    holds = figures["lock_hold"]
    target = figures["target_batch_ms"]
    p99 = holds.get("p99_ms", 0.0)
    lines.append(
        f"| lock hold p99, controller on ({holds.get('n', 0):,} batches; p50 "
        f"{holds.get('p50_ms', 0):.0f} ms, max {holds.get('max_ms', 0):.0f} ms) | "
        f"--target-ms {target} | {p99:.0f} ms | {p99 / target:.2f}x the target | "
        f"p99 <= {figures['lock_hold_limit_ms']:.0f} ms ({HOLD_FACTOR:g}x) | "
        f"{_yes(figures['lock_hold_met'])} |"
    )
    for r in figures["runs"]:
        if r["waited_s"] >= 0.05 or r["health_problems"]:
            why = "; ".join([*r["waited_for"][:3], *r["health_problems"]])
            lines.append(
                f"| (a run with health checks {'on' if r['health_checks'] else 'off'} waited "
                f"{r['waited_s']:.1f} s: {why}) | | | | | |"
            )
    return [*lines, ""]  # a line right after a table would be read as one more row


def failing(figures: dict[str, Any]) -> list[str]:
    """The smoke check beyond the throughput ratio (half its target, as for ratios): an
    estimate off by more than twice its tolerance, a p99 lock hold above twice its limit."""
    found = []
    if figures["estimate_error"] > 2 * ESTIMATE_TOLERANCE:
        found.append(
            f"backfill control: the estimate is {figures['estimate_error']:.0%} off the real "
            f"run (target within {ESTIMATE_TOLERANCE:.0%})"
        )
    p99 = figures["lock_hold"].get("p99_ms", 0.0)
    if p99 > 2 * figures["lock_hold_limit_ms"]:
        found.append(
            f"backfill control: lock hold p99 {p99:.0f} ms (target <= "
            f"{figures['lock_hold_limit_ms']:.0f} ms)"
        )
    return found
