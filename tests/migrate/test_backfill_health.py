"""The health signals a backfill waits on trip and release for real, on the real server: WAL
written, a vacuum on a run's table, a session blocked behind the run, an old transaction, the
operator's throttle query (SQLite too); a lagging replica is injected through the signal
interface (there is no replica here). The monitor survives a signal it cannot read and says
why; a throttle query with a typo is refused in one line before anything runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, Engine, text

from prompt_tool.db.engine import make_engine
from prompt_tool.db.health import tag_connections
from prompt_tool.errors import InvalidInputError
from prompt_tool.migrate.backfill.health import (
    AUTOVACUUM,
    BLOCKED_SESSIONS,
    OLDEST_TRANSACTION,
    REPLICA_LAG,
    THROTTLE_QUERY,
    WAL_RATE,
    Autovacuum,
    BlockedSessions,
    HealthMonitor,
    OldestTransaction,
    Reading,
    ReplicaLag,
    ThrottleQuery,
    WalRate,
    check_throttle_query,
    signals_for,
)
from prompt_tool.settings import HealthLimits
from tests.conftest import RUN_ID

RUN_NAME = "orch-migrate backfill 7"
WAIT_S = 30.0
PAUSE = "SELECT EXISTS (SELECT 1 FROM pause_table)"


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _until(condition: Callable[[], Any], what: str) -> Any:
    """Poll ``condition`` until it gives something truthy (a deadline, never a fixed sleep)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def _holding(monitor: HealthMonitor, signal: str) -> Reading | None:
    tripped = monitor.sample()
    return tripped if tripped is not None and tripped.signal == signal else None


def _reading(monitor: HealthMonitor, signal: str) -> Reading:
    monitor.sample()
    return next(reading for reading in monitor.readings() if reading.signal == signal)


@pytest.fixture
def pg_engine(pg_url: str, engine_for: Any) -> Engine:
    engine: Engine = engine_for(pg_url)
    return engine


class LaggingReplica:
    """A replica whose replay lag the test sets."""

    name = REPLICA_LAG

    def __init__(self, lag_ms: float) -> None:
        self.lag_ms = lag_ms

    def read(self, connection: Connection) -> Reading | None:
        return Reading(self.name, self.lag_ms, 1_500, "ms")


# -- readings and the signals the limits turn on -------------------------------------------


def test_each_reading_says_in_one_phrase_what_holds_the_run() -> None:
    assert Reading(REPLICA_LAG, 2_400, 1_500, "ms").describe() == (
        "replica replay lag 2,400 ms (limit 1,500 ms)"
    )
    mib = 1024 * 1024
    assert Reading(WAL_RATE, 80 * mib, 64 * mib, "bytes/s").describe() == (
        "WAL 80.0 MiB/s (limit 64.0 MiB/s)"
    )
    assert Reading(AUTOVACUUM, 1, 0, "tables", "session_prompt_refs").describe() == (
        "autovacuum on session_prompt_refs"
    )
    assert Reading(BLOCKED_SESSIONS, 3, 0, "sessions").describe() == (
        "3 sessions blocked behind the run (limit 0)"
    )
    assert Reading(BLOCKED_SESSIONS, 1, 0, "sessions").describe() == (
        "1 session blocked behind the run (limit 0)"
    )
    assert Reading(OLDEST_TRANSACTION, 4_012.4, 3_600, "s").describe() == (
        "oldest open transaction 4,012 s old (limit 3,600 s)"
    )
    assert Reading(THROTTLE_QUERY, 1, 0, "").describe() == "throttle query returned true"
    assert Reading(REPLICA_LAG, 1_500, 1_500, "ms").tripped is False
    assert Reading(REPLICA_LAG, 1_501, 1_500, "ms").tripped is True


def test_the_limits_choose_the_signals_and_none_turns_one_off() -> None:
    every = signals_for(
        HealthLimits(), application_name=RUN_NAME, tables=["t"], throttle_query=PAUSE
    )
    assert [signal.name for signal in every] == [
        REPLICA_LAG,
        WAL_RATE,
        AUTOVACUUM,
        BLOCKED_SESSIONS,
        OLDEST_TRANSACTION,
        THROTTLE_QUERY,
    ]
    off = HealthLimits(
        replica_lag_ms=None,
        wal_bytes_per_s=None,
        autovacuum=False,
        blocked_sessions=None,
        transaction_age_s=None,
    )
    assert signals_for(off, application_name=RUN_NAME, tables=["t"], throttle_query=None) == []
    some = signals_for(
        HealthLimits(replica_lag_ms=None, autovacuum=False),
        application_name=RUN_NAME,
        tables=["t"],
        throttle_query=None,
    )
    assert [signal.name for signal in some] == [WAL_RATE, BLOCKED_SESSIONS, OLDEST_TRANSACTION]


# -- a lagging replica, injected -----------------------------------------------------------


def test_an_injected_lagging_replica_holds_the_run_until_it_catches_up(
    empty_db_url: str, engine_for: Any
) -> None:
    replica = LaggingReplica(100)
    with HealthMonitor(engine_for(empty_db_url), [replica], interval_s=0.01) as monitor:
        assert monitor.holding() is None
        replica.lag_ms = 2_400
        held = _until(monitor.holding, "the lag to hold the run")
        assert held.describe() == "replica replay lag 2,400 ms (limit 1,500 ms)"
        replica.lag_ms = 100
        _until(lambda: monitor.holding() is None, "the lag to release the run")


@pytest.mark.postgres
def test_no_replica_reads_as_no_lag_and_holds_nothing(pg_engine: Engine) -> None:
    monitor = HealthMonitor(pg_engine, [ReplicaLag(0)])
    assert monitor.sample() is None
    assert monitor.readings() == (Reading(REPLICA_LAG, 0.0, 0, "ms"),)
    assert monitor.problems() == {}


def test_sqlite_reads_none_of_the_servers_signals(tmp_path: Any, engine_for: Any) -> None:
    engine = engine_for(f"sqlite:///{tmp_path / 'health.db'}")
    signals = signals_for(
        HealthLimits(replica_lag_ms=0, wal_bytes_per_s=0, blocked_sessions=0, transaction_age_s=0),
        application_name=RUN_NAME,
        tables=["t"],
        throttle_query="SELECT 0",
    )
    monitor = HealthMonitor(engine, signals)
    assert monitor.sample() is None
    monitor.sample()
    assert [reading.signal for reading in monitor.readings()] == [THROTTLE_QUERY]
    assert monitor.problems() == {}


# -- WAL -----------------------------------------------------------------------------------


@pytest.mark.postgres
def test_wal_written_faster_than_the_limit_holds_the_run(pg_engine: Engine, pg_url: str) -> None:
    monitor = HealthMonitor(pg_engine, [WalRate(1024, min_interval_s=0)])
    assert monitor.sample() is None  # a first reading has nothing to compare with
    with psycopg.connect(_libpq(pg_url)) as other:
        other.execute("CREATE TABLE scratch (pad text)")
        other.execute("INSERT INTO scratch SELECT repeat('x', 1000) FROM generate_series(1, 4000)")
    held = monitor.sample()
    assert held is not None and held.signal == WAL_RATE
    assert held.value > 1024
    assert held.describe().startswith("WAL ") and held.describe().endswith("(limit 1.0 KiB/s)")


@pytest.mark.postgres
def test_wal_under_the_limit_holds_nothing(pg_engine: Engine) -> None:
    monitor = HealthMonitor(pg_engine, [WalRate(1024**4, min_interval_s=0)])
    assert monitor.sample() is None
    assert monitor.sample() is None
    (reading,) = monitor.readings()
    assert reading.signal == WAL_RATE and 0 <= reading.value < reading.limit


# -- a vacuum on a run's table -------------------------------------------------------------


@pytest.fixture
def vacuumable(pg_url: str) -> str:
    """A table of a few thousand rows, half of them dead; autovacuum is off for it."""
    with psycopg.connect(_libpq(pg_url)) as other:
        other.execute(
            "CREATE TABLE vacuumed (id int PRIMARY KEY, pad text) WITH (autovacuum_enabled = false)"
        )
        other.execute(
            "INSERT INTO vacuumed SELECT n, repeat('x', 200) FROM generate_series(1, 5000) n"
        )
        other.execute("DELETE FROM vacuumed WHERE id % 2 = 0")
    return "vacuumed"


@contextmanager
def slow_vacuum(url: str, table: str) -> Iterator[int]:
    """``VACUUM table`` running in another session, slowed down to a page every 100 ms so it
    stays visible; cancelled (pg_cancel_backend) when the block ends. Yields its backend."""
    vacuuming = psycopg.connect(_libpq(url), autocommit=True)
    vacuuming.execute("SET vacuum_cost_delay = '100ms'")
    vacuuming.execute("SET vacuum_cost_limit = 1")
    backend = vacuuming.info.backend_pid

    def run() -> None:
        with suppress(psycopg.errors.QueryCanceled):
            vacuuming.execute(f"VACUUM {table}")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield backend
    finally:
        with psycopg.connect(_libpq(url), autocommit=True) as admin:

            def cancelled() -> bool:
                # Until it is gone: a cancel that came before the VACUUM began is not kept.
                admin.execute("SELECT pg_cancel_backend(%s)", (backend,))
                thread.join(0.05)
                return not thread.is_alive()

            _until(cancelled, "the VACUUM to be cancelled")
        vacuuming.close()


@pytest.mark.postgres
def test_a_vacuum_on_a_run_table_holds_the_run_until_it_ends(
    pg_engine: Engine, pg_url: str, vacuumable: str
) -> None:
    monitor = HealthMonitor(pg_engine, [Autovacuum(["sessions", vacuumable])])
    assert monitor.sample() is None
    with slow_vacuum(pg_url, vacuumable):
        held = _until(lambda: _holding(monitor, AUTOVACUUM), "the vacuum to show")
        assert held.describe() == "autovacuum on vacuumed"
        # A vacuum of a table the run does not write holds nothing.
        assert HealthMonitor(pg_engine, [Autovacuum(["sessions"])]).sample() is None
    _until(lambda: monitor.sample() is None, "the cancelled vacuum to be gone")


@pytest.fixture
def unprivileged_url(pg_server: Any, pg_url: str) -> Iterator[str]:
    """``pg_url`` as a role with no privilege beyond connecting (as an application's)."""
    role = f"pt_test_{RUN_ID}_watcher"
    with psycopg.connect(_libpq(pg_server.admin_url), autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        yield pg_url.replace("postgres@", f"{role}@", 1)
    finally:
        with psycopg.connect(_libpq(pg_server.admin_url), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            _until(
                lambda: (
                    not admin.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE usename = %s", (role,)
                    ).fetchone()
                ),
                "the role's sessions to end",
            )
            admin.execute(f'DROP ROLE "{role}"')


@pytest.mark.postgres
def test_a_vacuum_hidden_from_the_runs_role_is_reported_not_read_as_none(
    unprivileged_url: str, pg_url: str, vacuumable: str
) -> None:
    engine = make_engine(unprivileged_url)
    try:
        monitor = HealthMonitor(engine, [Autovacuum([vacuumable])])
        with slow_vacuum(pg_url, vacuumable):
            _until(lambda: monitor.sample() is None and monitor.problems(), "the problem")
        problem = monitor.problems()[AUTOVACUUM]
        assert "hides its table" in problem and "pg_monitor" in problem
        assert "\n" not in problem
    finally:
        engine.dispose()


# -- sessions blocked behind the run -------------------------------------------------------


@contextmanager
def waiting_for_row(url: str, application_name: str = "someone else") -> Iterator[None]:
    """Another session updating row 1 of ``locked`` in a thread (it waits while the row is
    locked); joined when the block ends."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(_libpq(url), application_name=application_name) as waiting:
                waiting.execute("SET lock_timeout = '60s'")
                waiting.execute("UPDATE locked SET n = n + 1 WHERE id = 1")
        except BaseException as error:  # reported by the test, not lost in the thread
            failures.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(WAIT_S)
        assert not thread.is_alive() and failures == []


@pytest.fixture
def locked_table(pg_url: str) -> str:
    with psycopg.connect(_libpq(pg_url)) as other:
        other.execute("CREATE TABLE locked (id int PRIMARY KEY, n int)")
        other.execute("INSERT INTO locked VALUES (1, 0)")
    return "locked"


@pytest.mark.postgres
def test_a_session_blocked_behind_the_run_holds_it_until_the_lock_is_gone(
    pg_engine: Engine, pg_url: str, locked_table: str
) -> None:
    monitor = HealthMonitor(pg_engine, [BlockedSessions(RUN_NAME, 0)])
    assert monitor.sample() is None
    with tag_connections(pg_engine, RUN_NAME).connect() as run:
        run.execute(text("UPDATE locked SET n = n + 1 WHERE id = 1"))
        with waiting_for_row(pg_url):
            held = _until(lambda: _holding(monitor, BLOCKED_SESSIONS), "the blocked session")
            assert held.value == 1
            assert held.describe() == "1 session blocked behind the run (limit 0)"
            run.rollback()
            _until(lambda: monitor.sample() is None, "the blocked session to go on")


@pytest.mark.postgres
def test_the_runs_own_backends_waiting_on_one_another_are_not_counted(
    pg_engine: Engine, pg_url: str, locked_table: str
) -> None:
    monitor = HealthMonitor(pg_engine, [BlockedSessions(RUN_NAME, 0)])
    with tag_connections(pg_engine, RUN_NAME).connect() as run:
        run.execute(text("UPDATE locked SET n = n + 1 WHERE id = 1"))
        with waiting_for_row(pg_url, application_name=RUN_NAME):
            waiting = text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = :name AND wait_event_type = 'Lock'"
            )

            def other_worker_waits() -> bool:
                with pg_engine.connect() as connection:
                    return bool(connection.execute(waiting, {"name": RUN_NAME}).scalar_one())

            _until(other_worker_waits, "the run's other backend to wait")
            assert monitor.sample() is None
            assert _reading(monitor, BLOCKED_SESSIONS).value == 0
            run.rollback()


# -- the oldest open transaction -----------------------------------------------------------


@pytest.mark.postgres
def test_an_open_transaction_holds_the_run_until_it_ends(pg_engine: Engine, pg_url: str) -> None:
    monitor = HealthMonitor(pg_engine, [OldestTransaction(0, RUN_NAME)])
    assert monitor.sample() is None
    with psycopg.connect(_libpq(pg_url)) as other:
        other.execute("SELECT txid_current()")  # psycopg began a transaction: it stays open
        held = monitor.sample()
        assert held is not None and held.signal == OLDEST_TRANSACTION and held.value > 0
        other.commit()
        assert monitor.sample() is None
        assert _reading(monitor, OLDEST_TRANSACTION).value == 0.0


@pytest.mark.postgres
def test_the_runs_own_transactions_are_not_the_oldest(pg_engine: Engine, pg_url: str) -> None:
    monitor = HealthMonitor(pg_engine, [OldestTransaction(0, RUN_NAME)])
    with psycopg.connect(_libpq(pg_url), application_name=RUN_NAME) as run:
        run.execute("SELECT txid_current()")
        assert monitor.sample() is None
        run.rollback()


# -- the operator's throttle query ---------------------------------------------------------


def _pause_table(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE pause_table (reason text)"))


def test_the_throttle_query_holds_the_run_while_it_returns_true(
    empty_db_url: str, engine_for: Any
) -> None:
    engine = engine_for(empty_db_url)
    _pause_table(engine)
    check_throttle_query(engine, PAUSE)
    monitor = HealthMonitor(engine, [ThrottleQuery(PAUSE)])
    assert monitor.sample() is None
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO pause_table VALUES ('deploy')"))
    held = monitor.sample()
    assert held is not None and held.describe() == "throttle query returned true"
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM pause_table"))
    assert monitor.sample() is None


def test_a_throttle_query_with_a_typo_is_refused_in_one_line_before_the_run(
    empty_db_url: str, engine_for: Any
) -> None:
    engine = engine_for(empty_db_url)
    for sql, expected in [
        ("SELECT EXISTS (SELECT 1 FROM no_such_table)", "no_such_table"),
        ("SELEC 1", "syntax error"),
        ("   ", "empty"),
        # Text is neither true nor false: 'no' would otherwise hold the run for ever.
        ("SELECT 'no'", "not true or false"),
    ]:
        with pytest.raises(InvalidInputError) as raised:
            check_throttle_query(engine, sql)
        message = str(raised.value)
        assert "--throttle-query" in message and expected in message
        assert "\n" not in message


@pytest.mark.postgres
def test_checking_a_throttle_query_writes_nothing(pg_engine: Engine) -> None:
    _pause_table(pg_engine)
    check_throttle_query(
        pg_engine, "WITH w AS (INSERT INTO pause_table VALUES ('x') RETURNING 1) SELECT false"
    )
    with pg_engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM pause_table")).scalar_one() == 0


# -- the monitor ---------------------------------------------------------------------------


def test_a_signal_that_fails_is_reported_and_the_monitor_goes_on(
    empty_db_url: str, engine_for: Any
) -> None:
    engine = engine_for(empty_db_url)
    _pause_table(engine)
    replica = LaggingReplica(100)
    with HealthMonitor(engine, [ThrottleQuery(PAUSE), replica], interval_s=0.01) as monitor:
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE pause_table"))
        _until(monitor.problems, "the failure to be reported")
        problem = monitor.problems()[THROTTLE_QUERY]
        assert problem.startswith("--throttle-query failed:") and "pause_table" in problem
        assert "\n" not in problem
        # The thread still samples: the other signal still trips and releases, and the query
        # counts again once its table is back.
        replica.lag_ms = 2_000
        _until(lambda: (held := monitor.holding()) and held.signal == REPLICA_LAG, "the lag")
        replica.lag_ms = 100
        _until(lambda: monitor.holding() is None, "the lag to go")
        _pause_table(engine)
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO pause_table VALUES ('deploy')"))
        _until(lambda: (held := monitor.holding()) and held.signal == THROTTLE_QUERY, "pause")
    assert list(monitor.problems()) == [THROTTLE_QUERY]


def test_a_monitor_that_cannot_connect_reports_every_signal_and_holds_nothing(
    tmp_path: Any,
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'missing' / 'nowhere.db'}")
    try:
        monitor = HealthMonitor(engine, [ThrottleQuery("SELECT 1"), LaggingReplica(9_999)])
        assert monitor.sample() is None
        assert set(monitor.problems()) == {THROTTLE_QUERY, REPLICA_LAG}
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_monitor_on_a_callers_connection_samples_in_savepoints_it_rolls_back(
    pg_engine: Engine,
) -> None:
    with pg_engine.connect() as connection:
        connection.exec_driver_sql("SET LOCAL lock_timeout = 777")
        replica = LaggingReplica(2_000)
        monitor = HealthMonitor(connection, [replica, OldestTransaction(3_600)]).start()
        held = monitor.holding()  # no thread on a caller's connection: sampled here
        assert held is not None and held.signal == REPLICA_LAG
        assert connection.exec_driver_sql("SHOW lock_timeout").scalar_one() == "777ms"
        assert connection.in_transaction()
        monitor.stop()
        connection.rollback()
