"""The expand step is safe on a live PostgreSQL: linted by squawk, bounded by lock_timeout,
indexes built concurrently, and re-runnable after an interruption."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import inspect, text

from prompt_tool.db import schema
from prompt_tool.errors import SchemaError
from prompt_tool.migrate import changed_tables, fingerprint_legacy_tables, load_legacy_sample
from prompt_tool.settings import get_settings

REPO = Path(__file__).resolve().parents[2]
EXISTING_TABLES = ("prompts", "prompt_versions", "orchestration_sessions", "ab_tests")
HEAD = schema.history()[-1].revision


def _squawk() -> str:
    found = shutil.which("squawk") or str(Path(sys.executable).parent / "squawk")
    assert Path(found).exists(), "squawk-cli is part of the test extra"
    return found


@pytest.fixture(scope="module")
def offline_sql() -> str:
    """What `alembic upgrade 0001:0002 --sql` prints for PostgreSQL."""
    buffer = io.StringIO()
    config = schema.alembic_config()
    config.output_buffer = buffer
    config.set_main_option("sqlalchemy.url", "postgresql+psycopg://offline/none")
    command.upgrade(config, "0001:0002", sql=True)
    return buffer.getvalue()


def _lint(sql: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "migration.sql"
    path.write_text(sql)
    return subprocess.run(
        [_squawk(), "--config", str(REPO / ".squawk.toml"), "--reporter", "gcc", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_squawk_finds_nothing_unjustified_in_the_expand_step(
    offline_sql: str, tmp_path: Path
) -> None:
    result = _lint(offline_sql, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_squawk_would_catch_a_blocking_index(tmp_path: Path) -> None:
    result = _lint("CREATE INDEX ix_bad ON prompts (name);\n", tmp_path)
    assert result.returncode != 0
    assert "require-concurrent-index-creation" in result.stdout


def test_offline_sql_sets_timeouts_before_any_ddl(offline_sql: str) -> None:
    first_ddl = re.search(r"^(ALTER|CREATE|DROP)", offline_sql, re.MULTILINE)
    assert first_ddl is not None
    preamble = offline_sql[: first_ddl.start()]
    assert "SET lock_timeout" in preamble
    assert "SET statement_timeout" in preamble


def test_every_index_on_an_existing_table_is_built_concurrently(offline_sql: str) -> None:
    for statement in re.findall(r"^CREATE (?:UNIQUE )?INDEX.*$", offline_sql, re.MULTILINE):
        table = re.search(r" ON (\w+)", statement)
        assert table is not None
        if table.group(1) in EXISTING_TABLES:
            assert "CONCURRENTLY" in statement, statement


def test_constraint_is_added_not_valid_and_validated_in_another_transaction(
    offline_sql: str,
) -> None:
    added = offline_sql.index("NOT VALID")
    validated = offline_sql.index("VALIDATE CONSTRAINT")
    assert "COMMIT" in offline_sql[added:validated]


def test_existing_tables_only_gain_nullable_or_constant_default_columns(offline_sql: str) -> None:
    for statement in re.findall(r"^ALTER TABLE (\w+) ADD COLUMN .*;$", offline_sql, re.MULTILINE):
        assert statement in EXISTING_TABLES
    for column in re.findall(r"^ALTER TABLE \w+ ADD COLUMN .*;$", offline_sql, re.MULTILINE):
        assert "NOT NULL" not in column or re.search(r"DEFAULT '[^']*' NOT NULL", column), column


@pytest.fixture
def legacy_pg_url(pg_url: str) -> str:
    schema.upgrade(pg_url, "0001")
    load_legacy_sample(pg_url, sessions=100, projects=2, seed=3)
    return pg_url


@pytest.fixture
def short_lock_timeout(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PROMPT_TOOL_LOCK_TIMEOUT_MS", "200")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.mark.postgres
def test_upgrade_gives_up_on_a_held_lock_and_leaves_nothing_half_done(
    legacy_pg_url: str, engine_for: Any, short_lock_timeout: Any
) -> None:
    before = fingerprint_legacy_tables(legacy_pg_url)
    reader = engine_for(legacy_pg_url).connect()
    reader.begin()
    reader.execute(text("SELECT count(*) FROM prompts"))  # holds ACCESS SHARE until rollback

    with pytest.raises(SchemaError, match="gave up waiting for a table lock"):
        schema.upgrade(legacy_pg_url)

    reader.rollback()
    reader.close()
    assert schema.current(legacy_pg_url).current == "0001"
    columns = {c["name"] for c in inspect(engine_for(legacy_pg_url)).get_columns("prompts")}
    assert "prompt_type" not in columns
    assert changed_tables(before, fingerprint_legacy_tables(legacy_pg_url)) == []

    assert schema.upgrade(legacy_pg_url).current == HEAD


@pytest.mark.postgres
def test_upgrade_recovers_from_an_interrupted_concurrent_index_build(
    legacy_pg_url: str, engine_for: Any
) -> None:
    schema.upgrade(legacy_pg_url)
    engine = engine_for(legacy_pg_url)
    # Recreate what a crash during CREATE INDEX CONCURRENTLY leaves: an INVALID index, the
    # transactional part of 0002 applied, alembic_version still at 0001.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("DROP INDEX uq_prompts_global_name"))
        connection.execute(
            text(
                "INSERT INTO prompts (name, content, scope) VALUES "
                "('twin', 'a', 'global'), ('twin', 'b', 'global')"
            )
        )
        with pytest.raises(Exception, match="could not create unique index"):
            connection.execute(
                text(
                    "CREATE UNIQUE INDEX CONCURRENTLY uq_prompts_global_name ON prompts (name) "
                    "WHERE scope = 'global'"
                )
            )
        connection.execute(text("DELETE FROM prompts WHERE name = 'twin' AND content = 'b'"))
        connection.execute(text("UPDATE alembic_version SET version_num = '0001'"))

    assert schema.upgrade(legacy_pg_url).current == HEAD

    with engine.connect() as connection:
        valid = connection.execute(
            text(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE c.relname = 'uq_prompts_global_name'"
            )
        ).scalar_one()
    assert valid is True


def test_upgrade_is_re_runnable_after_a_partial_expand(empty_db_url: str, engine_for: Any) -> None:
    schema.upgrade(empty_db_url)
    with engine_for(empty_db_url).begin() as connection:
        connection.execute(text("DROP INDEX ix_prompts_scope_name"))
        connection.execute(text("DROP TABLE migration_batches"))
        connection.execute(text("UPDATE alembic_version SET version_num = '0001'"))

    assert schema.upgrade(empty_db_url).current == HEAD
    inspector = inspect(engine_for(empty_db_url))
    assert "migration_batches" in inspector.get_table_names()
    assert "ix_prompts_scope_name" in {i["name"] for i in inspector.get_indexes("prompts")}


# --- 0003: the backfill quarantine ---------------------------------------------------------


@pytest.fixture(scope="module")
def quarantine_sql() -> str:
    """What `alembic upgrade 0002:0003 --sql` prints for PostgreSQL."""
    buffer = io.StringIO()
    config = schema.alembic_config()
    config.output_buffer = buffer
    config.set_main_option("sqlalchemy.url", "postgresql+psycopg://offline/none")
    command.upgrade(config, "0002:0003", sql=True)
    return buffer.getvalue()


def test_squawk_finds_nothing_unjustified_in_the_quarantine_step(
    quarantine_sql: str, tmp_path: Path
) -> None:
    result = _lint(quarantine_sql, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_quarantine_step_sets_timeouts_first_and_only_creates(quarantine_sql: str) -> None:
    first_ddl = re.search(r"^(ALTER|CREATE|DROP)", quarantine_sql, re.MULTILINE)
    assert first_ddl is not None
    preamble = quarantine_sql[: first_ddl.start()]
    assert "SET lock_timeout" in preamble and "SET statement_timeout" in preamble
    statements = re.findall(r"^(ALTER|CREATE|DROP)[^\n]*", quarantine_sql, re.MULTILINE)
    assert statements == ["CREATE", "CREATE"]  # the table, its index: nothing existing altered
    assert "CREATE TABLE IF NOT EXISTS migration_quarantine" in quarantine_sql
    assert "CREATE INDEX IF NOT EXISTS ix_migration_quarantine_project_id" in quarantine_sql


def test_the_quarantine_step_is_re_runnable_and_its_downgrade_the_exact_inverse(
    empty_db_url: str, engine_for: Any
) -> None:
    schema.upgrade(empty_db_url, "0002")
    engine = engine_for(empty_db_url)

    def shape() -> dict[str, Any]:
        inspector = inspect(engine)
        return {
            table: (
                [c["name"] for c in inspector.get_columns(table)],
                sorted(i["name"] for i in inspector.get_indexes(table)),
                sorted(str(fk["name"]) for fk in inspector.get_foreign_keys(table)),
            )
            for table in inspector.get_table_names()
        }

    at_0002 = shape()
    assert schema.upgrade(empty_db_url).current == "0003"
    with engine.begin() as connection:  # what an interruption could leave: the table alone
        connection.execute(text("DROP INDEX ix_migration_quarantine_project_id"))
        connection.execute(text("UPDATE alembic_version SET version_num = '0002'"))
    engine.dispose()
    assert not schema.check(empty_db_url).consistent  # 0003's table here at 0002: it says so

    assert schema.upgrade(empty_db_url).current == "0003"
    assert schema.check(empty_db_url).consistent
    assert "ix_migration_quarantine_project_id" in {
        i["name"] for i in inspect(engine).get_indexes("migration_quarantine")
    }
    engine.dispose()
    assert schema.downgrade(empty_db_url).current == "0002"
    engine.dispose()
    assert shape() == at_0002


def test_db_check_reports_a_missing_quarantine_table_at_0003(
    empty_db_url: str, engine_for: Any
) -> None:
    schema.upgrade(empty_db_url)
    with engine_for(empty_db_url).begin() as connection:
        connection.execute(text("DROP TABLE migration_quarantine"))

    drift = schema.check(empty_db_url).drift

    assert len(drift) == 1
    assert "migration_quarantine is missing at 0003" in drift[0]
    assert "`orch-migrate db stamp 0002` then `orch-migrate db upgrade`" in drift[0]
    schema.stamp(empty_db_url, "0002")
    assert schema.upgrade(empty_db_url).current == "0003"
    assert schema.check(empty_db_url).consistent
