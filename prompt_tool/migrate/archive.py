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

The dialect differences (snapshot, text decoding, streaming, identity sequences) live in
:class:`PostgresIO` and :class:`SQLiteIO` and nowhere else in ``migrate/``.
"""

from __future__ import annotations

import enum
import gzip
import itertools
import json
import math
import re
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Protocol

from alembic.runtime.migration import MigrationContext
from psycopg.types.string import ByteaBinaryLoader
from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    DateTime,
    Engine,
    Float,
    Integer,
    String,
    column,
    inspect,
    literal_column,
    select,
    table,
    text,
    tuple_,
)
from sqlalchemy.sql.expression import ColumnClause, Select

from prompt_tool.db.dialect import text_as_stored
from prompt_tool.db.engine import Connectable, check_connection, connect
from prompt_tool.db.models import Base
from prompt_tool.db.revisions import BASELINE, EXPAND, EXPAND_TABLES, LEGACY_TABLES
from prompt_tool.db.url import require_existing_sqlite_file
from prompt_tool.errors import InvalidInputError, SchemaError

__all__ = [
    "ARCHIVED_TABLES",
    "FLUSH_BYTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PARALLEL_MIN_BYTES",
    "TABLES_AT_REVISION",
    "ArchivedFile",
    "ColumnKind",
    "DatabaseState",
    "DialectIO",
    "ExportRevisionMismatchError",
    "InvalidExportError",
    "Manifest",
    "PostgresIO",
    "ProgressCallback",
    "SQLiteIO",
    "TableSpec",
    "database_state",
    "dialect_io",
    "existing_table_specs",
    "normalizer",
    "undecodable_text",
    "update_sql",
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
    }
)

# (table, rows done so far, rows in all or None when not known in advance)
ProgressCallback = Callable[[str, int, int | None], None]


class InvalidExportError(InvalidInputError):
    """The export directory is incomplete, damaged or not an export: nothing was restored."""


class ExportRevisionMismatchError(SchemaError):
    """The export was taken at another schema revision than the target database is at."""


class ColumnKind(enum.StrEnum):
    INTEGER = "integer"
    TEXT = "text"
    BOOLEAN = "boolean"
    FLOAT = "float"
    TIMESTAMP = "timestamp"
    JSON = "json"


def _kind_of(sql_type: Any) -> ColumnKind:
    # Order matters: Text is a String, and the checks go from the most specific.
    for python_type, kind in (
        (JSON, ColumnKind.JSON),
        (Boolean, ColumnKind.BOOLEAN),
        (DateTime, ColumnKind.TIMESTAMP),
        (Float, ColumnKind.FLOAT),
        (Integer, ColumnKind.INTEGER),
        (String, ColumnKind.TEXT),
    ):
        if isinstance(sql_type, python_type):
            return kind
    raise TypeError(f"no export encoding for column type {sql_type!r}")  # a new model type


@dataclass(frozen=True, slots=True)
class TableSpec:
    """One archived table: its columns (as the database has them) and how each is encoded."""

    name: str
    columns: tuple[str, ...]
    kinds: tuple[ColumnKind, ...]
    primary_key: tuple[str, ...]

    @property
    def key_positions(self) -> tuple[int, ...]:
        return tuple(self.columns.index(name) for name in self.primary_key)

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
            kinds=tuple(_kind_of(c.type) for c in present),
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


# --- values: one spelling in the file, whatever the database --------------------------------

# SQLite's own spelling of a UTC timestamp (CURRENT_TIMESTAMP and SQLAlchemy's DateTime).
_SQLITE_TIMESTAMP = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2}) ([0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?)"
)
# The same instant as the file spells it; mapped back to exactly the text above.
_FILE_UTC_TIMESTAMP = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})T([0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?)\+00:00"
)
_RAW = "raw"


def _sqlite_timestamp_to_file(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str) and (match := _SQLITE_TIMESTAMP.fullmatch(value)):
        return f"{match[1]}T{match[2]}+00:00"
    # Anything else SQLite holds in the column is kept verbatim, marked so it is never parsed.
    return {_RAW: value}


def _sqlite_boolean_to_file(value: Any) -> Any:
    if value is None or value is True or value is False:
        return value
    if type(value) is int and value in (0, 1):
        return value == 1
    return {_RAW: value}


def _file_timestamp_to_sqlite(value: Any) -> Any:
    if isinstance(value, dict):
        return value[_RAW]
    if value is None:
        return None
    if match := _FILE_UTC_TIMESTAMP.fullmatch(value):
        return f"{match[1]} {match[2]}"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return value  # 'infinity' and the like: kept as text
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC)
    return parsed.strftime("%Y-%m-%d %H:%M:%S.%f")  # SQLAlchemy's own SQLite spelling


def _file_timestamp_to_postgres(value: Any) -> Any:
    return value[_RAW] if isinstance(value, dict) else value


def _file_float(value: Any) -> Any:
    # PostgreSQL writes NaN and the infinities as strings; float() reads both spellings.
    return None if value is None else float(value)


def _file_raw_or_value(value: Any) -> Any:
    return value[_RAW] if isinstance(value, dict) else value


def _sqlite_text(value: Any) -> Any:
    """Text as SQLite will take it: lone surrogates (bytes that were not UTF-8) as the bytes."""
    if type(value) is not str or value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogatepass")
    return value


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
        return (_RAW, value.get(_RAW))
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
    return (_RAW, value.get(_RAW)) if isinstance(value, dict) else value


_NORMALIZERS: dict[ColumnKind, Callable[[Any], Any] | None] = {
    ColumnKind.INTEGER: None,
    ColumnKind.TEXT: None,
    ColumnKind.JSON: None,
    ColumnKind.BOOLEAN: _normal_raw,
    ColumnKind.FLOAT: _normal_float,
    ColumnKind.TIMESTAMP: _normal_timestamp,
}


def normalizer(spec: TableSpec) -> Callable[[Sequence[Any]], list[Any]]:
    """Turn a row in file form into values that compare equal exactly when the stored data is
    the same (``2026-01-01T00:00:00.5+00:00`` equals ``...00.500000+00:00``, ``1`` equals
    ``1.0`` in a float column), whichever database spelled it."""
    steps = [(i, f) for i, k in enumerate(spec.kinds) if (f := _NORMALIZERS[k]) is not None]

    def normal(row: Sequence[Any]) -> list[Any]:
        values = list(row)
        for position, function in steps:
            values[position] = function(values[position])
        return values

    return normal


def _converter(steps: list[tuple[int, Callable[[Any], Any]]]) -> Callable[[Sequence[Any]], Any]:
    if not steps:
        return list

    def convert(row: Sequence[Any]) -> list[Any]:
        values = list(row)
        for position, function in steps:
            values[position] = function(values[position])
        return values

    return convert


def _quote(name: str) -> str:
    # Every name comes from the models (ARCHIVED_TABLES and their columns), never from a file.
    return '"' + name.replace('"', '""') + '"'


def _refuse_unencodable(value: Any) -> Any:
    raise TypeError(f"a {type(value).__name__} value")


def _json_encoder(*, ascii_only: bool) -> Callable[[Any], str]:
    return json.JSONEncoder(
        ensure_ascii=ascii_only,
        separators=(",", ":"),
        allow_nan=True,  # NaN and the infinities as Python writes and reads them
        check_circular=False,
        default=_refuse_unencodable,
    ).encode


# Rows are written as UTF-8, like PostgreSQL's own JSON; a row holding lone surrogates (SQLite
# text that was not UTF-8) is written with \u escapes instead, which keeps the file valid UTF-8.
_encode_json = _json_encoder(ascii_only=False)
_encode_json_ascii = _json_encoder(ascii_only=True)


def _encode_lines(lines: list[str], rows: Sequence[list[Any]]) -> bytes:
    lines.append("")
    try:
        return "\n".join(lines).encode("utf-8")
    except UnicodeEncodeError:
        return "\n".join([*map(_encode_json_ascii, rows), ""]).encode("ascii")


# --- the dialects ---------------------------------------------------------------------------

FLUSH_BYTES = 1 << 20  # write in 1 MiB blocks: few syscalls, bounded memory
# A PostgreSQL table at least this big (with its TOAST) is read in parallel key ranges...
PARALLEL_MIN_BYTES = 32 << 20
# ...of about this much table each: small enough that the few ranges read ahead of the one being
# written stay a few MiB of memory, big enough that a statement per range costs nothing.
RANGE_BYTES = 4 << 20
_SQLITE_ROWS_PER_FETCH = 1_000
_PG_ROWS_PER_CHUNK = 1_000


class DialectIO(Protocol):
    """What export and restore need from a database, one implementation per dialect."""

    name: str
    # Whether text that is not valid UTF-8 can be stored as the same bytes (restore checks).
    stores_any_text_bytes: bool

    def snapshot(self, connection: Connection) -> AbstractContextManager[None]:
        """Every read on ``connection`` inside sees one consistent state of the database."""

    def split(
        self, connection: Connection, spec: TableSpec, where: str | None, parts: int
    ) -> list[str] | None:
        """Conditions cutting a big table into key ranges (at least ``parts``, in key order) to
        be read in parallel on :meth:`worker` connections; None: read it in one go."""

    def worker(self, engine: Engine) -> AbstractContextManager[Connection]:
        """Another connection on the same snapshot (only called after :meth:`split` said yes)."""

    def stream_lines(
        self, connection: Connection, spec: TableSpec, where: str | None
    ) -> Generator[tuple[bytes, int]]:
        """The table's rows in primary-key order, as blocks of JSON lines and their row counts."""

    def restoring(self, connection: Connection) -> AbstractContextManager[None]:
        """Around a restore, inside its transaction."""

    def fetch_rows(
        self, connection: Connection, spec: TableSpec, keys: Sequence[tuple[Any, ...]]
    ) -> list[list[Any]]:
        """The rows with these primary keys, in file form."""

    def binder(self, spec: TableSpec) -> Callable[[Sequence[Any]], list[Any]]:
        """Turn a row in file form into the parameters this database stores it from."""

    def insert_sql(self, spec: TableSpec) -> str:
        """``INSERT`` of one row, parameters ``c0``, ``c1``... in column order."""

    def advance_identity(self, connection: Connection, spec: TableSpec) -> None:
        """After rows were inserted with explicit ids: make later inserts get higher ones."""


def _select_list(spec: TableSpec) -> list[str]:
    # A json column as its stored text: never parsed and re-encoded.
    return [
        f"CAST({_quote(name)} AS TEXT)" if kind is ColumnKind.JSON else _quote(name)
        for name, kind in zip(spec.columns, spec.kinds, strict=True)
    ]


def _order_by(spec: TableSpec) -> str:
    return ", ".join(_quote(name) for name in spec.primary_key)


def _key_filter(spec: TableSpec, keys: Sequence[tuple[Any, ...]]) -> Any:
    if len(spec.primary_key) == 1:
        return column(spec.primary_key[0]).in_([key[0] for key in keys])
    return tuple_(*(column(name) for name in spec.primary_key)).in_(keys)


def _insert_sql(spec: TableSpec, placeholder: Callable[[int, ColumnKind], str]) -> str:
    names = ", ".join(_quote(name) for name in spec.columns)
    values = ", ".join(placeholder(i, kind) for i, kind in enumerate(spec.kinds))
    return f"INSERT INTO {_quote(spec.name)} ({names}) VALUES ({values})"


def update_sql(spec: TableSpec) -> str:
    """``UPDATE`` of every non-key column by primary key, parameters ``c0``.. as for insert."""
    sets = ", ".join(
        f"{_quote(name)} = :c{i}"
        for i, name in enumerate(spec.columns)
        if name not in spec.primary_key
    )
    where = " AND ".join(
        f"{_quote(name)} = :c{spec.columns.index(name)}" for name in spec.primary_key
    )
    return f"UPDATE {_quote(spec.name)} SET {sets} WHERE {where}"


class PostgresIO:
    """PostgreSQL: the server builds each JSON line; Python only joins the lines into blocks.

    Why: per-row work in Python (fetch, convert, ``json.dumps``) runs at about half of COPY's
    throughput. ``json_build_array`` escapes text as JSON requires, spells timestamps in ISO 8601
    (session time zone pinned to UTC) and, fed ``CAST(col AS TEXT)``, embeds a json column's
    exact stored text as a string. Building JSON costs the server about twice what COPY costs, so
    a big table is cut into key ranges read by several backends at once, on one exported snapshot
    (what ``pg_dump --jobs`` does).
    """

    name = "postgresql"
    stores_any_text_bytes = False  # only valid text (SQL_ASCII is refused at connect)

    def __init__(self, *, parallel_min_bytes: int) -> None:
        self.parallel_min_bytes = parallel_min_bytes
        self._snapshot_id: str | None = None

    @staticmethod
    def _begin_read_only(connection: Connection) -> None:
        connection.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)

    @staticmethod
    def _session_settings(connection: Connection) -> None:
        connection.exec_driver_sql("SET LOCAL TIME ZONE 'UTC'")
        connection.exec_driver_sql("SET LOCAL client_encoding TO 'UTF8'")

    @contextmanager
    def snapshot(self, connection: Connection) -> Iterator[None]:
        # What pg_dump does: one REPEATABLE READ, READ ONLY transaction for every table, so a
        # session written mid-export is either wholly in (with its refs) or wholly out.
        self._begin_read_only(connection)
        with connection.begin():
            self._session_settings(connection)
            self._snapshot_id = str(
                connection.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one()
            )
            try:
                yield
            finally:
                self._snapshot_id = None

    def split(
        self, connection: Connection, spec: TableSpec, where: str | None, parts: int
    ) -> list[str] | None:
        # Ranges of the leading key column: a composite key (the references' session_id, role)
        # splits as well as an id, and each range still comes out in key order.
        leading = spec.primary_key[0] if spec.primary_key else None
        if (
            parts < 2
            or leading is None
            or spec.kinds[spec.columns.index(leading)] is not ColumnKind.INTEGER
            or self._snapshot_id is None
        ):
            return None
        size = connection.execute(
            text("SELECT pg_table_size(CAST(:table AS regclass))"), {"table": spec.name}
        ).scalar_one()
        if size is None or int(size) < self.parallel_min_bytes:
            return None
        condition = f" WHERE {where}" if where else ""
        key = _quote(leading)
        low, high = connection.exec_driver_sql(
            f"SELECT min({key}), max({key}) FROM {_quote(spec.name)}{condition}"
        ).one()
        if low is None or high - low < parts:
            return None
        pieces = min(max(parts, -(-int(size) // RANGE_BYTES)), high - low + 1)
        # Identity ids are dense enough that equal id spans are roughly equal work.
        step = -(-(high - low + 1) // pieces)
        bounds = [int(low) + step * k for k in range(1, pieces)]
        ranges = [f"{key} < {bounds[0]}"]
        ranges += [f"{key} >= {a} AND {key} < {b}" for a, b in itertools.pairwise(bounds)]
        ranges.append(f"{key} >= {bounds[-1]}")
        return ranges

    @contextmanager
    def worker(self, engine: Engine) -> Iterator[Connection]:
        snapshot_id = self._snapshot_id
        if snapshot_id is None or not re.fullmatch(r"[0-9A-Fa-f-]+", snapshot_id):
            raise RuntimeError("a worker connection needs the exported snapshot of an export")
        with engine.connect() as connection:
            self._begin_read_only(connection)
            with connection.begin():
                # Must come first in the transaction: from here it sees what the export sees.
                connection.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{snapshot_id}'")
                self._session_settings(connection)
                yield connection

    @contextmanager
    def restoring(self, connection: Connection) -> Iterator[None]:
        # Nothing to set: timestamps are compared as instants and bound with their offsets, so
        # the session's time zone (the caller's, when restoring inside its transaction) is moot.
        yield

    def _row_expression(self, spec: TableSpec) -> str:
        return f"json_build_array({', '.join(_select_list(spec))})"

    def stream_lines(
        self, connection: Connection, spec: TableSpec, where: str | None
    ) -> Generator[tuple[bytes, int]]:
        condition = f" WHERE {where}" if where else ""
        statement = (
            f"SELECT CAST({self._row_expression(spec)} AS TEXT) FROM {_quote(spec.name)}"
            f"{condition} ORDER BY {_order_by(spec)}"
        )
        driver = connection.connection.driver_connection
        assert driver is not None
        # Not COPY: psycopg reads COPY a row per Python call, and CSV output scans every byte
        # again on the server. A plain query streamed in chunks of rows is parsed in C, and in
        # binary form each line arrives as the UTF-8 bytes the server built, never decoded.
        with driver.cursor(binary=True) as cursor:
            cursor.adapters.register_loader("text", ByteaBinaryLoader)
            block: list[bytes] = []
            size = 0
            for (line,) in cursor.stream(statement, size=_PG_ROWS_PER_CHUNK):
                block.append(line)
                size += len(line)
                if size >= FLUSH_BYTES:
                    yield b"\n".join([*block, b""]), len(block)
                    block.clear()
                    size = 0
            if block:
                yield b"\n".join([*block, b""]), len(block)

    def fetch_rows(
        self, connection: Connection, spec: TableSpec, keys: Sequence[tuple[Any, ...]]
    ) -> list[list[Any]]:
        query: Select[tuple[Any]] = (
            select(literal_column(f"CAST({self._row_expression(spec)} AS TEXT)"))
            .select_from(table(spec.name))
            .where(_key_filter(spec, keys))
        )
        return [json.loads(line) for line in connection.execute(query).scalars()]

    def binder(self, spec: TableSpec) -> Callable[[Sequence[Any]], list[Any]]:
        by_kind: dict[ColumnKind, Callable[[Any], Any]] = {
            ColumnKind.FLOAT: _file_float,
            ColumnKind.TIMESTAMP: _file_timestamp_to_postgres,
            ColumnKind.BOOLEAN: _file_raw_or_value,
        }
        return _converter([(i, by_kind[k]) for i, k in enumerate(spec.kinds) if k in by_kind])

    def insert_sql(self, spec: TableSpec) -> str:
        # Untyped parameters: PostgreSQL casts each from the column it goes into, so an ISO
        # timestamp string and a json text arrive exactly as written.
        return _insert_sql(spec, lambda i, _kind: f":c{i}")

    def advance_identity(self, connection: Connection, spec: TableSpec) -> None:
        if spec.primary_key != ("id",):
            return
        # Only ever forward: a sequence already past max(id) (rows deleted since) stays put.
        connection.execute(
            text(
                "SELECT setval(s.seq, s.top) FROM (SELECT pg_get_serial_sequence(:table, 'id') "
                f"AS seq, (SELECT max(id) FROM {_quote(spec.name)}) AS top) AS s "
                "WHERE s.seq IS NOT NULL AND s.top IS NOT NULL "
                "AND s.top > COALESCE(pg_sequence_last_value(s.seq::regclass), 0)"
            ),
            {"table": spec.name},
        )


class SQLiteIO:
    """SQLite: rows are read through the driver and encoded in Python.

    Text that is not valid UTF-8 (SQLite stores whatever bytes it was given) is decoded with
    ``surrogateescape``, so it is carried instead of failing, and written back as the same bytes
    with ``CAST(? AS TEXT)``.
    """

    name = "sqlite"
    stores_any_text_bytes = True

    @staticmethod
    def _begin_in_driver(connection: Connection, statement: str) -> None:
        # pysqlite opens a transaction only before INSERT/UPDATE/DELETE (unless the engine lets
        # SQLAlchemy emit BEGIN, as rehearse's does): open it here, at the start.
        driver = connection.connection.driver_connection
        assert driver is not None
        if not driver.in_transaction:
            connection.exec_driver_sql(statement)

    @contextmanager
    def snapshot(self, connection: Connection) -> Iterator[None]:
        # Without a transaction around them, each table would be read at a different moment; a
        # deferred BEGIN takes SQLite's read lock at the first read and holds it to the end.
        with text_as_stored(connection), connection.begin():
            self._begin_in_driver(connection, "BEGIN")
            yield

    def split(
        self, connection: Connection, spec: TableSpec, where: str | None, parts: int
    ) -> list[str] | None:
        # One file, one writer at a time, and reading is never the slow part: no ranges.
        return None

    def worker(self, engine: Engine) -> AbstractContextManager[Connection]:
        raise NotImplementedError("SQLite exports are read on one connection")

    @contextmanager
    def restoring(self, connection: Connection) -> Iterator[None]:
        # The write lock from the start: what is compared is what gets written over.
        self._begin_in_driver(connection, "BEGIN IMMEDIATE")
        with text_as_stored(connection):
            yield

    def _to_file(self, spec: TableSpec) -> Callable[[Sequence[Any]], Any]:
        by_kind: dict[ColumnKind, Callable[[Any], Any]] = {
            ColumnKind.TIMESTAMP: _sqlite_timestamp_to_file,
            ColumnKind.BOOLEAN: _sqlite_boolean_to_file,
        }
        return _converter([(i, by_kind[k]) for i, k in enumerate(spec.kinds) if k in by_kind])

    def _select(self, spec: TableSpec) -> str:
        return f"SELECT {', '.join(_select_list(spec))} FROM {_quote(spec.name)}"

    def stream_lines(
        self, connection: Connection, spec: TableSpec, where: str | None
    ) -> Generator[tuple[bytes, int]]:
        condition = f" WHERE {where}" if where else ""
        statement = f"{self._select(spec)}{condition} ORDER BY {_order_by(spec)}"
        to_file = self._to_file(spec)
        result = connection.execution_options(
            stream_results=True, yield_per=_SQLITE_ROWS_PER_FETCH
        ).exec_driver_sql(statement)
        for partition in result.partitions():
            rows = [to_file(row) for row in partition]
            try:
                lines = [_encode_json(row) for row in rows]
            except TypeError as error:
                raise InvalidInputError(
                    f"table {spec.name} holds {error} (a BLOB?) that an export cannot carry; "
                    "fix or remove that value and export again"
                ) from None
            yield _encode_lines(lines, rows), len(rows)

    def fetch_rows(
        self, connection: Connection, spec: TableSpec, keys: Sequence[tuple[Any, ...]]
    ) -> list[list[Any]]:
        columns: list[ColumnClause[Any]] = [
            literal_column(expression) for expression in _select_list(spec)
        ]
        query = select(*columns).select_from(table(spec.name)).where(_key_filter(spec, keys))
        to_file = self._to_file(spec)
        return [to_file(row) for row in connection.execute(query)]

    def binder(self, spec: TableSpec) -> Callable[[Sequence[Any]], list[Any]]:
        by_kind: dict[ColumnKind, Callable[[Any], Any]] = {
            ColumnKind.FLOAT: _file_float,
            ColumnKind.TIMESTAMP: _file_timestamp_to_sqlite,
            ColumnKind.BOOLEAN: _file_raw_or_value,
            ColumnKind.TEXT: _sqlite_text,
            ColumnKind.JSON: _sqlite_text,
        }
        return _converter([(i, by_kind[k]) for i, k in enumerate(spec.kinds) if k in by_kind])

    def insert_sql(self, spec: TableSpec) -> str:
        # CAST: text that came as bytes (not valid UTF-8) is stored as TEXT, not as a BLOB.
        return _insert_sql(
            spec,
            lambda i, kind: (
                f"CAST(:c{i} AS TEXT)" if kind in (ColumnKind.TEXT, ColumnKind.JSON) else f":c{i}"
            ),
        )

    def advance_identity(self, connection: Connection, spec: TableSpec) -> None:
        # INTEGER PRIMARY KEY hands out max(rowid) + 1: nothing to advance.
        return None


def dialect_io(connection: Connection) -> DialectIO:
    name = connection.dialect.name
    if name == "postgresql":
        return PostgresIO(parallel_min_bytes=PARALLEL_MIN_BYTES)
    if name == "sqlite":
        return SQLiteIO()
    raise SchemaError(f"export and restore support PostgreSQL and SQLite, not {name}")
