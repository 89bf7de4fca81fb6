"""verify, export and status where nothing may be written: a user with SELECT only, a read-only
replica (a hot standby, emulated with ``default_transaction_read_only``), a SQLite file opened
read-only; and ``--readonly``, which does not even try to write."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from prompt_tool.cli.orch_migrate import app
from prompt_tool.db import schema
from prompt_tool.db.dialect import read_only, write_refusal
from prompt_tool.db.engine import make_engine
from prompt_tool.db.models import MigrationRun
from prompt_tool.migrate import load_legacy_sample
from prompt_tool.migrate.backfill import backfill
from prompt_tool.migrate.export import export
from prompt_tool.migrate.status import status
from prompt_tool.migrate.verify import VerifyOptions, verify
from tests.cli_run import run_cli
from tests.conftest import DIALECTS, RUN_ID, PostgresServer

# A hot standby takes no writes from anyone; default_transaction_read_only makes a primary
# refuse them the same way (SQLSTATE 25006), even to a superuser.
_REPLICA_OPTIONS = "-c default_transaction_read_only=on"


@dataclass(frozen=True)
class ReadOnlyDatabase:
    """A backfilled legacy database: ``writer_url`` may write, ``reader_url`` may not."""

    writer_url: str
    reader_url: str
    reason: str  # in the note's words
    user: str


def _legacy_backfilled(url: str) -> None:
    schema.upgrade(url, "0001")
    load_legacy_sample(url, sessions=120, projects=2, seed=5)
    schema.upgrade(url)
    engine = make_engine(url)
    try:
        backfill(engine)
    finally:
        engine.dispose()


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def _select_only_role(server: PostgresServer, url: str) -> Iterator[str]:
    """A login role that may only read ``url``'s database; dropped afterwards, whatever
    happened (roles are cluster-wide)."""
    role = f"pt_test_{RUN_ID}_reader_{uuid.uuid4().hex[:6]}"
    database = make_url(url).database
    assert database
    identifier, db = sql.Identifier(role), sql.Identifier(database)
    with psycopg.connect(_libpq(url), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(identifier))
    try:
        with psycopg.connect(_libpq(url), autocommit=True) as admin:
            admin.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, identifier))
            admin.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(identifier))
            admin.execute(
                sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(identifier)
            )
        yield role
    finally:
        with psycopg.connect(_libpq(url), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            admin.execute(sql.SQL("DROP OWNED BY {}").format(identifier))
        with psycopg.connect(_libpq(server.admin_url), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(identifier))


@pytest.fixture(
    params=[
        pytest.param("select_only_user", marks=pytest.mark.postgres),
        pytest.param("replica", marks=pytest.mark.postgres),
        pytest.param("sqlite_read_only_file"),
    ]
)
def read_only_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReadOnlyDatabase]:
    kind = request.param
    if kind == "sqlite_read_only_file":
        path = tmp_path / "legacy.db"
        writer = f"sqlite:///{path}"
        _legacy_backfilled(writer)
        # Opened read-only by SQLite itself (the tests may run as root, whom chmod won't stop).
        yield ReadOnlyDatabase(
            writer, f"sqlite:///file:{path}?mode=ro&uri=true", "read-only database", ""
        )
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    writer = server.url_for(server.create_database("read_only"))
    _legacy_backfilled(writer)
    if kind == "replica":
        reader = make_url(writer).update_query_dict({"options": _REPLICA_OPTIONS})
        yield ReadOnlyDatabase(
            writer,
            reader.render_as_string(hide_password=False),
            "read-only transaction",
            make_url(writer).username or "",
        )
        return
    with _select_only_role(server, writer) as role:
        reader = make_url(writer).set(username=role, password=None)
        yield ReadOnlyDatabase(
            writer, reader.render_as_string(hide_password=False), "no write privilege", role
        )


@pytest.fixture
def engines(read_only_db: ReadOnlyDatabase) -> Iterator[tuple[Engine, Engine]]:
    """(writer, reader) engines of the read-only database."""
    writer, reader = make_engine(read_only_db.writer_url), make_engine(read_only_db.reader_url)
    yield writer, reader
    reader.dispose()
    writer.dispose()


def _runs(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(MigrationRun)).scalar_one())


def _counts(report: Any) -> list[dict[str, Any]]:
    return [dict(p.__dict__) for p in report.projects]


def _expected_note(db: ReadOnlyDatabase) -> str:
    return f"cannot write migration_runs ({db.reason}); the result below is complete"


def test_verify_runs_where_it_cannot_record_its_run(
    read_only_db: ReadOnlyDatabase, engines: tuple[Engine, Engine]
) -> None:
    writer, reader = engines
    before = _runs(writer)
    report = verify(reader)
    assert report.passed
    assert report.run_id is None
    assert report.not_recorded is not None
    assert report.not_recorded.startswith("run not recorded: ")
    assert _expected_note(read_only_db) in report.not_recorded
    assert read_only_db.user in report.not_recorded
    assert _runs(writer) == before
    assert _counts(report) == _counts(verify(writer))


def test_export_runs_where_it_cannot_record_its_run(
    read_only_db: ReadOnlyDatabase, engines: tuple[Engine, Engine], tmp_path: Path
) -> None:
    writer, reader = engines
    before = _runs(writer)
    result = export(reader, tmp_path / "read-only", jobs=2)
    assert result.run_id is None
    assert result.not_recorded is not None
    assert _expected_note(read_only_db) in result.not_recorded
    assert _runs(writer) == before
    by_writer = export(writer, tmp_path / "writer", jobs=2)
    assert [(t.table, t.rows, t.sha256) for t in result.tables] == [
        (t.table, t.rows, t.sha256) for t in by_writer.tables
    ]


def test_status_runs_where_nothing_may_be_written(engines: tuple[Engine, Engine]) -> None:
    writer, reader = engines
    seen = status(reader)
    assert [p.project for p in seen.projects] == ["project-1", "project-2"]
    assert seen.projects == status(writer).projects


def _note_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("run not recorded")]


def test_cli_verify_and_export_say_in_one_line_that_the_run_is_not_recorded(
    read_only_db: ReadOnlyDatabase, tmp_path: Path
) -> None:
    code, out, err = run_cli(app, ["orch-migrate", "verify", "--db", read_only_db.reader_url])
    assert code == 0, err
    assert "Traceback" not in out + err
    assert len(_note_lines(err)) == 1 and _expected_note(read_only_db) in err
    assert "(all)" in out

    code, out, err = run_cli(
        app, ["orch-migrate", "export", str(tmp_path / "out"), "--db", read_only_db.reader_url]
    )
    assert code == 0, err
    assert "Traceback" not in out + err
    assert len(_note_lines(err)) == 1 and _expected_note(read_only_db) in err
    assert (tmp_path / "out" / "manifest.json").exists()


def test_cli_verify_keeps_its_exit_code_for_differences_where_it_cannot_record(
    read_only_db: ReadOnlyDatabase,
) -> None:
    # A session added after the backfill is unmigrated: verify fails as it always does.
    writer = make_engine(read_only_db.writer_url)
    try:
        with writer.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO orchestration_sessions (project_id, name, system_prompt) "
                    "SELECT id, 'late', 'a text no template holds yet' FROM projects "
                    "ORDER BY id LIMIT 1"
                )
            )
    finally:
        writer.dispose()
    code, out, err = run_cli(
        app, ["orch-migrate", "verify", "--json", "--db", read_only_db.reader_url]
    )
    assert code == 1
    assert "Traceback" not in out + err
    assert json.loads(out)["passed"] is False
    assert len(_note_lines(err)) == 1
    assert "verify found differences" in err


def test_cli_status_runs_where_nothing_may_be_written(read_only_db: ReadOnlyDatabase) -> None:
    code, out, err = run_cli(
        app, ["orch-migrate", "status", "--json", "--db", read_only_db.reader_url]
    )
    assert code == 0, err
    assert "Traceback" not in out + err
    assert [p["project"] for p in json.loads(out)["projects"]] == ["project-1", "project-2"]


@pytest.fixture
def writable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A backfilled legacy database its user may write, on each dialect."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'writable.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("pg_server")
        url = server.url_for(server.create_database("writable"))
    _legacy_backfilled(url)
    yield url


@pytest.mark.parametrize("writable", DIALECTS, indirect=True)
def test_readonly_option_records_nothing_even_where_it_could(writable: str, tmp_path: Path) -> None:
    engine = make_engine(writable)
    try:
        before = _runs(engine)
        report = verify(engine, VerifyOptions(readonly=True))
        result = export(engine, tmp_path / "out", readonly=True)
        assert report.passed and report.run_id is None and result.run_id is None
        assert report.not_recorded == result.not_recorded
        assert report.not_recorded is not None and "--readonly" in report.not_recorded
        assert _runs(engine) == before
        # The engine writes as before afterwards: its connections are not left read-only.
        assert verify(engine).run_id is not None
        assert _runs(engine) == before + 1
    finally:
        engine.dispose()

    for command in (["verify"], ["export", str(tmp_path / "cli-out")]):
        code, out, err = run_cli(app, ["orch-migrate", *command, "--readonly", "--db", writable])
        assert code == 0, err
        assert "Traceback" not in out + err
        assert _note_lines(err) == [
            "run not recorded: --readonly writes nothing to the database; the result below "
            "is complete"
        ]


@pytest.mark.parametrize("writable", DIALECTS, indirect=True)
def test_readonly_reads_in_transactions_that_refuse_writes(writable: str) -> None:
    engine = make_engine(writable)
    try:
        reading = read_only(engine)
        with pytest.raises(DBAPIError) as refused, reading.begin() as connection:
            connection.execute(text("UPDATE projects SET name = name"))
        assert write_refusal(refused.value) in {"read-only transaction", "read-only database"}
        # Back in the pool, the same connections write again.
        with engine.begin() as connection:
            connection.execute(text("UPDATE projects SET name = name"))
    finally:
        engine.dispose()


@pytest.mark.parametrize("writable", DIALECTS, indirect=True)
def test_a_writer_still_records_its_runs(writable: str, tmp_path: Path) -> None:
    engine = make_engine(writable)
    try:
        before = _runs(engine)
        report = verify(engine)
        result = export(engine, tmp_path / "out")
        assert report.run_id is not None and report.not_recorded is None
        assert result.run_id is not None and result.not_recorded is None
        assert _runs(engine) == before + 2
    finally:
        engine.dispose()
    code, _out, err = run_cli(app, ["orch-migrate", "verify", "--db", writable])
    assert code == 0 and _note_lines(err) == []


@pytest.mark.parametrize("writable", DIALECTS, indirect=True)
def test_other_write_errors_are_not_taken_for_a_read_only_database(writable: str) -> None:
    engine = make_engine(writable)
    try:
        with pytest.raises(DBAPIError) as failed, engine.begin() as connection:
            connection.execute(
                text("INSERT INTO projects (id, slug, name) SELECT id, slug, name FROM projects")
            )
        assert write_refusal(failed.value) is None
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "command",
    [["backfill"], ["flag", "set", "--project", "project-1", "shadow"]],
    ids=" ".join,
)
def test_a_command_that_writes_says_in_one_line_that_it_may_not_write_here(
    read_only_db: ReadOnlyDatabase, command: list[str]
) -> None:
    code, out, err = run_cli(app, ["orch-migrate", *command, "--db", read_only_db.reader_url])
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"this command writes, and the database refused ({read_only_db.reason}" in err
    assert "run it as a user who may write" in err
