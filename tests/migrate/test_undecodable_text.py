"""Text the database holds but Python cannot decode: named, skipped, never changed.

SQLite keeps whatever bytes a raw driver gives it, so a legacy prompt column may hold text that
is not valid UTF-8 (a stray byte, or surrogates encoded CESU-style as ED A0 80). A PostgreSQL
database created with ``ENCODING 'SQL_ASCII'`` holds unchecked bytes in every text: every
command refuses it in one line.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from psycopg import sql
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import make_url

from prompt_tool.cli.orch_migrate import app
from prompt_tool.core import content_hash
from prompt_tool.db import schema
from prompt_tool.db.dialect import UnsupportedEncodingError, sha256_hex
from prompt_tool.db.engine import make_engine
from prompt_tool.db.models import MigrationRun, OrchestrationSession, SessionPromptRef
from prompt_tool.migrate.backfill import backfill
from prompt_tool.migrate.export import export
from prompt_tool.migrate.fingerprint import changed_tables, fingerprint_legacy_tables
from prompt_tool.migrate.restore import UnstorableTextError, restore
from prompt_tool.migrate.status import status
from prompt_tool.migrate.verify import VerifyOptions, verify
from tests.cli_run import run_cli

_STRAY_BYTE = "68ff69"  # h, 0xFF, i
_ENCODED_SURROGATE = "41eda08042"  # A, U+D800 encoded as UTF-8 would be (CESU-style), B
_COLUMNS = ("system_prompt", "planner_prompt", "synthesis_prompt")
_UNREADABLE = [
    "orchestration_sessions id 2 system_prompt",
    "orchestration_sessions id 3 synthesis_prompt",
]


def _stored(path: Path) -> list[tuple[Any, ...]]:
    """Every legacy text as SQLite stores it: exact bytes and storage class, by the raw driver."""
    connection = sqlite3.connect(path)
    connection.text_factory = bytes
    try:
        return connection.execute(
            "SELECT id, "
            + ", ".join(f"CAST({c} AS BLOB), typeof({c})" for c in _COLUMNS)
            + " FROM orchestration_sessions ORDER BY id"
        ).fetchall()
    finally:
        connection.close()


@pytest.fixture
def sqlite_path(sqlite_head_template: Path, tmp_path: Path) -> Path:
    """A SQLite database at head: session 1 readable, 2 and 3 each with one text that is not
    valid UTF-8, written through the raw driver."""
    path = tmp_path / "legacy.db"
    shutil.copyfile(sqlite_head_template, path)
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("INSERT INTO projects (slug, name) VALUES ('acme', 'Acme')")
        connection.execute(
            "INSERT INTO orchestration_sessions (project_id, name, system_prompt, planner_prompt) "
            "VALUES (1, 'fine', 'You are helpful.', 'Plan it.')"
        )
        connection.execute(
            "INSERT INTO orchestration_sessions (project_id, name, system_prompt, planner_prompt) "
            f"VALUES (1, 'stray byte', CAST(X'{_STRAY_BYTE}' AS TEXT), 'Plan it.')"
        )
        connection.execute(
            "INSERT INTO orchestration_sessions (project_id, name, system_prompt, "
            f"synthesis_prompt) VALUES (1, 'surrogate', 'You are helpful.', "
            f"CAST(X'{_ENCODED_SURROGATE}' AS TEXT))"
        )
    connection.close()
    return path


@pytest.fixture
def sqlite_engine(sqlite_path: Path, engine_for: Any) -> Any:
    return engine_for(f"sqlite:///{sqlite_path}")


def test_sqlite_digests_the_stored_bytes_and_valid_text_as_postgresql_does(
    sqlite_engine: Any,
) -> None:
    with sqlite_engine.connect() as connection:
        digests = dict(
            connection.execute(
                select(OrchestrationSession.id, sha256_hex(OrchestrationSession.system_prompt))
            ).all()
        )
    assert digests[1] == content_hash("You are helpful.")
    assert digests[2] == hashlib.sha256(bytes.fromhex(_STRAY_BYTE)).hexdigest()


def test_backfill_completes_names_unreadable_texts_and_leaves_them_unlinked(
    sqlite_engine: Any, sqlite_path: Path
) -> None:
    before = _stored(sqlite_path)
    summary = backfill(sqlite_engine)
    assert summary.unreadable == 2
    assert sorted(summary.unreadable_rows) == _UNREADABLE
    assert "2 legacy texts unreadable" in summary.describe()
    with sqlite_engine.connect() as connection:
        linked = set(
            connection.execute(select(SessionPromptRef.session_id, SessionPromptRef.role)).all()
        )
    assert linked == {(1, "system"), (1, "planner"), (2, "planner"), (3, "system")}
    assert _stored(sqlite_path) == before


def test_a_second_backfill_changes_nothing_and_counts_them_again(sqlite_engine: Any) -> None:
    backfill(sqlite_engine)
    again = backfill(sqlite_engine)
    assert not again.changed
    assert again.unreadable == 2
    assert sorted(again.unreadable_rows) == _UNREADABLE


def test_status_counts_unreadable_sessions_apart_and_says_backfill_cannot_link_them(
    sqlite_engine: Any,
) -> None:
    backfill(sqlite_engine)
    (acme,) = status(sqlite_engine).projects
    assert (acme.sessions, acme.migrated, acme.unmigrated, acme.stale, acme.unreadable) == (
        3,
        1,
        0,
        0,
        2,
    )
    assert not acme.readiness.ready
    assert any(
        "2 sessions hold legacy text that is not valid UTF-8" in r for r in acme.readiness.reasons
    )
    assert not any("unmigrated" in r for r in acme.readiness.reasons)


def test_fingerprint_reads_the_stored_bytes_and_tells_one_byte_changed(
    sqlite_path: Path,
) -> None:
    url = f"sqlite:///{sqlite_path}"
    before = fingerprint_legacy_tables(url)
    assert fingerprint_legacy_tables(url) == before
    connection = sqlite3.connect(sqlite_path)
    with connection:  # one invalid byte for another: 0xFF -> 0xFE
        connection.execute(
            "UPDATE orchestration_sessions SET system_prompt = CAST(X'68fe69' AS TEXT) WHERE id = 2"
        )
    connection.close()
    after = fingerprint_legacy_tables(url)
    assert changed_tables(before, after) == ["orchestration_sessions"]


def test_verify_names_unreadable_texts_and_fails_unless_unmigrated_are_allowed(
    sqlite_engine: Any, sqlite_path: Path
) -> None:
    before = _stored(sqlite_path)
    backfill(sqlite_engine)
    report = verify(sqlite_engine)
    assert not report.passed
    assert sorted(report.unreadable) == _UNREADABLE
    assert report.totals().unreadable == 2
    assert report.totals().matched == 4
    allowed = verify(sqlite_engine, VerifyOptions(allow_unmigrated=True))
    assert allowed.passed
    assert sorted(allowed.unreadable) == _UNREADABLE
    assert _stored(sqlite_path) == before


def test_the_cli_backfill_and_verify_name_the_rows_without_a_traceback(
    sqlite_path: Path,
) -> None:
    url = f"sqlite:///{sqlite_path}"
    code, out, err = run_cli(app, ["orch-migrate", "backfill", "--db", url])
    assert code == 0, err
    assert all(name in out for name in _UNREADABLE)
    code, out, err = run_cli(app, ["orch-migrate", "verify", "--db", url])
    assert code == 1
    assert "Traceback" not in err
    assert all(name in err for name in _UNREADABLE)
    code, out, err = run_cli(app, ["orch-migrate", "status", "--db", url])
    assert code == 0, err


def test_export_and_restore_into_sqlite_keep_the_exact_bytes(
    sqlite_engine: Any, sqlite_path: Path, sqlite_head_template: Path, tmp_path: Path
) -> None:
    backfill(sqlite_engine)
    export(sqlite_engine, tmp_path / "export", compress=True)
    target = tmp_path / "restored.db"
    shutil.copyfile(sqlite_head_template, target)
    engine = make_engine(f"sqlite:///{target}")
    try:
        result = restore(engine, tmp_path / "export")
        assert result.inserted > 0
        again = restore(engine, tmp_path / "export")  # compares equal: nothing to write
        assert again.inserted == 0 and again.different == 0
    finally:
        engine.dispose()
    assert _stored(target) == _stored(sqlite_path)
    assert (bytes.fromhex(_STRAY_BYTE), b"text") == _stored(target)[1][1:3]


def test_restore_into_postgresql_refuses_in_one_line_and_writes_nothing(
    sqlite_engine: Any, tmp_path: Path, pg_server: Any, pg_head_template: str
) -> None:
    export(sqlite_engine, tmp_path / "export")
    url = pg_server.url_for(pg_server.create_database("head", template=pg_head_template))
    code, _out, err = run_cli(
        app, ["orch-migrate", "restore", "--from", str(tmp_path / "export"), "--db", url]
    )
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "2 text value(s) that are not valid UTF-8" in err
    assert all(name in err for name in _UNREADABLE)
    engine = make_engine(url)
    try:
        with pytest.raises(UnstorableTextError):
            restore(engine, tmp_path / "export", dry_run=True)
        with engine.connect() as connection:
            assert connection.execute(select(func.count()).select_from(MigrationRun)).scalar() == 0
            sessions = select(func.count()).select_from(OrchestrationSession)
            assert connection.execute(sessions).scalar() == 0
    finally:
        engine.dispose()


# --- a PostgreSQL database in SQL_ASCII -----------------------------------------------------


def _libpq(url: str, database: str) -> str:
    return make_url(url).set(drivername="postgresql", database=database).render_as_string(False)


def _raw_legacy_texts(url: str) -> list[tuple[Any, ...]]:
    # Under SQL_ASCII psycopg hands text back as bytes: exactly what is stored.
    with psycopg.connect(url) as connection:
        return connection.execute(
            "SELECT id, system_prompt FROM orchestration_sessions ORDER BY id"
        ).fetchall()


@pytest.fixture
def sql_ascii_url(pg_server: Any) -> Iterator[str]:
    """A SQL_ASCII database at head (upgraded around prompt-tool's engine, which refuses it)
    holding a legacy session whose system prompt has the byte 0xFF; dropped at the end."""
    name = f"pt_test_sql_ascii_{uuid.uuid4().hex[:8]}"
    admin_url = _libpq(pg_server.admin_url, make_url(pg_server.admin_url).database or "postgres")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL(
                "CREATE DATABASE {} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' "
                "TEMPLATE template0"
            ).format(sql.Identifier(name))
        )
    url = _libpq(pg_server.admin_url, name)
    try:
        raw = create_engine(
            url.replace("postgresql://", "postgresql+psycopg://", 1),
            connect_args={"client_encoding": "UTF8"},
        )
        try:
            with raw.connect() as connection:
                command.upgrade(schema.alembic_config(connection), "head")
                connection.commit()
        finally:
            raw.dispose()
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("INSERT INTO projects (slug, name) VALUES ('acme', 'Acme')")
            connection.execute(
                "INSERT INTO orchestration_sessions (project_id, name, system_prompt) "
                "SELECT id, 'stray byte', convert_from(%s, 'SQL_ASCII') FROM projects",
                (bytes.fromhex(_STRAY_BYTE),),
            )
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def test_every_command_refuses_a_sql_ascii_database_in_one_line(
    sql_ascii_url: str, sqlite_head_template: Path, tmp_path: Path
) -> None:
    before = _raw_legacy_texts(sql_ascii_url)
    assert before == [(1, bytes.fromhex(_STRAY_BYTE))]
    empty = make_engine(f"sqlite:///{sqlite_head_template}")
    try:
        export(empty, tmp_path / "an-export", record_run=False)
    finally:
        empty.dispose()
    commands = [
        ["status"],
        ["verify"],
        ["verify", "--readonly"],
        ["backfill"],
        ["export", str(tmp_path / "out")],
        ["restore", "--from", str(tmp_path / "an-export")],
        ["fingerprint"],
        ["db", "current"],
        ["db", "upgrade"],
        ["flag", "set", "--project", "acme", "shadow"],
    ]
    for arguments in commands:
        code, out, err = run_cli(app, ["orch-migrate", *arguments, "--db", sql_ascii_url])
        assert code == 2, (arguments, out, err)
        assert "Traceback" not in err and err.count("\n") == 1, (arguments, err)
        assert "uses encoding SQL_ASCII" in err and "needs a UTF8 database" in err, err
    assert not (tmp_path / "out").exists()
    assert _raw_legacy_texts(sql_ascii_url) == before
    with psycopg.connect(sql_ascii_url) as connection:
        assert connection.execute("SELECT count(*) FROM migration_runs").fetchone() == (0,)
        assert connection.execute("SELECT count(*) FROM session_prompt_refs").fetchone() == (0,)


def test_the_library_refuses_a_sql_ascii_database_before_reading(sql_ascii_url: str) -> None:
    engine = make_engine(sql_ascii_url)
    try:
        with pytest.raises(UnsupportedEncodingError, match="SQL_ASCII"):
            backfill(engine)
    finally:
        engine.dispose()
