"""`orch-migrate restore --from DIR`: load an export back, checked first, all or nothing.

Before anything is written, the manifest, every file's size and sha256 and every row count are
checked, and the target database must be at the export's schema revision; a refused export
leaves the database exactly as it was (not even a ledger row is written).

Then one transaction inserts the rows in foreign-key order, in batches, with their original ids
(references stay valid). Why one transaction: a restore is all-or-nothing, so there is nothing to
resume. A failed or interrupted restore leaves no trace, and running it again is safe anyway,
because restore is idempotent: a row whose primary key is already there and identical is skipped,
one that differs is counted and left alone (``overwrite``: replaced). Rows the target has and the
export does not are never touched. On PostgreSQL the identity sequences are moved past the
restored ids, so later inserts don't collide.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import IntegrityError

from prompt_tool.db.dialect import refresh_statistics
from prompt_tool.db.engine import Connectable, begin, connect
from prompt_tool.db.url import redact
from prompt_tool.errors import InvalidInputError
from prompt_tool.migrate.archive import (
    ARCHIVED_TABLES,
    MANIFEST_NAME,
    ArchivedFile,
    DialectIO,
    ExportRevisionMismatchError,
    InvalidExportError,
    Manifest,
    ProgressCallback,
    TableSpec,
    database_state,
    dialect_io,
    normalizer,
    update_sql,
)
from prompt_tool.migrate.runs import RunKind, RunStatus, finish_run, start_run

__all__ = [
    "RestoreConflictError",
    "RestoreResult",
    "RestoredTable",
    "restore",
    "verify_export",
]

_READ_BYTES = 1 << 20
# A batch is at most this many rows or bytes of JSON: memory stays flat with 100 KB texts too.
_BATCH_ROWS = 500
_BATCH_BYTES = 4 << 20
# How many keys of differing rows a report names.
_DIFFERENT_KEYS_SHOWN = 5


class RestoreConflictError(InvalidInputError):
    """The target database refused a row (a unique key or a reference); nothing was written."""


@dataclass(frozen=True, slots=True)
class RestoredTable:
    table: str
    rows: int
    inserted: int
    identical: int
    different: int
    overwritten: int
    # The primary keys of the first few rows that differ (each key as a list of its columns).
    different_keys: list[list[Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RestoreResult:
    database: str
    source: str
    alembic_revision: str | None
    overwrite: bool
    tables: list[RestoredTable]
    inserted: int
    identical: int
    different: int
    overwritten: int
    # Rows that differ from the export and were left as they are (no ``overwrite``).
    left_different: int
    seconds: float
    run_id: int | None


# --- checking an export before anything is written ------------------------------------------


class _GzipMembers:
    """Decompress a gzip stream of one or more members (an export writes one per block)."""

    def __init__(self) -> None:
        self._member = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._inside = False  # fed bytes of a member that has not ended yet

    def feed(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self._member.decompress(data))
            self._inside = not self._member.eof
            if self._member.eof:
                data = self._member.unused_data
                self._member = zlib.decompressobj(16 + zlib.MAX_WBITS)
            else:
                data = b""
        return b"".join(out)

    @property
    def complete(self) -> bool:
        return not self._inside


def _check_file(directory: Path, entry: ArchivedFile, compressed: bool) -> None:
    path = directory / entry.file
    where = f"{directory}: {entry.file}"
    if not path.is_file():
        raise InvalidExportError(
            f"{where} is missing; the export is incomplete, nothing was written: export again"
        )
    digest = hashlib.sha256()
    size = 0
    lines = 0
    last = b"\n"
    inflate = _GzipMembers() if compressed else None
    damaged = False
    with open(path, "rb") as file:
        while chunk := file.read(_READ_BYTES):
            digest.update(chunk)
            size += len(chunk)
            if inflate is not None and not damaged:
                try:
                    chunk = inflate.feed(chunk)
                except zlib.error:
                    damaged = True
                    continue
            if chunk:
                lines += chunk.count(b"\n")
                last = chunk[-1:]
    if size != entry.bytes or digest.hexdigest() != entry.sha256:
        raise InvalidExportError(
            f"{where} does not match its checksum in {MANIFEST_NAME} (edited, truncated or "
            "damaged); nothing was written: export again"
        )
    if damaged or (inflate is not None and not inflate.complete):
        raise InvalidExportError(f"{where} is not a complete gzip file; nothing was written")
    if lines != entry.rows or last != b"\n":
        raise InvalidExportError(
            f"{where} holds {lines} rows but {MANIFEST_NAME} says {entry.rows}; nothing was "
            "written: export again"
        )


def _spec_of(entry: ArchivedFile) -> TableSpec:
    spec = TableSpec.from_model(entry.table, entry.columns)
    # Rows are positional: the file must spell the columns, kinds and key as this version does.
    if (
        list(spec.columns) != entry.columns
        or [k.value for k in spec.kinds] != entry.kinds
        or list(spec.primary_key) != entry.primary_key
    ):
        raise InvalidExportError(
            f"{entry.file}: columns {entry.columns} do not match table {entry.table} as this "
            "prompt-tool knows it; restore with the prompt-tool version that exported it"
        )
    return spec


def verify_export(source: Path | str) -> Manifest:
    """Check an export directory without touching any database, and return its manifest.

    Raises :class:`InvalidExportError` (exit code 2) for a missing or malformed manifest, a
    missing file, a size, checksum or row count that does not match.
    """
    directory = Path(source)
    if not directory.is_dir():
        raise InvalidExportError(f"{directory} is not a directory; pass the directory of an export")
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise InvalidExportError(
            f"{directory} has no {MANIFEST_NAME}: not an export, or one that never finished; "
            "export again"
        )
    manifest = Manifest.from_json(manifest_path.read_bytes(), str(manifest_path))
    if manifest.compression not in (None, "gzip"):
        raise InvalidExportError(f"{manifest_path}: unknown compression {manifest.compression!r}")
    tables = [entry.table for entry in manifest.files]
    if len(set(tables)) != len(tables):
        raise InvalidExportError(f"{manifest_path} lists a table twice; export again")
    for entry in manifest.files:
        if Path(entry.file).name != entry.file or entry.file in {"", ".", "..", MANIFEST_NAME}:
            raise InvalidExportError(f"{manifest_path} names an unsafe file {entry.file!r}")
        _spec_of(entry)
        _check_file(directory, entry, manifest.compression == "gzip")
    return manifest


def _check_revision(database: str, current: str | None, exported: str | None) -> None:
    if current == exported:
        return
    if current is None:
        raise ExportRevisionMismatchError(
            f"the export is at schema revision {exported} but {database} is not under Alembic; "
            f"run `orch-migrate db upgrade {exported}` on it first, then restore; nothing was "
            "written"
        )
    raise ExportRevisionMismatchError(
        f"the export is at schema revision {exported} but {database} is at {current}; restore "
        f"into a database at {exported} (`orch-migrate db upgrade {exported}` on a new one), or "
        f"export again from a source at {current}; nothing was written"
    )


def _target_specs(db: Connectable, manifest: Manifest) -> dict[str, TableSpec]:
    by_table = {entry.table: entry for entry in manifest.files}
    specs: dict[str, TableSpec] = {}
    with connect(db) as connection:
        inspector = inspect(connection)
        for name in ARCHIVED_TABLES:
            entry = by_table.get(name)
            if entry is None:
                continue
            present = (
                {c["name"] for c in inspector.get_columns(name)}
                if inspector.has_table(name)
                else set()
            )
            if present != set(entry.columns):
                raise ExportRevisionMismatchError(
                    f"table {name} of the target does not have the export's columns "
                    f"({', '.join(entry.columns)}); its schema differs from the export's "
                    "revision: nothing was written"
                )
            specs[name] = _spec_of(entry)
    return specs


# --- writing ----------------------------------------------------------------------------------


def _open(path: Path, compressed: bool) -> io.BufferedIOBase:
    return gzip.GzipFile(path, "rb") if compressed else open(path, "rb")


def _batches(file: io.BufferedIOBase) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    size = 0
    for line in file:
        batch.append(line)
        size += len(line)
        if len(batch) >= _BATCH_ROWS or size >= _BATCH_BYTES:
            yield batch
            batch = []
            size = 0
    if batch:
        yield batch


def _parse(line: bytes, width: int, where: str) -> list[Any]:
    try:
        row = json.loads(line)
    except ValueError:
        row = None
    if not isinstance(row, list) or len(row) != width:
        raise InvalidExportError(f"{where}: a line is not a row of {width} values; export again")
    return row


def _restore_table(
    connection: Connection,
    dialect: DialectIO,
    directory: Path,
    entry: ArchivedFile,
    spec: TableSpec,
    compressed: bool,
    overwrite: bool,
    progress: ProgressCallback | None,
) -> RestoredTable:
    bind = dialect.binder(spec)
    normal = normalizer(spec)
    key_positions = spec.key_positions
    names = [f"c{i}" for i in range(len(spec.columns))]
    insert = text(dialect.insert_sql(spec))
    update = text(update_sql(spec))
    rows_seen = inserted = identical = different = overwritten = 0
    different_keys: list[list[Any]] = []
    if progress is not None:
        progress(spec.name, 0, entry.rows)
    with _open(directory / entry.file, compressed) as file:
        for lines in _batches(file):
            rows = [_parse(line, len(names), entry.file) for line in lines]
            keys = [tuple(row[p] for p in key_positions) for row in rows]
            existing = {
                tuple(row[p] for p in key_positions): normal(row)
                for row in dialect.fetch_rows(connection, spec, keys)
            }
            new: list[dict[str, Any]] = []
            changed: list[dict[str, Any]] = []
            for key, row in zip(keys, rows, strict=True):
                current = existing.get(key)
                if current is None:
                    new.append(dict(zip(names, bind(row), strict=True)))
                elif current == normal(row):
                    identical += 1
                else:
                    different += 1
                    if len(different_keys) < _DIFFERENT_KEYS_SHOWN:
                        different_keys.append(list(key))
                    if overwrite:
                        changed.append(dict(zip(names, bind(row), strict=True)))
            try:
                if new:
                    connection.execute(insert, new)
                if changed:
                    connection.execute(update, changed)
            except IntegrityError as error:
                reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
                raise RestoreConflictError(
                    f"the target refused a row of {spec.name} ({reason}): it holds a row that "
                    "clashes on a unique key, or the export references a row it lacks; nothing "
                    "was written"
                ) from None
            inserted += len(new)
            overwritten += len(changed)
            rows_seen += len(rows)
            if progress is not None:
                progress(spec.name, rows_seen, entry.rows)
    return RestoredTable(
        table=spec.name,
        rows=rows_seen,
        inserted=inserted,
        identical=identical,
        different=different,
        overwritten=overwritten,
        different_keys=different_keys,
    )


def _restore(
    db: Connectable,
    directory: Path,
    manifest: Manifest,
    specs: dict[str, TableSpec],
    overwrite: bool,
    progress: ProgressCallback | None,
) -> list[RestoredTable]:
    entries = {entry.table: entry for entry in manifest.files}
    compressed = manifest.compression == "gzip"
    results = []
    # One transaction (a savepoint inside the caller's): all or nothing.
    with begin(db) as connection:
        dialect = dialect_io(connection)
        with dialect.restoring(connection):
            for name, spec in specs.items():  # ARCHIVED_TABLES order: parents first
                results.append(
                    _restore_table(
                        connection,
                        dialect,
                        directory,
                        entries[name],
                        spec,
                        compressed,
                        overwrite,
                        progress,
                    )
                )
            for spec in specs.values():
                dialect.advance_identity(connection, spec)
            written = [table.table for table in results if table.inserted or table.overwritten]
            if written:
                # Whatever runs next (verify, the read shim) would otherwise be planned for empty
                # tables until autovacuum gets there: verify of 50,000 restored sessions ran for
                # over ten minutes instead of two seconds.
                refresh_statistics(connection, written)
    return results


def restore(
    db: Connectable,
    source: Path | str,
    *,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> RestoreResult:
    """Restore the export in the directory ``source`` into ``db``'s database.

    ``db`` is an Engine (the restore is its own transaction) or a Connection (a savepoint in the
    caller's transaction). ``progress(table, rows_done, rows_in_table)`` is called per batch.
    Rows that differ from the export are counted and left alone unless ``overwrite``.

    Raises :class:`InvalidExportError` for an incomplete or damaged export,
    :class:`ExportRevisionMismatchError` when the database is not at the export's revision, and
    :class:`RestoreConflictError` when the database refuses a row; in every case nothing is
    written.
    """
    started = time.perf_counter()
    directory = Path(source).absolute()
    manifest = verify_export(directory)
    database = redact(db.engine.url)
    state = database_state(db)
    _check_revision(database, state.revision, manifest.alembic_revision)
    specs = _target_specs(db, manifest)
    run_id = (
        start_run(
            db,
            RunKind.RESTORE,
            params={
                "source": str(directory),
                "overwrite": overwrite,
                "alembic_revision": manifest.alembic_revision,
                "projects": manifest.projects,
            },
        )
        if state.has_run_ledger
        else None
    )
    try:
        tables = _restore(db, directory, manifest, specs, overwrite, progress)
    except BaseException as error:
        if run_id is not None:
            finish_run(db, run_id, RunStatus.FAILED, error=_one_line(error))
        raise
    result = RestoreResult(
        database=database,
        source=str(directory),
        alembic_revision=manifest.alembic_revision,
        overwrite=overwrite,
        tables=tables,
        inserted=sum(t.inserted for t in tables),
        identical=sum(t.identical for t in tables),
        different=sum(t.different for t in tables),
        overwritten=sum(t.overwritten for t in tables),
        left_different=sum(t.different - t.overwritten for t in tables),
        seconds=round(time.perf_counter() - started, 3),
        run_id=run_id,
    )
    if run_id is not None:
        finish_run(db, run_id, RunStatus.COMPLETED, summary=_summary(result))
    return result


def _summary(result: RestoreResult) -> dict[str, Any]:
    return {
        "source": result.source,
        "alembic_revision": result.alembic_revision,
        "overwrite": result.overwrite,
        "tables": {
            t.table: {
                "rows": t.rows,
                "inserted": t.inserted,
                "identical": t.identical,
                "different": t.different,
                "overwritten": t.overwritten,
                "different_keys": t.different_keys,
            }
            for t in result.tables
        },
        "seconds": result.seconds,
    }


def _one_line(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"[:1000]
