"""The health signals a backfill waits on, and the monitor that reads them.

Each signal reads one thing from the database (:mod:`prompt_tool.db.health` holds the queries)
and says how it stands against its limit as a :class:`Reading`: replica replay lag, WAL
written per second, a vacuum on a table the run writes, sessions blocked behind the run, the
oldest open transaction, and the operator's own throttle query. A signal past its limit holds
the run until it is back under; the run says which signal and its value
(:meth:`Reading.describe`).

Signals are anything with a ``name`` and a ``read(connection)`` (:class:`HealthSignal`), so a
test can hand :class:`HealthMonitor` a replica that lags on demand. The monitor samples them on
a thread of its own, every signal in a short transaction of its own (it never keeps one open
between samples); a signal that cannot be read (no privilege, a query that fails) reads as
nothing for that sample and is reported once in :meth:`HealthMonitor.problems`, and the run
goes on. SQLite has none of the server's signals: only the throttle query applies there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from prompt_tool.db.dialect import set_local_timeouts
from prompt_tool.db.engine import Connectable, connect
from prompt_tool.db.health import (
    oldest_transaction_s,
    replica_lag_ms,
    run_throttle_query,
    sessions_blocked_by,
    vacuums_running,
    wal_position,
)
from prompt_tool.errors import InvalidInputError, PromptToolError
from prompt_tool.settings import HealthLimits

__all__ = [
    "AUTOVACUUM",
    "BLOCKED_SESSIONS",
    "OLDEST_TRANSACTION",
    "REPLICA_LAG",
    "THROTTLE_QUERY",
    "WAL_RATE",
    "Autovacuum",
    "BlockedSessions",
    "HealthMonitor",
    "HealthSignal",
    "OldestTransaction",
    "Reading",
    "ReplicaLag",
    "ThrottleQuery",
    "WalRate",
    "check_throttle_query",
    "signals_for",
]

# Signal names: a Reading's ``signal``, a HealthSignal's ``name``, the keys of problems().
REPLICA_LAG = "replica lag"
WAL_RATE = "WAL rate"
AUTOVACUUM = "autovacuum"
BLOCKED_SESSIONS = "blocked sessions"
OLDEST_TRANSACTION = "oldest transaction"
THROTTLE_QUERY = "throttle query"

# Each signal's transaction: a reading that waits on a lock or runs long is given up (and
# reported) instead of stalling the monitor.
_LOCK_TIMEOUT_MS = 1_000
_STATEMENT_TIMEOUT_MS = 5_000
# How long stop() waits for a sample in flight (each is bounded by the timeouts above).
_STOP_WAIT_S = 30.0


@dataclass(frozen=True, slots=True)
class Reading:
    """One signal's value against its limit. ``subject``: what the value is about, where the
    number alone does not say (the tables a vacuum is working on)."""

    signal: str
    value: float
    limit: float
    unit: str
    subject: str = ""

    @property
    def tripped(self) -> bool:
        """Past the limit: the run waits."""
        return self.value > self.limit

    def describe(self) -> str:
        """One phrase for the operator: "replica replay lag 2,400 ms (limit 1,500 ms)"."""
        if self.signal == REPLICA_LAG:
            return f"replica replay lag {_whole(self.value)} ms (limit {_whole(self.limit)} ms)"
        if self.signal == WAL_RATE:
            return f"WAL {_rate(self.value)} (limit {_rate(self.limit)})"
        if self.signal == AUTOVACUUM:
            return f"autovacuum on {self.subject}" if self.subject else "no autovacuum"
        if self.signal == BLOCKED_SESSIONS:
            count = round(self.value)
            sessions = "session" if count == 1 else "sessions"
            return f"{count:,} {sessions} blocked behind the run (limit {_whole(self.limit)})"
        if self.signal == OLDEST_TRANSACTION:
            return (
                f"oldest open transaction {_whole(self.value)} s old (limit {_whole(self.limit)} s)"
            )
        if self.signal == THROTTLE_QUERY:
            return f"throttle query returned {'true' if self.tripped else 'false'}"
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.signal} {self.value:,g}{unit} (limit {self.limit:,g}{unit})"


def _whole(value: float) -> str:
    return f"{round(value):,}"


def _rate(bytes_per_s: float) -> str:
    for unit, size in (("GiB/s", 1024**3), ("MiB/s", 1024**2), ("KiB/s", 1024)):
        if bytes_per_s >= size:
            return f"{bytes_per_s / size:,.1f} {unit}"
    return f"{bytes_per_s:,.0f} B/s"


class HealthSignal(Protocol):
    """One thing the run waits on. ``read`` is given a connection inside a short transaction
    of its own and returns None when there is nothing to report (the signal does not apply
    here, or has no value yet); it may raise (no privilege, a failed query): the monitor
    reports that and goes on."""

    name: str

    def read(self, connection: Connection) -> Reading | None: ...


class ReplicaLag:
    """The replay lag of the most lagging replica (none: healthy), in milliseconds."""

    name = REPLICA_LAG

    def __init__(self, limit_ms: float) -> None:
        self.limit_ms = limit_ms

    def read(self, connection: Connection) -> Reading | None:
        lag = replica_lag_ms(connection)
        return None if lag is None else Reading(self.name, lag, self.limit_ms, "ms")


class WalRate:
    """WAL the server writes per second, between this reading and the one before (the first
    reading has nothing to compare with: None). Readings closer together than
    ``min_interval_s`` give the rate measured before, so a burst is not read over a sliver of
    time."""

    name = WAL_RATE

    def __init__(self, limit_bytes_per_s: float, min_interval_s: float = 0.25) -> None:
        self.limit_bytes_per_s = limit_bytes_per_s
        self.min_interval_s = min_interval_s
        self._previous: tuple[int, float] | None = None
        self._last: Reading | None = None

    def read(self, connection: Connection) -> Reading | None:
        position = wal_position(connection)
        now = time.monotonic()
        previous = self._previous
        if position is None:
            self._previous = self._last = None
            return None
        if previous is not None and now - previous[1] < self.min_interval_s:
            return self._last
        self._previous = (position, now)
        if previous is None or position < previous[0]:  # first reading; a new server timeline
            self._last = None
            return None
        rate = (position - previous[0]) / max(now - previous[1], 1e-6)
        self._last = Reading(self.name, rate, self.limit_bytes_per_s, "bytes/s")
        return self._last


class Autovacuum:
    """A vacuum (autovacuum's, or anyone's VACUUM) working on one of the run's tables."""

    name = AUTOVACUUM

    def __init__(self, tables: Sequence[str]) -> None:
        self.tables = tuple(tables)

    def read(self, connection: Connection) -> Reading | None:
        names = vacuums_running(connection, self.tables)
        if names is None:
            return None
        return Reading(self.name, float(len(names)), 0.0, "tables", ", ".join(names))


class BlockedSessions:
    """Sessions waiting on a lock held by one of the run's backends (those whose
    ``application_name`` is the run's)."""

    name = BLOCKED_SESSIONS

    def __init__(self, application_name: str, limit: float) -> None:
        self.application_name = application_name
        self.limit = limit

    def read(self, connection: Connection) -> Reading | None:
        count = sessions_blocked_by(connection, self.application_name)
        return None if count is None else Reading(self.name, count, self.limit, "sessions")


class OldestTransaction:
    """The age of the oldest transaction open in the database, the run's own left out."""

    name = OLDEST_TRANSACTION

    def __init__(self, limit_s: float, excluding_application: str | None = None) -> None:
        self.limit_s = limit_s
        self.excluding_application = excluding_application

    def read(self, connection: Connection) -> Reading | None:
        age = oldest_transaction_s(connection, self.excluding_application)
        return None if age is None else Reading(self.name, age, self.limit_s, "s")


class ThrottleQuery:
    """The operator's SQL (``--throttle-query``): true in the first column of its first row
    holds the run. A query the database refuses raises a one-line :class:`InvalidInputError`."""

    name = THROTTLE_QUERY

    def __init__(self, sql: str) -> None:
        self.sql = sql

    def read(self, connection: Connection) -> Reading | None:
        try:
            holds = run_throttle_query(connection, self.sql)
        except (DBAPIError, ValueError) as error:
            raise InvalidInputError(
                f"--throttle-query failed: {_first_line(error)}; it must be one query whose "
                "first row's first column is true while the run should wait"
            ) from None
        return Reading(self.name, 1.0 if holds else 0.0, 0.0, "")


def check_throttle_query(db: Connectable, sql: str) -> None:
    """Run ``sql`` once, before the run writes anything, in a transaction rolled back after:
    a typo fails here in one line instead of in the middle of the run."""
    if not sql.strip():
        raise InvalidInputError(
            "--throttle-query is empty; give a query whose first row's first column is true "
            "while the run should wait, or leave the option out"
        )
    with connect(db) as connection, _own_transaction(connection, nested=db is connection):
        ThrottleQuery(sql).read(connection)


def signals_for(
    limits: HealthLimits,
    *,
    application_name: str,
    tables: Sequence[str],
    throttle_query: str | None,
) -> list[HealthSignal]:
    """The signals ``limits`` turn on (a limit of None, or autovacuum False, leaves one out),
    and the throttle query when there is one. ``application_name`` is the run's (see
    :func:`prompt_tool.db.health.tag_connections`); ``tables`` those it writes."""
    signals: list[HealthSignal] = []
    if limits.replica_lag_ms is not None:
        signals.append(ReplicaLag(limits.replica_lag_ms))
    if limits.wal_bytes_per_s is not None:
        signals.append(WalRate(limits.wal_bytes_per_s))
    if limits.autovacuum:
        signals.append(Autovacuum(tables))
    if limits.blocked_sessions is not None:
        signals.append(BlockedSessions(application_name, limits.blocked_sessions))
    if limits.transaction_age_s is not None:
        signals.append(OldestTransaction(limits.transaction_age_s, application_name))
    if throttle_query is not None:
        signals.append(ThrottleQuery(throttle_query))
    return signals


@contextmanager
def _own_transaction(connection: Connection, *, nested: bool) -> Iterator[None]:
    """A short transaction (a savepoint in a caller's Connection), always rolled back: a
    reading writes nothing, and the timeouts it sets end with it."""
    transaction = connection.begin_nested() if nested else connection.begin()
    try:
        set_local_timeouts(connection, _LOCK_TIMEOUT_MS, _STATEMENT_TIMEOUT_MS)
        yield
    finally:
        if transaction.is_active:
            transaction.rollback()


def _first_line(error: BaseException) -> str:
    if isinstance(error, PromptToolError | ValueError):
        text = str(error)
    elif isinstance(error, DBAPIError):
        text = str(error.orig if error.orig is not None else error)
    else:
        text = f"{type(error).__name__}: {error}"
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__


class HealthMonitor:
    """Reads ``signals`` every ``interval_s`` on a daemon thread (:meth:`start`, or use it as a
    context manager) and keeps the latest sample; :meth:`holding` says which reading, if any,
    holds the run now.

    ``db`` is an Engine (each sample on a connection of its own) or a caller's Connection
    (each signal in a savepoint rolled back; a Connection belongs to its caller's thread, so
    no thread is started and :meth:`holding` samples on the calling thread when the latest
    sample is older than the interval). Without :meth:`start`, :meth:`holding` does the same.
    """

    def __init__(
        self, db: Connectable, signals: Sequence[HealthSignal], interval_s: float = 1.0
    ) -> None:
        self._db = db
        self._signals = tuple(signals)
        self.interval_s = interval_s
        self._sampling = threading.Lock()  # one sample at a time (WalRate keeps state)
        self._state = threading.Lock()
        self._latest: tuple[Reading, ...] = ()
        self._sampled_at: float | None = None
        self._problems: dict[str, str] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def signals(self) -> tuple[HealthSignal, ...]:
        return self._signals

    def start(self) -> HealthMonitor:
        """Take a first sample now, then sample every interval on a daemon thread (none with
        no signals, or on a caller's Connection)."""
        if self._thread is not None or not self._signals:
            return self
        self.sample()
        if isinstance(self._db, Connection):
            return self
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name="backfill health monitor", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (waits for a sample in flight)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        thread.join(_STOP_WAIT_S)

    def __enter__(self) -> HealthMonitor:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self.sample()

    def sample(self) -> Reading | None:
        """Read every signal now, on the calling thread; keep the readings as the latest and
        return the first past its limit (None: nothing holds the run)."""
        with self._sampling:
            readings = self._read_all()
        with self._state:
            self._latest = tuple(readings)
            self._sampled_at = time.monotonic()
        return _first_tripped(readings)

    def holding(self) -> Reading | None:
        """The first reading of the latest sample past its limit; None: nothing holds the run
        (or no signal could be read). Thread-safe."""
        with self._state:
            sampled_at = self._sampled_at
            latest = self._latest
        sampling_here = self._thread is None or not self._thread.is_alive()
        stale = sampled_at is None or time.monotonic() - sampled_at >= self.interval_s
        if self._signals and sampling_here and stale:
            return self.sample()
        return _first_tripped(latest)

    def readings(self) -> tuple[Reading, ...]:
        """Every reading of the latest sample, tripped or not (for a status or metrics)."""
        with self._state:
            return self._latest

    def problems(self) -> dict[str, str]:
        """Signals that could not be read, each with the first reason, in one line: the run
        says "replica lag not checked: <reason>"."""
        with self._state:
            return dict(self._problems)

    def _read_all(self) -> list[Reading]:
        readings: list[Reading] = []
        nested = isinstance(self._db, Connection)
        pending = list(self._signals)
        try:
            with connect(self._db) as connection:
                while pending:
                    signal = pending.pop(0)
                    try:
                        with _own_transaction(connection, nested=nested):
                            reading = signal.read(connection)
                    except Exception as error:  # noqa: BLE001 - reported, never the thread's end
                        self._note(signal.name, error)
                        continue
                    if reading is not None:
                        readings.append(reading)
        except Exception as error:  # noqa: BLE001 - no connection: nothing read this time
            for signal in pending:
                self._note(signal.name, error)
        return readings

    def _note(self, name: str, error: BaseException) -> None:
        with self._state:
            self._problems.setdefault(name, _first_line(error))


def _first_tripped(readings: Sequence[Reading]) -> Reading | None:
    return next((reading for reading in readings if reading.tripped), None)
