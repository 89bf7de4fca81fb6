"""Bulk reads and writes of whole tables (db/bulk_io): the one copy machinery export, restore and
``rehearse --scratch`` share, on real PostgreSQL and SQLite databases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import DBAPIError

from prompt_tool.db import schema
from prompt_tool.db.bulk_io import TableShape, copy_table, dialect_io, kind_of
from prompt_tool.db.dialect import write_refusal
from prompt_tool.db.engine import make_engine
from prompt_tool.db.models import Base
from prompt_tool.migrate import load_legacy_sample
from prompt_tool.migrate.rehearse import copy_database
from tests.migrate.test_export_restore import _new_head_db


def _other_head_db(dialect: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A second database at head with no rows, beside conftest's ``head_db_url``."""
    return _new_head_db(dialect, request, tmp_path, "other")


def _shape(name: str) -> TableShape:
    model = Base.metadata.tables[name]
    return TableShape(
        name=name,
        columns=tuple(c.name for c in model.columns),
        kinds=tuple(kind_of(c.type) for c in model.columns),
        primary_key=tuple(c.name for c in model.primary_key.columns),
    )


def _rows(engine: Engine, table: str) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return [
            tuple(row) for row in connection.execute(text(f"SELECT * FROM {table} ORDER BY id"))
        ]


def _add_project(engine: Engine, slug: str) -> int:
    with engine.begin() as connection:
        return int(
            connection.execute(
                text("INSERT INTO projects (slug, name) VALUES (:slug, :slug) RETURNING id"),
                {"slug": slug},
            ).scalar_one()
        )


def _copy_projects(source: Engine, target: Engine) -> int:
    with source.connect() as reader, dialect_io(reader).source_snapshot(reader):
        columns = [c["name"] for c in inspect(reader).get_columns("projects")]
        with target.begin() as writer:
            return copy_table(reader, writer, "projects", columns, ["id"], batch_rows=2)


def _set_sequence(engine: Engine, table: str, value: int) -> None:
    with engine.begin() as connection:
        connection.execute(
            text("SELECT setval(pg_get_serial_sequence(:table, 'id'), :value)"),
            {"table": table, "value": value},
        )


def test_a_copy_holds_every_row_as_stored_and_new_ids_come_after_the_copied_ones(
    db_engine: Engine, dialect: str, request: pytest.FixtureRequest, tmp_path: Path, engine_for: Any
) -> None:
    for slug in ("gamma", "delta", "epsilon"):
        _add_project(db_engine, slug)
    target = engine_for(_other_head_db(dialect, request, tmp_path))

    copied = _copy_projects(db_engine, target)

    assert copied == 5
    assert _rows(target, "projects") == _rows(db_engine, "projects")
    assert _add_project(target, "after") == max(row[0] for row in _rows(db_engine, "projects")) + 1


@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgresql"])
def test_a_copy_never_moves_a_sequence_back(
    db_engine: Engine, request: pytest.FixtureRequest, tmp_path: Path, engine_for: Any
) -> None:
    target = engine_for(_other_head_db("postgresql", request, tmp_path))
    _set_sequence(target, "projects", 1000)  # ids up to 1000 were handed out there already

    _copy_projects(db_engine, target)

    assert _add_project(target, "after") == 1001


@pytest.mark.postgres
def test_a_rehearsal_copy_into_a_scratch_database_whose_sequences_are_ahead_keeps_them_ahead(
    pg_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = pg_server.url_for(pg_server.create_database("source"))
    schema.upgrade(source, "0001")
    load_legacy_sample(source, sessions=20, projects=2, seed=3)
    scratch = pg_server.url_for(pg_server.create_database("scratch"))
    upgrade = schema.upgrade
    tables = ("projects", "prompts", "prompt_versions", "orchestration_sessions")
    ahead = 10_000

    def upgrade_then_hand_out_ids(url: str, revision: str) -> Any:
        # The scratch database's sequences end up past every id the copy brings (as when ids
        # were handed out there): the copy must leave them there, not move them back to max(id).
        state = upgrade(url, revision)
        if url == scratch:
            engine = make_engine(url)
            try:
                for table in tables:
                    _set_sequence(engine, table, ahead)
            finally:
                engine.dispose()
        return state

    monkeypatch.setattr(schema, "upgrade", upgrade_then_hand_out_ids)

    copied = copy_database(source, scratch)

    assert copied["orchestration_sessions"] == 20
    engine = make_engine(scratch)
    try:
        with engine.connect() as connection:
            last = {
                table: connection.execute(
                    text("SELECT pg_sequence_last_value(pg_get_serial_sequence(:t, 'id'))"),
                    {"t": table},
                ).scalar_one()
                for table in tables
            }
    finally:
        engine.dispose()
    assert last == dict.fromkeys(tables, ahead)


def _lines(engine: Engine, shape: TableShape) -> bytes:
    with engine.connect() as connection:
        bulk = dialect_io(connection)
        with bulk.snapshot(connection):
            return b"".join(data for data, _ in bulk.stream_lines(connection, shape, None))


def test_rows_read_in_portable_form_and_written_back_are_the_same_rows(
    db_engine: Engine, dialect: str, request: pytest.FixtureRequest, tmp_path: Path, engine_for: Any
) -> None:
    shape = _shape("projects")
    lines = _lines(db_engine, shape)
    rows = [json.loads(line) for line in lines.splitlines()]
    target = engine_for(_other_head_db(dialect, request, tmp_path))

    with target.begin() as writer:
        bulk = dialect_io(writer)
        bind = bulk.binder(shape)
        names = [f"c{i}" for i in range(len(shape.columns))]
        with bulk.restoring(writer):
            writer.execute(
                text(bulk.insert_sql(shape)),
                [dict(zip(names, bind(row), strict=True)) for row in rows],
            )
            bulk.advance_identity(writer, shape.name, shape.columns)
        fetched = bulk.fetch_rows(writer, shape, [(row[0],) for row in rows])

    assert len(rows) == 2
    assert _lines(target, shape) == lines
    assert sorted(fetched) == sorted(rows)
    assert _add_project(target, "after") == max(row[0] for row in rows) + 1


def test_nothing_can_be_written_while_a_copy_reads_its_source(db_engine: Engine) -> None:
    with db_engine.connect() as connection:
        reading = dialect_io(connection).source_snapshot(connection)
        with reading, pytest.raises(DBAPIError) as refused:
            connection.execute(text("INSERT INTO projects (slug, name) VALUES ('x', 'x')"))
        assert write_refusal(refused.value) in ("read-only transaction", "read-only database")
    # The connection went back to the pool writable.
    assert _add_project(db_engine, "writable") > 0
