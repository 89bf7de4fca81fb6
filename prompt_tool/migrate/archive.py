"""The export format shared by :mod:`~prompt_tool.migrate.export` and
:mod:`~prompt_tool.migrate.restore`: which tables, how each value is spelled, the manifest, and the
per-dialect reading and writing of rows.

An export is a directory::

    manifest.json                 written last: its presence means the export is complete
    projects.jsonl[.gz]           one JSON array per row, columns in the manifest's order
    prompts.jsonl[.gz]
    ...

and nothing else: the manifest lists one file for every table of the export's schema revision
(:data:`TABLES_AT_REVISION`), and restore refuses a manifest that lacks one or a directory that
holds a file the manifest does not list.

Values in a row, by column kind (the same whichever database wrote the file):

* integer: a JSON number;
* text: a JSON string, byte for byte (NULL is ``null``, the empty string ``""``); text that SQLite
  holds but that is not valid UTF-8 is carried as lone surrogates (``\\udcXX``) and written back
  as the same bytes (a restore into PostgreSQL, which cannot hold them, refuses before writing
  anything, naming table, key and column);
* json: the column's stored *text* as a JSON string, never re-encoded, so key order and
  whitespace survive (PostgreSQL ``json`` keeps its text);
* boolean: ``true`` / ``false``;
* float: a JSON number; NaN and the infinities as the strings ``"NaN"``, ``"Infinity"``,
  ``"-Infinity"`` (PostgreSQL) or the bare tokens Python writes; both are read back;
* timestamp: ISO 8601 with an offset (``2026-01-31T12:00:00.123456+00:00``). SQLite has no
  timestamp type: its UTC text ``YYYY-MM-DD HH:MM:SS[.ffffff]`` becomes the ISO spelling and is
  written back to SQLite exactly as it was; any other text it holds is kept as ``{"raw": value}``.

How each database reads and writes rows in this form (snapshot, text decoding, streaming,
identity sequences) is :mod:`prompt_tool.db.bulk_io`'s business; this module holds the format.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, inspect

from prompt_tool.db.bulk_io import RAW, ColumnKind, TableShape, converter, kind_of
from prompt_tool.db.engine import Connectable, check_connection, connect
from prompt_tool.db.models import Base
from prompt_tool.db.revisions import BASELINE, EXPAND, EXPAND_TABLES, LEGACY_TABLES, QUARANTINE
from prompt_tool.db.url import require_existing_sqlite_file
from prompt_tool.errors import InvalidInputError, SchemaError

__all__ = [
    "ARCHIVED_TABLES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "TABLES_AT_REVISION",
    "ArchivedFile",
    "DatabaseState",
    "ExportRevisionMismatchError",
    "InvalidExportError",
    "Manifest",
    "ProgressCallback",
    "TableSpec",
    "archived_data_revision",
    "database_state",
    "existing_table_specs",
    "normalizer",
    "undecodable_text",
]

FORMAT_NAME: Final = "prompt-tool-export"
FORMAT_VERSION: Final = 1
MANIFEST_NAME: Final = "manifest.json"

# The data of a deployment, parents before children (the order restore inserts in). Not here on
# purpose: template_permissions and feature flags (this deployment's access and rollout state,
# not prompt data: restoring them elsewhere could grant access), migration_runs/batches (this
# database's own ledger).
ARCHIVED_TABLES: Final[tuple[str, ...]] = (
    "projects",
    "prompts",
    "prompt_versions",
    "orchestration_sessions",
    "session_prompt_refs",
    "orchestration_steps",
    "ab_tests",
    "ab_test_variants",
    "ab_assignments",
    "template_labels",
    "template_events",
)

# What an export at each schema revision lists: the archived tables a database at that revision
# has (export writes every one of them, a --project export too, some maybe with no rows), so
# restore refuses a manifest that lacks one. Every revision has its line (from db.revisions, what
# each revision holds); tests/migrate/test_restore_strict.py holds this against the migrations.
TABLES_AT_REVISION: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        BASELINE: tuple(name for name in ARCHIVED_TABLES if name in LEGACY_TABLES),
        EXPAND: tuple(
            name for name in ARCHIVED_TABLES if name in LEGACY_TABLES or name in EXPAND_TABLES
        ),
        # The quarantine is this database's own ledger, not archived.
        QUARANTINE: tuple(
            name for name in ARCHIVED_TABLES if name in LEGACY_TABLES or name in EXPAND_TABLES
        ),
    }
)

# Revisions that changed no archived table or column: an export at one restores into the other
# as it is (0003 adds only the backfill quarantine, which is not archived).
_SAME_ARCHIVED_DATA: Final[Mapping[str, str]] = MappingProxyType({QUARANTINE: EXPAND})


def archived_data_revision(revision: str) -> str:
    """The oldest revision whose archived tables and columns are exactly ``revision``'s."""
    return _SAME_ARCHIVED_DATA.get(revision, revision)


# (table, rows done so far, rows in all or None when not known in advance)
ProgressCallback = Callable[[str, int, int | None], None]


class InvalidExportError(InvalidInputError):
    """The export directory is incomplete, damaged or not an export: nothing was restored."""


class ExportRevisionMismatchError(SchemaError):
    """The export was taken at another schema revision than the target database is at."""


@dataclass(frozen=True, slots=True)
class TableSpec(TableShape):
    """One archived table: its columns (as the database has them) and how each is encoded."""

    @classmethod
    def from_model(cls, name: str, columns: Sequence[str] | None = None) -> TableSpec:
        """The spec of ``name`` from the models, limited to ``columns`` (in the model's order).

        Raises :class:`InvalidExportError` for a table or column the models do not know.
        """
        model = Base.metadata.tables.get(name)
        if model is None or name not in ARCHIVED_TABLES:
            raise InvalidExportError(f"{name!r} is not a table an export contains")
        wanted = set(model.columns.keys()) if columns is None else set(columns)
        unknown = wanted - set(model.columns.keys())
        if unknown:
            raise InvalidExportError(f"table {name} has no column(s) {', '.join(sorted(unknown))}")
        present = [c for c in model.columns if c.name in wanted]
        key = tuple(c.name for c in model.primary_key.columns)
        if not set(key) <= wanted:
            raise InvalidExportError(f"table {name} lacks its primary key {', '.join(key)}")
        return cls(
            name=name,
            columns=tuple(c.name for c in present),
            kinds=tuple(kind_of(c.type) for c in present),
            primary_key=key,
        )


@dataclass(frozen=True, slots=True)
class DatabaseState:
    revision: str | None  # None: not under Alembic
    has_run_ledger: bool


def database_state(db: Connectable) -> DatabaseState:
    """Where the database stands, with clear errors for a missing SQLite file or a dead server."""
    require_existing_sqlite_file(db.engine.url)
    if isinstance(db, Engine):
        check_connection(db)
    with connect(db) as connection:
        return DatabaseState(
            revision=MigrationContext.configure(connection).get_current_revision(),
            has_run_ledger=inspect(connection).has_table("migration_runs"),
        )


def existing_table_specs(connection: Connection) -> list[TableSpec]:
    """The archived tables this database has, with the columns it has (a database at revision
    0001 has neither the new tables nor the new columns)."""
    inspector = inspect(connection)
    specs = []
    for name in ARCHIVED_TABLES:
        if inspector.has_table(name):
            present = [c["name"] for c in inspector.get_columns(name)]
            model_columns = Base.metadata.tables[name].columns.keys()
            specs.append(TableSpec.from_model(name, [c for c in model_columns if c in present]))
    return specs


# --- the manifest -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArchivedFile:
    table: str
    file: str
    columns: list[str]
    kinds: list[str]
    primary_key: list[str]
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    format: str
    format_version: int
    tool_version: str
    alembic_revision: str | None
    source_dialect: str
    created_at: str
    projects: list[str] | None
    compression: str | None
    files: list[ArchivedFile]

    def to_json(self) -> str:
        data = {
            "format": self.format,
            "format_version": self.format_version,
            "tool_version": self.tool_version,
            "alembic_revision": self.alembic_revision,
            "source_dialect": self.source_dialect,
            "created_at": self.created_at,
            "projects": self.projects,
            "compression": self.compression,
            "files": [
                {
                    "table": f.table,
                    "file": f.file,
                    "columns": f.columns,
                    "kinds": f.kinds,
                    "primary_key": f.primary_key,
                    "rows": f.rows,
                    "bytes": f.bytes,
                    "sha256": f.sha256,
                }
                for f in self.files
            ],
        }
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        """Parse a manifest; anything malformed is an :class:`InvalidExportError`."""
        try:
            data = json.loads(raw)
            if data.get("format") != FORMAT_NAME:
                raise InvalidExportError(f"{where} is not a prompt-tool export manifest")
            if data.get("format_version") != FORMAT_VERSION:
                raise InvalidExportError(
                    f"{where} has format version {data.get('format_version')!r}; this prompt-tool "
                    f"reads version {FORMAT_VERSION}: restore with the prompt-tool that exported it"
                )
            files = [
                ArchivedFile(
                    table=str(f["table"]),
                    file=str(f["file"]),
                    columns=[str(c) for c in f["columns"]],
                    kinds=[str(k) for k in f["kinds"]],
                    primary_key=[str(c) for c in f["primary_key"]],
                    rows=int(f["rows"]),
                    bytes=int(f["bytes"]),
                    sha256=str(f["sha256"]),
                )
                for f in data["files"]
            ]
            projects = data.get("projects")
            return cls(
                format=FORMAT_NAME,
                format_version=FORMAT_VERSION,
                tool_version=str(data["tool_version"]),
                alembic_revision=(
                    None if data["alembic_revision"] is None else str(data["alembic_revision"])
                ),
                source_dialect=str(data["source_dialect"]),
                created_at=str(data["created_at"]),
                projects=None if projects is None else [str(p) for p in projects],
                compression=None if data.get("compression") is None else str(data["compression"]),
                files=files,
            )
        except InvalidExportError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InvalidExportError(
                f"{where} is not a valid export manifest (unreadable or edited); export again"
            ) from None


def _not_utf8(value: Any) -> bool:
    """A text value of a file that stands for bytes that are not UTF-8 (lone surrogates)."""
    if type(value) is not str or value.isascii():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# A \uD800-\uDFFF escape: how a row spells a lone surrogate (and, in an ASCII-only row, half
# of a pair). Rows without one hold no text that is not UTF-8, and are never parsed.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SCAN_BYTES = 1 << 20


def _lines_with_surrogates(path: Path, compressed: bool) -> Iterator[bytes]:
    opened = gzip.open(path, "rb") if compressed else open(path, "rb")  # noqa: SIM115
    with opened as file:
        rest = b""
        while chunk := file.read(_SCAN_BYTES):
            data = rest + chunk
            end = data.rfind(b"\n") + 1
            data, rest = data[:end], data[end:]
            if _SURROGATE_ESCAPE.search(data):
                yield from (line for line in data.split(b"\n") if _SURROGATE_ESCAPE.search(line))
        if rest and _SURROGATE_ESCAPE.search(rest):
            yield rest


def undecodable_text(directory: Path, manifest: Manifest, shown: int = 5) -> tuple[int, list[str]]:
    """How many text values of the export stand for bytes that are not valid UTF-8 (SQLite text
    written by a raw driver), and the first ``shown`` of them as "table key column".

    Only lines holding a surrogate escape are parsed: an export without such text costs one
    read. A database that stores only UTF-8 (PostgreSQL) cannot take these values as they are.
    """
    count = 0
    names: list[str] = []
    for entry in manifest.files:
        spec = TableSpec.from_model(entry.table, entry.columns)
        texts = [
            i for i, kind in enumerate(spec.kinds) if kind in (ColumnKind.TEXT, ColumnKind.JSON)
        ]
        lines = _lines_with_surrogates(directory / entry.file, manifest.compression == "gzip")
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # not a row: the restore's own parsing refuses it
            if not isinstance(row, list) or len(row) != len(spec.columns):
                continue
            for position in texts:
                if not _not_utf8(row[position]):
                    continue
                count += 1
                if len(names) < shown:
                    names.append(f"{spec.name} {_key_text(spec, row)} {spec.columns[position]}")
    return count, names


def _key_text(spec: TableSpec, row: Sequence[Any]) -> str:
    values = [row[position] for position in spec.key_positions]
    if len(values) == 1:
        return f"{spec.primary_key[0]} {values[0]}"
    return f"({', '.join(spec.primary_key)}) ({', '.join(json.dumps(v) for v in values)})"


def _normal_timestamp(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):
        return (RAW, value.get(RAW))
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return ("text", value)
    return parsed.astimezone(UTC) if parsed.tzinfo is not None else ("naive", parsed)


def _normal_float(value: Any) -> Any:
    if value is None or isinstance(value, dict):
        return value
    number = float(value)
    # NaN never equals itself; its hex spelling does, and -0.0 stays distinct from 0.0.
    return "nan" if math.isnan(number) else number.hex()


def _normal_raw(value: Any) -> Any:
    return (RAW, value.get(RAW)) if isinstance(value, dict) else value


_NORMALIZERS: dict[ColumnKind, Callable[[Any], Any] | None] = {
    ColumnKind.INTEGER: None,
    ColumnKind.TEXT: None,
    ColumnKind.JSON: None,
    ColumnKind.BOOLEAN: _normal_raw,
    ColumnKind.FLOAT: _normal_float,
    ColumnKind.TIMESTAMP: _normal_timestamp,
}


def normalizer(spec: TableSpec) -> Callable[[Sequence[Any]], list[Any]]:
    """Turn a row in portable form into values that compare equal exactly when the stored data is
    the same (``2026-01-01T00:00:00.5+00:00`` equals ``...00.500000+00:00``, ``1`` equals
    ``1.0`` in a float column), whichever database spelled it."""
    return converter([(i, f) for i, k in enumerate(spec.kinds) if (f := _NORMALIZERS[k])])
