"""A backfill (and a restore) beside a session that holds a lock: it never waits without a
word, it gives up in one line that says it retried, who holds the lock and that a re-run
carries on, and the re-run does (PostgreSQL: SQLite has one writer and its busy timeout)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, func, select

from prompt_tool.cli.orch_migrate import app
from prompt_tool.db.models import MigrationRun, Project, SessionPromptRef
from prompt_tool.errors import LockTimeoutError
from prompt_tool.migrate.backfill import BackfillOptions, BackfillProgress, backfill
from prompt_tool.settings import get_settings
from tests.cli_run import run_cli

pytestmark = pytest.mark.postgres

SHORT_WAITS = get_settings().with_(migration_lock_timeout_ms=100)
FEW_RETRIES = {"max_retries": 2}


@pytest.fixture
def pg_legacy_url(pg_url: str) -> str:
    from prompt_tool.db import schema
    from prompt_tool.migrate import load_legacy_sample

    schema.upgrade(pg_url, "0001")
    load_legacy_sample(pg_url, sessions=600, projects=3, seed=5)
    schema.upgrade(pg_url)
    return pg_url


@contextmanager
def table_locked(url: str, table: str) -> Iterator[int]:
    """``table`` held in ACCESS EXCLUSIVE mode by another session, as from psql; its pid."""
    libpq = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(libpq) as other:
        other.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        yield int(other.info.backend_pid)
        other.rollback()


def _references(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(SessionPromptRef)).scalar())


def test_a_lock_held_before_the_start_ends_the_run_in_one_line_naming_its_holder(
    pg_legacy_url: str, engine_for: Any
) -> None:
    engine = engine_for(pg_legacy_url)
    with (
        table_locked(pg_legacy_url, "orchestration_sessions") as holder,
        pytest.raises(LockTimeoutError) as raised,
    ):
        backfill(engine, BackfillOptions(**FEW_RETRIES), settings=SHORT_WAITS)
    message = str(raised.value)
    assert "gave up after 3 attempts" in message
    assert f"backend {holder}" in message
    assert "AccessExclusiveLock" in message
    assert "nothing was written" in message
    assert "run the same command again" in message
    assert "\n" not in message
    assert _references(engine) == 0
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(MigrationRun)).scalar() == 0


def test_a_lock_taken_mid_run_keeps_what_was_committed_and_a_rerun_carries_on(
    pg_legacy_url: str, engine_for: Any
) -> None:
    engine = engine_for(pg_legacy_url)
    locks: list[Any] = []

    def lock_after_first_batch(progress: BackfillProgress) -> None:
        if not locks:
            held = table_locked(pg_legacy_url, "session_prompt_refs")
            held.__enter__()
            locks.append(held)

    try:
        with pytest.raises(LockTimeoutError) as raised:
            backfill(
                engine,
                BackfillOptions(batch_size=100, **FEW_RETRIES),
                progress=lock_after_first_batch,
                settings=SHORT_WAITS,
            )
    finally:
        for held in locks:
            held.__exit__(None, None, None)
    assert "the batch before it (100 sessions) is committed" in str(raised.value)
    committed = _references(engine)
    assert committed > 0
    again = backfill(engine, BackfillOptions(), settings=SHORT_WAITS)
    assert again.resumed_after is not None
    assert again.sessions_scanned < 600
    assert _references(engine) > committed
    assert backfill(engine, BackfillOptions(), settings=SHORT_WAITS).changed is False


def test_the_cli_exits_75_with_one_line_when_a_lock_outlasts_the_retries(
    pg_legacy_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMPT_TOOL_LOCK_TIMEOUT_MS", "100")
    get_settings.cache_clear()
    try:
        with table_locked(pg_legacy_url, "orchestration_sessions"):
            code, _out, err = run_cli(app, ["orch-migrate", "backfill", "--db", pg_legacy_url])
    finally:
        get_settings.cache_clear()
    assert code == 75, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "gave up after" in err and "run the same command again" in err


def test_backfill_wait_still_queues_behind_another_run_without_a_lock_timeout(
    pg_legacy_url: str, engine_for: Any
) -> None:
    """--wait queues on the advisory lock: the run's lock_timeout must not cut that short."""
    from prompt_tool.db.dialect import acquire_advisory_lock
    from prompt_tool.db.engine import bounded_waits

    engine = engine_for(pg_legacy_url)
    bounded = bounded_waits(engine, 100, 60_000)
    with bounded.connect() as connection:
        # Free key: returns at once; what matters is that the wait path clears the timeouts.
        assert acquire_advisory_lock(connection, 4242, wait=True)
        assert connection.exec_driver_sql("SHOW lock_timeout").scalar() == "0"


def test_a_restore_behind_a_held_lock_stops_in_one_line_and_writes_nothing(
    pg_legacy_url: str, pg_server: Any, engine_for: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    from prompt_tool.db import schema
    from prompt_tool.migrate.export import export

    export(engine_for(pg_legacy_url), tmp_path / "backup")
    target = pg_server.url_for(pg_server.create_database("restore_target"))
    schema.upgrade(target)
    monkeypatch.setenv("PROMPT_TOOL_LOCK_TIMEOUT_MS", "100")
    get_settings.cache_clear()
    try:
        with table_locked(target, "prompts") as holder:
            code, _out, err = run_cli(
                app, ["orch-migrate", "restore", "--from", str(tmp_path / "backup"), "--db", target]
            )
    finally:
        get_settings.cache_clear()
    assert code == 75, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"backend {holder}" in err
    assert "nothing was written" in err and "run the same command again" in err
    with engine_for(target).connect() as connection:
        assert connection.execute(select(func.count()).select_from(Project)).scalar() == 0
