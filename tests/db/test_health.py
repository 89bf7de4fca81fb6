"""The server's health, read for a backfill: the real queries against the real server (no
replica here: no replica reads as healthy), SQLite saying it has none of them, and a run's
connections tagged with its application_name inside each transaction only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text

from prompt_tool.db.engine import bounded_waits
from prompt_tool.db.health import (
    oldest_transaction_s,
    replica_lag_ms,
    run_throttle_query,
    sessions_blocked_by,
    tag_connections,
    vacuums_running,
    wal_position,
)

RUN_NAME = "orch-migrate backfill 7"


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture
def pg_engine(pg_url: str, engine_for: Any) -> Engine:
    engine: Engine = engine_for(pg_url)
    return engine


def _application_name(connection: Any) -> str:
    return str(
        connection.execute(
            text("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        ).scalar_one()
    )


def test_sqlite_has_none_of_the_servers_signals_but_runs_a_throttle_query(
    tmp_path: Path, engine_for: Any
) -> None:
    engine = engine_for(f"sqlite:///{tmp_path / 'health.db'}")
    with engine.connect() as connection:
        assert replica_lag_ms(connection) is None
        assert wal_position(connection) is None
        assert vacuums_running(connection, ["sessions"]) is None
        assert sessions_blocked_by(connection, RUN_NAME) is None
        assert oldest_transaction_s(connection, RUN_NAME) is None
        assert run_throttle_query(connection, "SELECT 'a%' LIKE 'a%' AND ':x' = ':x'") is True
        assert run_throttle_query(connection, "SELECT 0") is False
    assert tag_connections(engine, RUN_NAME) is engine


@pytest.mark.postgres
def test_without_a_replica_the_replay_lag_reads_zero_not_unknown(pg_engine: Engine) -> None:
    with pg_engine.connect() as connection:
        assert replica_lag_ms(connection) == 0.0


@pytest.mark.postgres
def test_the_wal_position_moves_forward_when_another_session_writes(
    pg_engine: Engine, pg_url: str
) -> None:
    with pg_engine.connect() as connection:
        before = wal_position(connection)
    assert isinstance(before, int) and before > 0
    with psycopg.connect(_libpq(pg_url)) as other:
        other.execute("CREATE TABLE scratch (pad text)")
        other.execute("INSERT INTO scratch SELECT repeat('x', 1000) FROM generate_series(1, 2000)")
    with pg_engine.connect() as connection:
        after = wal_position(connection)
    assert after is not None and after - before > 2_000_000


@pytest.mark.postgres
def test_the_throttle_query_is_run_as_written_percent_signs_and_colons_included(
    pg_engine: Engine,
) -> None:
    with pg_engine.connect() as connection:
        assert run_throttle_query(connection, "SELECT 'a%' LIKE 'a%' AND ':x' = ':x'") is True
        assert run_throttle_query(connection, "SELECT 1 WHERE false") is False
        assert run_throttle_query(connection, "SELECT 3") is True


@pytest.mark.postgres
def test_nothing_running_reads_as_no_vacuum_no_blocked_session_and_no_old_transaction(
    pg_engine: Engine,
) -> None:
    with pg_engine.connect() as connection:
        assert vacuums_running(connection, ["scratch"]) == []
        assert sessions_blocked_by(connection, RUN_NAME) == 0
        assert oldest_transaction_s(connection, RUN_NAME) == 0.0


@pytest.mark.postgres
def test_a_tagged_engine_names_the_run_inside_each_transaction_and_leaves_no_trace(
    pg_engine: Engine,
) -> None:
    tagged = tag_connections(pg_engine, RUN_NAME)
    with tagged.connect() as connection:
        assert _application_name(connection) == RUN_NAME
        connection.commit()
        backend = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert _application_name(connection) == RUN_NAME
        connection.rollback()
    with pg_engine.connect() as connection:
        # The pool's connection (the same backend, most likely) went back untagged.
        assert connection.execute(text("SELECT pg_backend_pid()")).scalar_one() == backend
        assert _application_name(connection) != RUN_NAME


@pytest.mark.postgres
@pytest.mark.parametrize(
    "tag_first", [True, False], ids=["tagged-then-bounded", "bounded-then-tagged"]
)
def test_tagging_composes_with_bounded_waits_in_either_order(
    pg_engine: Engine, tag_first: bool
) -> None:
    if tag_first:
        engine = bounded_waits(tag_connections(pg_engine, RUN_NAME), 123, 4567)
    else:
        engine = tag_connections(bounded_waits(pg_engine, 123, 4567), RUN_NAME)
    assert isinstance(engine, Engine)
    with engine.connect() as connection:
        assert _application_name(connection) == RUN_NAME
        assert connection.exec_driver_sql("SHOW lock_timeout").scalar_one() == "123ms"
        assert connection.exec_driver_sql("SHOW statement_timeout").scalar_one() == "4567ms"


@pytest.mark.postgres
def test_a_callers_connection_is_tagged_for_the_rest_of_its_transaction(
    pg_engine: Engine,
) -> None:
    def seen_by_others(backend: int) -> str:
        with pg_engine.connect() as other:
            return str(
                other.execute(
                    text("SELECT application_name FROM pg_stat_activity WHERE pid = :pid"),
                    {"pid": backend},
                ).scalar_one()
            )

    with pg_engine.connect() as connection:
        backend = int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())
        assert tag_connections(connection, RUN_NAME) is connection
        assert seen_by_others(backend) == RUN_NAME
        connection.rollback()
        assert seen_by_others(backend) != RUN_NAME
