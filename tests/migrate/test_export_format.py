"""The export format's value rules, without a database: each spelling maps back exactly, and
values that mean the same compare equal whichever database wrote them."""

from __future__ import annotations

import json

import pytest

from prompt_tool.db.bulk_io import (
    _portable_timestamp_to_sqlite,
    _sqlite_timestamp_to_portable,
)
from prompt_tool.db.models import Base
from prompt_tool.migrate.archive import (
    ARCHIVED_TABLES,
    FORMAT_NAME,
    InvalidExportError,
    Manifest,
    TableSpec,
    normalizer,
)


def _through_a_file(value: object) -> object:
    return json.loads(json.dumps(value))


@pytest.mark.parametrize(
    "stored",
    [
        "2026-01-31 12:00:00",  # CURRENT_TIMESTAMP
        "2026-01-31 12:00:00.000000",  # SQLAlchemy's DateTime
        "2026-01-31 12:00:00.5",
        "2026-01-31T12:00:00+00:00",  # already ISO: kept apart, not re-spelled
        "not a time",
        "",
        1767225600,
    ],
)
def test_a_sqlite_timestamp_comes_back_as_exactly_the_text_it_was(stored: object) -> None:
    written = _through_a_file(_sqlite_timestamp_to_portable(stored))
    assert _portable_timestamp_to_sqlite(written) == stored


def test_a_sqlite_utc_timestamp_is_written_as_iso_8601_with_an_offset() -> None:
    assert _sqlite_timestamp_to_portable("2026-01-31 12:00:00.123456") == (
        "2026-01-31T12:00:00.123456+00:00"
    )


def test_a_postgresql_timestamp_reaches_sqlite_as_the_same_instant_in_utc() -> None:
    assert _portable_timestamp_to_sqlite("2026-01-31T18:00:00.5+05:30") == (
        "2026-01-31 12:30:00.500000"
    )
    assert _portable_timestamp_to_sqlite("2026-01-31T12:00:00.5+00:00") == "2026-01-31 12:00:00.5"


def _normal(table: str, row: list[object]) -> list[object]:
    return normalizer(TableSpec.from_model(table))(row)


def test_the_same_stored_values_compare_equal_whoever_spelled_them() -> None:
    # ab_assignments: ab_test_id, session_id, variant_id, unit_key, success, metric, outcome_at,
    # assigned_at
    postgres = [1, 2, 3, "u", True, 1, "2026-01-31T12:00:00.5+00:00", "2026-01-31T13:00:00+01:00"]
    sqlite = [
        1,
        2,
        3,
        "u",
        True,
        1.0,
        "2026-01-31T12:00:00.500000+00:00",
        "2026-01-31T12:00:00+00:00",
    ]
    assert _normal("ab_assignments", postgres) == _normal("ab_assignments", sqlite)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("NaN", 0.0),
        (-0.0, 0.0),
        (0.1, 0.30000000000000004 - 0.2),
    ],
)
def test_different_floats_never_compare_equal(one: object, other: object) -> None:
    row = [1, 2, 3, "u", None, one, None, "2026-01-31T12:00:00+00:00"]
    changed = [1, 2, 3, "u", None, other, None, "2026-01-31T12:00:00+00:00"]
    assert _normal("ab_assignments", row) != _normal("ab_assignments", changed)


def test_nan_compares_equal_to_itself_in_either_spelling() -> None:
    row = [1, 2, 3, "u", None, "NaN", None, "2026-01-31T12:00:00+00:00"]
    python = [1, 2, 3, "u", None, float("nan"), None, "2026-01-31T12:00:00+00:00"]
    assert _normal("ab_assignments", row) == _normal("ab_assignments", python)


def test_every_archived_table_has_a_primary_key_and_an_encoding_for_each_column() -> None:
    for table in ARCHIVED_TABLES:
        spec = TableSpec.from_model(table)
        assert spec.primary_key
        assert len(spec.kinds) == len(spec.columns) == len(Base.metadata.tables[table].columns)


def test_tables_are_listed_parents_first() -> None:
    order = {table: position for position, table in enumerate(ARCHIVED_TABLES)}
    for table in ARCHIVED_TABLES:
        for key in Base.metadata.tables[table].foreign_keys:
            parent = key.column.table.name
            assert order[parent] < order[table], (table, parent)


def test_a_manifest_of_another_format_version_names_both_versions() -> None:
    raw = json.dumps({"format": FORMAT_NAME, "format_version": 99}).encode()
    with pytest.raises(InvalidExportError, match="99"):
        Manifest.from_json(raw, "manifest.json")
