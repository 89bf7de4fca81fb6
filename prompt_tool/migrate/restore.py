"""`orch-migrate restore --from DIR`: load an export back, checked first, all or nothing.

Before anything is written, the export is checked: the manifest must list every table of its
schema revision and the directory must hold nothing else, every file's size, sha256 and row count
must match, and the target database must be at the export's revision. A refused export leaves the
database exactly as it was (not even a ledger row is written).

Then one transaction compares every row of the export with the row of the same primary key in the
database and inserts, in foreign-key order and in batches, the rows the database lacks, with their
original ids (references stay valid); identical rows are skipped. A row that is there with other
values was changed after the export was taken, and is never replaced or left behind silently:

* by default (:attr:`DifferingRows.REFUSE`) any such row refuses the whole restore, naming the
  rows, and nothing is written (:class:`DifferingRowsError`);
* :attr:`DifferingRows.KEEP_CURRENT` restores the rest and leaves them as they are;
* :attr:`DifferingRows.OVERWRITE` replaces them with the export's values.

``dry_run`` compares only, in a read-only transaction, and reports what a restore would do. Rows
the database has and the export does not are never touched. Why one transaction: a restore is
all-or-nothing, so there is nothing to resume; a failed or interrupted restore leaves no trace
but a failed run in the ledger, and running it again is safe anyway (idempotent). On PostgreSQL
the identity sequences are moved past the restored ids, so later inserts don't collide.
"""

from __future__ import annotations

import enum
import gzip
import hashlib
import io
import json
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from prompt_tool.db.bulk_io import DialectIO, dialect_io, update_sql
from prompt_tool.db.dialect import refresh_statistics
from prompt_tool.db.engine import Connectable, begin, bounded_waits, connect
from prompt_tool.db.revision_guard import require_known_revision
from prompt_tool.db.url import redact
from prompt_tool.errors import InvalidInputError, PromptToolError
from prompt_tool.migrate.archive import (
    ARCHIVED_TABLES,
    MANIFEST_NAME,
    TABLES_AT_REVISION,
    ArchivedFile,
    ExportRevisionMismatchError,
    InvalidExportError,
    Manifest,
    ProgressCallback,
    TableSpec,
    archived_data_revision,
    database_state,
    normalizer,
    undecodable_text,
)
from prompt_tool.migrate.lock_waits import lock_waits_told
from prompt_tool.migrate.runs import MigrationRunStatus, RunKind, finish_run, start_run
from prompt_tool.settings import get_settings

__all__ = [
    "DifferingRows",
    "DifferingRowsError",
    "RestoreConflictError",
    "RestoreOutcome",
    "RestoreResult",
    "RestoredTable",
    "UnstorableTextError",
    "restore",
    "verify_export",
]

_READ_BYTES = 1 << 20
# A batch is at most this many rows or bytes of JSON: memory stays flat with 100 KB texts too.
_BATCH_ROWS = 500
_BATCH_BYTES = 4 << 20
# How many keys of differing rows a report names.
_DIFFERENT_KEYS_SHOWN = 5


class UnstorableTextError(InvalidInputError):
    """The export holds text that is not valid UTF-8 and the target stores only UTF-8:
    refused before anything was written."""


def _check_storable(db: Connectable, directory: Path, manifest: Manifest, database: str) -> None:
    """Refuse, before writing anything, an export whose non-UTF-8 text the target cannot hold
    as the same bytes (PostgreSQL): a restore never changes a byte of what it carries."""
    with connect(db) as connection:
        if dialect_io(connection).stores_any_text_bytes:
            return
    count, names = undecodable_text(directory, manifest)
    if not count:
        return
    more = ", ..." if count > len(names) else ""
    raise UnstorableTextError(
        f"the export holds {count} text value(s) that are not valid UTF-8 "
        f"({', '.join(names)}{more}), which {database} cannot store as the same bytes; nothing "
        "was written: restore it into a SQLite database, or fix those values at the source "
        "and export again"
    )


class RestoreConflictError(InvalidInputError):
    """The target database refused a row (a unique key or a reference); nothing was written."""


class DifferingRows(enum.StrEnum):
    """What a restore does with rows the database holds with other values than the export (rows
    changed after the export was taken)."""

    REFUSE = "refuse"  # the default: restore nothing, name them (DifferingRowsError)
    KEEP_CURRENT = "keep-current"  # restore the rest, leave them as they are
    OVERWRITE = "overwrite"  # replace them with the export's values


class RestoreOutcome(enum.StrEnum):
    RESTORED = "restored"  # committed: the counts of inserted, overwritten and kept rows hold
    DRY_RUN = "dry-run"  # compared only; nothing was written
    REFUSED = "refused"  # rows differ and no choice was made; nothing was written


@dataclass(frozen=True, slots=True)
class RestoredTable:
    table: str
    primary_key: list[str]
    rows: int  # rows of the table in the export
    missing: int  # rows the database lacks: inserted when the outcome is ``restored``
    identical: int  # rows already there with the same values: skipped
    different: int  # rows there with other values (changed after the export was taken)
    inserted: int
    overwritten: int  # differing rows replaced with the export's (``overwrite``)
    kept: int  # differing rows left as they are (``keep-current``)
    # The primary keys of the first few rows that differ (each key as a list of its columns).
    different_keys: list[list[Any]] = field(default_factory=list)

    def keys_text(self) -> str:
        """The first differing keys as a person reads them: ``id 4, 9`` or
        ``(session_id, role) (4, "system")``, with ``...`` when there are more."""
        if len(self.primary_key) == 1:
            label = self.primary_key[0]
            keys = [_value_text(key[0]) for key in self.different_keys]
        else:
            label = f"({', '.join(self.primary_key)})"
            keys = [f"({', '.join(map(_value_text, key))})" for key in self.different_keys]
        more = ", ..." if self.different > len(self.different_keys) else ""
        return f"{label} {', '.join(keys)}{more}"


@dataclass(frozen=True, slots=True)
class RestoreResult:
    database: str
    source: str
    alembic_revision: str | None
    differing: DifferingRows  # what was asked for rows that differ
    outcome: RestoreOutcome
    # Why the restore was refused (dry run: would be), in one line; None when it was not.
    refusal: str | None
    tables: list[RestoredTable]
    rows: int
    missing: int
    identical: int
    different: int
    inserted: int
    overwritten: int
    kept: int
    seconds: float
    run_id: int | None


class DifferingRowsError(PromptToolError):
    """Rows of the database differ from the export and neither keeping nor overwriting them was
    asked for: the restore was refused and nothing was written. ``result`` says which rows."""

    exit_code = 1  # a check failed: the operator decides, then runs it again

    def __init__(self, result: RestoreResult) -> None:
        super().__init__(result.refusal)
        self.result = result


def _value_text(value: Any) -> str:
    return str(value) if isinstance(value, int) else json.dumps(value, ensure_ascii=False)


def _joined(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _rows_text(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


def _refusal(tables: Sequence[RestoredTable], *, dry_run: bool) -> str | None:
    """The one line saying which rows differ and what to do, or None when none does."""
    differing = [t for t in tables if t.different]
    if not differing:
        return None
    first, *others = differing
    where = _joined(
        [f"{_rows_text(first.different)} in {first.table}"]
        + [f"{t.different} in {t.table}" for t in others]
    )
    total = sum(t.different for t in differing)
    example = first.keys_text() if not others else f"{first.table} {first.keys_text()}"
    what = (
        f"{where} {'differs' if total == 1 else 'differ'} from the export (changed after it was "
        f"taken), e.g. {example}"
    )
    choices = (
        "`--keep-current` restores the rest and leaves them, `--overwrite` replaces them with "
        "the export's"
    )
    if dry_run:
        return f"a restore would be refused: {what}; nothing was written (dry run); {choices}"
    return f"{what}; nothing was written: `--dry-run` lists them; {choices}"


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

    Raises :class:`InvalidExportError` (exit code 2) for a missing or malformed manifest, one
    that does not list every table of its schema revision, a file in the directory that it does
    not list, a missing file, a size, checksum or row count that does not match.
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
    _check_tables(manifest_path, manifest.alembic_revision, tables)
    for entry in manifest.files:
        if Path(entry.file).name != entry.file or entry.file in {"", ".", "..", MANIFEST_NAME}:
            raise InvalidExportError(f"{manifest_path} names an unsafe file {entry.file!r}")
    _check_nothing_else(directory, manifest)
    for entry in manifest.files:
        _spec_of(entry)
        _check_file(directory, entry, manifest.compression == "gzip")
    return manifest


def _check_tables(manifest_path: Path, revision: str | None, tables: list[str]) -> None:
    """Every table of the export's revision is listed, and nothing more: a manifest that lost
    an entry would restore part of the data and call it done."""
    if revision is None:
        raise InvalidExportError(
            f"{manifest_path} names no schema revision (every export does): it was edited or is "
            "not from prompt-tool; nothing was written: export again"
        )
    expected = TABLES_AT_REVISION.get(revision)
    if expected is None:
        raise InvalidExportError(
            f"{manifest_path}: schema revision {revision!r} is not one this prompt-tool knows "
            f"({', '.join(TABLES_AT_REVISION)}); restore with the prompt-tool version that "
            "exported it"
        )
    missing = [name for name in expected if name not in tables]
    if missing:
        raise InvalidExportError(
            f"{manifest_path} does not list table{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}, which every export at schema revision {revision} holds (a "
            "--project export too): the manifest was edited or the export is incomplete; "
            "nothing was written: export again"
        )
    extra = [name for name in tables if name not in expected]
    if extra:
        raise InvalidExportError(
            f"{manifest_path} lists {', '.join(extra)}, which no export at schema revision "
            f"{revision} holds: the manifest was edited; nothing was written: export again"
        )


def _check_nothing_else(directory: Path, manifest: Manifest) -> None:
    listed = {entry.file for entry in manifest.files} | {MANIFEST_NAME}
    unlisted = sorted(path.name for path in directory.iterdir() if path.name not in listed)
    if unlisted:
        shown = _joined(
            unlisted if len(unlisted) <= 5 else [*unlisted[:4], f"{len(unlisted) - 4} more"]
        )
        raise InvalidExportError(
            f"{directory} holds {shown}, which {MANIFEST_NAME} does not list: an export holds "
            "only its manifest and the files it lists (a manifest that lost an entry would "
            "restore part of the data); nothing was written: move what you added out of the "
            "directory, or export again"
        )


def _check_revision(database: str, current: str | None, exported: str | None) -> None:
    if current == exported:
        return
    if (
        current is not None
        and exported is not None
        and archived_data_revision(current) == archived_data_revision(exported)
    ):
        return  # revisions apart only in tables no export holds (e.g. 0002 and 0003)
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


@dataclass(slots=True)
class _Tally:
    """What the comparison of one table found."""

    spec: TableSpec
    rows: int = 0
    missing: int = 0
    identical: int = 0
    different: int = 0
    different_keys: list[list[Any]] = field(default_factory=list)

    def result(self, outcome: RestoreOutcome, differing: DifferingRows) -> RestoredTable:
        # A restore is all or nothing: once committed, every missing row was inserted and every
        # differing row overwritten or kept as asked; otherwise nothing was.
        done = outcome is RestoreOutcome.RESTORED
        return RestoredTable(
            table=self.spec.name,
            primary_key=list(self.spec.primary_key),
            rows=self.rows,
            missing=self.missing,
            identical=self.identical,
            different=self.different,
            inserted=self.missing if done else 0,
            overwritten=self.different if done and differing is DifferingRows.OVERWRITE else 0,
            kept=self.different if done and differing is DifferingRows.KEEP_CURRENT else 0,
            different_keys=self.different_keys,
        )


class _RefusedError(Exception):
    """Rows differ and nothing may be written: raised inside the transaction to roll it back."""

    def __init__(self, tallies: list[_Tally]) -> None:
        super().__init__("rows differ from the export")
        self.tallies = tallies


@dataclass(slots=True)
class _Pass:
    """One pass over the export inside one transaction: every row compared with the database's,
    and written unless ``write`` is off (a dry run, or a refusal that has become certain: the
    transaction is rolled back then, so writing on would be wasted)."""

    connection: Connection
    dialect: DialectIO
    directory: Path
    compressed: bool
    differing: DifferingRows
    write: bool
    progress: ProgressCallback | None

    def tables(self, manifest: Manifest, specs: dict[str, TableSpec]) -> list[_Tally]:
        entries = {entry.table: entry for entry in manifest.files}
        # ARCHIVED_TABLES order: parents first.
        return [self._table(entries[name], spec) for name, spec in specs.items()]

    def _table(self, entry: ArchivedFile, spec: TableSpec) -> _Tally:
        bind = self.dialect.binder(spec)
        normal = normalizer(spec)
        key_positions = spec.key_positions
        names = [f"c{i}" for i in range(len(spec.columns))]
        insert = text(self.dialect.insert_sql(spec))
        update = text(update_sql(spec))
        overwrite = self.differing is DifferingRows.OVERWRITE
        tally = _Tally(spec)
        if self.progress is not None:
            self.progress(spec.name, 0, entry.rows)
        with _open(self.directory / entry.file, self.compressed) as file:
            for lines in _batches(file):
                rows = [_parse(line, len(names), entry.file) for line in lines]
                keys = [tuple(row[p] for p in key_positions) for row in rows]
                existing = {
                    tuple(row[p] for p in key_positions): normal(row)
                    for row in self.dialect.fetch_rows(self.connection, spec, keys)
                }
                new: list[list[Any]] = []
                changed: list[list[Any]] = []
                for key, row in zip(keys, rows, strict=True):
                    current = existing.get(key)
                    if current is None:
                        new.append(row)
                    elif current == normal(row):
                        tally.identical += 1
                    else:
                        tally.different += 1
                        if len(tally.different_keys) < _DIFFERENT_KEYS_SHOWN:
                            tally.different_keys.append(list(key))
                        if overwrite:
                            changed.append(row)
                tally.missing += len(new)
                tally.rows += len(rows)
                if tally.different and self.differing is DifferingRows.REFUSE:
                    self.write = False
                if self.write and (new or changed):
                    self._write(
                        spec,
                        insert,
                        update,
                        [dict(zip(names, bind(row), strict=True)) for row in new],
                        [dict(zip(names, bind(row), strict=True)) for row in changed],
                    )
                if self.progress is not None:
                    self.progress(spec.name, tally.rows, entry.rows)
        return tally

    def _write(
        self,
        spec: TableSpec,
        insert: Any,
        update: Any,
        new: list[dict[str, Any]],
        changed: list[dict[str, Any]],
    ) -> None:
        try:
            if new:
                self.connection.execute(insert, new)
            if changed:
                self.connection.execute(update, changed)
        except IntegrityError as error:
            reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
            raise RestoreConflictError(
                f"the target refused a row of {spec.name} ({reason}): it holds a row that "
                "clashes on a unique key, or the export references a row it lacks; nothing "
                "was written"
            ) from None


@dataclass(frozen=True, slots=True)
class _Source:
    """The export being restored: its directory, its checked manifest and its tables' shapes
    (parents first)."""

    directory: Path
    manifest: Manifest
    specs: dict[str, TableSpec]

    def read_by(
        self,
        connection: Connection,
        dialect: DialectIO,
        differing: DifferingRows,
        *,
        write: bool,
        progress: ProgressCallback | None,
    ) -> list[_Tally]:
        """Compare every row with the database's (and write unless ``write`` is off)."""
        reading = _Pass(
            connection,
            dialect,
            self.directory,
            self.manifest.compression == "gzip",
            differing,
            write=write,
            progress=progress,
        )
        return reading.tables(self.manifest, self.specs)


def _restore(
    db: Connectable,
    source: _Source,
    differing: DifferingRows,
    progress: ProgressCallback | None,
    run_params: dict[str, Any] | None,
) -> tuple[list[_Tally], int | None]:
    """Compare and write in one transaction (a savepoint inside the caller's): all or nothing.

    The run is recorded in the same transaction, so the ledger says a restore happened exactly
    when its rows are there; a refusal rolls both back. Raises :class:`_RefusedError`.
    """
    with begin(db) as connection:
        dialect = dialect_io(connection)
        with dialect.restoring(connection):
            run_id = (
                None
                if run_params is None
                else start_run(connection, RunKind.RESTORE, params=run_params)
            )
            tallies = source.read_by(connection, dialect, differing, write=True, progress=progress)
            if differing is DifferingRows.REFUSE and any(t.different for t in tallies):
                raise _RefusedError(tallies)
            for spec in source.specs.values():
                dialect.advance_identity(connection, spec.name, spec.columns)
            overwrite = differing is DifferingRows.OVERWRITE
            written = [t.spec.name for t in tallies if t.missing or (overwrite and t.different)]
            if written:
                # Whatever runs next (verify, the read shim) would otherwise be planned for empty
                # tables until autovacuum gets there: verify of 50,000 restored sessions ran for
                # over ten minutes instead of two seconds.
                refresh_statistics(connection, written)
    return tallies, run_id


@contextmanager
def _read_only(db: Connectable) -> Iterator[tuple[Connection, DialectIO]]:
    """A dry run's transaction: on an Engine, a read-only snapshot of its own (PostgreSQL itself
    refuses any write in it); on the caller's Connection, a savepoint rolled back at the end."""
    if isinstance(db, Engine):
        with db.connect() as connection:
            dialect = dialect_io(connection)
            with dialect.snapshot(connection):
                yield connection, dialect
        return
    savepoint = db.begin_nested()
    try:
        dialect = dialect_io(db)
        with dialect.restoring(db):
            yield db, dialect
    finally:
        savepoint.rollback()


def _compare(
    db: Connectable, source: _Source, differing: DifferingRows, progress: ProgressCallback | None
) -> list[_Tally]:
    with _read_only(db) as (connection, dialect):
        return source.read_by(connection, dialect, differing, write=False, progress=progress)


def restore(
    db: Connectable,
    source: Path | str,
    *,
    differing: DifferingRows | str = DifferingRows.REFUSE,
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
) -> RestoreResult:
    """Restore the export in the directory ``source`` into ``db``'s database.

    ``db`` is an Engine (the restore is its own transaction) or a Connection (a savepoint in the
    caller's transaction). ``progress(table, rows_done, rows_in_table)`` is called per batch.
    ``differing`` says what to do with rows the database holds with other values than the
    export (see :class:`DifferingRows`); by default they refuse the restore. ``dry_run``
    compares only and writes nothing (not even a ledger row): the result says what a restore
    would insert, which rows are identical and which differ, and ``refusal`` whether it would be
    refused.

    Raises :class:`InvalidExportError` for an incomplete, damaged or edited export,
    :class:`ExportRevisionMismatchError` when the database is not at the export's revision,
    :class:`DifferingRowsError` (exit code 1) when rows differ and ``differing`` is
    ``refuse``, and :class:`RestoreConflictError` when the database refuses a row; in every case
    nothing is written (the last leaves a failed run in the ledger). A database at a revision
    this prompt-tool does not know is refused first (:class:`UnknownRevisionError`).
    """
    require_known_revision(db, "restore")
    settings = get_settings()
    db = bounded_waits(
        db, settings.migration_lock_timeout_ms, settings.migration_statement_timeout_ms
    )
    # Every wait for a lock is bounded; one that runs out ends the restore in one line.
    with lock_waits_told(
        db, "restore", ARCHIVED_TABLES, stands="nothing was written (one transaction)"
    ):
        started = time.perf_counter()
        differing = DifferingRows(differing)
        directory = Path(source).absolute()
        manifest = verify_export(directory)
        database = redact(db.engine.url)
        state = database_state(db)
        _check_revision(database, state.revision, manifest.alembic_revision)
        specs = _target_specs(db, manifest)
        _check_storable(db, directory, manifest, database)

        def result(
            tallies: list[_Tally], outcome: RestoreOutcome, run_id: int | None = None
        ) -> RestoreResult:
            tables = [tally.result(outcome, differing) for tally in tallies]
            refusal = (
                _refusal(tables, dry_run=outcome is RestoreOutcome.DRY_RUN)
                if differing is DifferingRows.REFUSE
                else None
            )
            return RestoreResult(
                database=database,
                source=str(directory),
                alembic_revision=manifest.alembic_revision,
                differing=differing,
                outcome=outcome,
                refusal=refusal,
                tables=tables,
                rows=sum(t.rows for t in tables),
                missing=sum(t.missing for t in tables),
                identical=sum(t.identical for t in tables),
                different=sum(t.different for t in tables),
                inserted=sum(t.inserted for t in tables),
                overwritten=sum(t.overwritten for t in tables),
                kept=sum(t.kept for t in tables),
                seconds=round(time.perf_counter() - started, 3),
                run_id=run_id,
            )

        if dry_run:
            tallies = _compare(db, _Source(directory, manifest, specs), differing, progress)
            return result(tallies, RestoreOutcome.DRY_RUN)
        run_params = (
            {
                "source": str(directory),
                "differing": differing.value,
                "alembic_revision": manifest.alembic_revision,
                "projects": manifest.projects,
            }
            if state.has_run_ledger
            else None
        )
        try:
            tallies, run_id = _restore(
                db, _Source(directory, manifest, specs), differing, progress, run_params
            )
        except _RefusedError as refused:
            raise DifferingRowsError(result(refused.tallies, RestoreOutcome.REFUSED)) from None
        except BaseException as error:
            if run_params is not None:
                _record_failure(db, run_params, error)
            raise
        restored = result(tallies, RestoreOutcome.RESTORED, run_id)
        if run_id is not None:
            finish_run(db, run_id, MigrationRunStatus.COMPLETED, summary=_summary(restored))
        return restored


def _record_failure(db: Connectable, params: dict[str, Any], error: BaseException) -> None:
    """The failed attempt on record, once its transaction is rolled back; a database that cannot
    take even that does not hide the error that stopped the restore."""
    with suppress(SQLAlchemyError):
        run_id = start_run(db, RunKind.RESTORE, params=params)
        finish_run(db, run_id, MigrationRunStatus.FAILED, error=_one_line(error))


def _summary(result: RestoreResult) -> dict[str, Any]:
    return {
        "source": result.source,
        "alembic_revision": result.alembic_revision,
        "differing": result.differing.value,
        "tables": {
            t.table: {
                "rows": t.rows,
                "inserted": t.inserted,
                "identical": t.identical,
                "different": t.different,
                "overwritten": t.overwritten,
                "kept": t.kept,
                "different_keys": t.different_keys,
            }
            for t in result.tables
        },
        "seconds": result.seconds,
    }


def _one_line(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"[:1000]
