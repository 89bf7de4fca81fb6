"""`orch-migrate export`: stream a deployment's data to a directory of JSON Lines files.

The export is written under a temporary sibling name (``.NAME.incomplete-XXXX``) and renamed into
place only when every file and then the manifest are written, so an interrupted export never
leaves a directory that looks complete (what a killed one leaves, the next export to the same
place removes: :mod:`prompt_tool.migrate.staging`); an existing directory is replaced
(``force``) only after the new export is complete and flushed to disk. Memory stays flat: rows
are streamed from one consistent snapshot and written in 1 MiB blocks; on PostgreSQL a big table
is read in parallel key ranges. The format is described in :mod:`prompt_tool.migrate.archive`.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import os
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine

import prompt_tool
from prompt_tool.db.bulk_io import DialectIO, dialect_io, quoted
from prompt_tool.db.dialect import dialect_of, read_only
from prompt_tool.db.projects import projects_by_slug
from prompt_tool.db.revision_guard import require_known_revision
from prompt_tool.db.url import redact
from prompt_tool.errors import InvalidInputError, SchemaError
from prompt_tool.migrate.archive import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    ArchivedFile,
    Manifest,
    ProgressCallback,
    TableSpec,
    database_state,
    existing_table_specs,
)
from prompt_tool.migrate.runs import (
    MigrationRunStatus,
    ReadRun,
    RunKind,
    finish_run,
    outcome_of,
    start_read_run,
)
from prompt_tool.migrate.staging import remove_leftovers, staging_directory

__all__ = ["ExportResult", "ExportedTable", "export"]

# Deterministic gzip (no name, mtime 0): the same data gives the same bytes and checksums.
# Level 6 (zlib's default) rather than gzip's 9: a third of the CPU for a few % of size.
_GZIP_LEVEL = 6
# Parallel readers of one big PostgreSQL table when not told: one per core, at most this many.
_MAX_AUTO_JOBS = 4


@dataclass(frozen=True, slots=True)
class ExportedTable:
    table: str
    file: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ExportResult:
    database: str
    directory: str
    alembic_revision: str | None
    tool_version: str
    projects: list[str] | None
    compression: str | None
    tables: list[ExportedTable]
    rows: int
    bytes: int
    seconds: float
    run_id: int | None
    # Why the run is not in the ledger though the database has one (the export is whole).
    not_recorded: str | None = None
    # Staging directories of killed exports to the same place, removed first (staging.py).
    leftovers_removed: list[str] = field(default_factory=list)
    leftover_bytes_removed: int = 0

    @property
    def row_counts(self) -> dict[str, int]:
        return {table.table: table.rows for table in self.tables}


class _HashingFile:
    """A file being written: counts and hashes exactly the bytes that reach the disk."""

    def __init__(self, path: Path) -> None:
        self._file: BinaryIO = open(path, "xb", buffering=0)  # noqa: SIM115 - closed in close()
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        self.size += len(data)
        # A raw file may write less than asked; loop until every byte is down.
        view = memoryview(data)
        while view:
            written = self._file.write(view)
            view = view[written or 0 :]
        return len(data)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        # No fsync here: it would cost as much as the whole read. A machine crash can tear an
        # export, and restore then refuses it by its checksums; only replacing an old export
        # (see _publish) waits for the new one to be on disk.
        self._file.close()


class _LinesFile:
    """Blocks of lines going into a file, each block gzip-compressed or not.

    A compressed table is a series of gzip members, one per block, so that the threads reading
    a table in parallel can each compress what they read (:meth:`encode`); concatenated members
    are one valid gzip file, and deflate's 32 KiB window makes 1 MiB members cost nothing in size.
    """

    def __init__(self, path: Path, compress: bool) -> None:
        self.path = path
        self._raw = _HashingFile(path)
        self._compress = compress
        self.rows = 0

    def encode(self, data: bytes) -> bytes:
        """``data`` as it goes into the file; safe to call from any thread."""
        if not self._compress:
            return data
        # No name, mtime 0: the same data gives the same bytes and checksum.
        return gzip.compress(data, compresslevel=_GZIP_LEVEL, mtime=0)

    def write_encoded(self, data: bytes, rows: int) -> None:
        self._raw.write(data)
        self.rows += rows

    def close(self) -> None:
        try:
            if self._compress and self._raw.size == 0:
                self._raw.write(self.encode(b""))  # an empty table is still a valid gzip file
        finally:
            self._raw.close()

    @property
    def size(self) -> int:
        return self._raw.size

    @property
    def sha256(self) -> str:
        return self._raw.sha256.hexdigest()


class _CancelledError(Exception):
    """A range reader stops because the export as a whole stopped."""


_END = object()  # the last item of a range's queue


class _RangeReaders:
    """``jobs`` threads, each on its own connection to the export's snapshot, read a table's key
    ranges in turn; :meth:`blocks` hands their blocks over in key order.

    A reader may start a range only while fewer than ``jobs + 1`` ranges are read or waiting
    ahead of the one being written, so memory stays a few ranges' worth whatever the table's
    size, while the ranges after the one being written are read in parallel with it.
    """

    def __init__(
        self,
        engine: Engine,
        dialect: DialectIO,
        spec: TableSpec,
        conditions: list[str | None],
        jobs: int,
        encode: Callable[[bytes], bytes],
    ) -> None:
        self._engine = engine
        self._dialect = dialect
        self._spec = spec
        self._conditions = conditions
        self._encode = encode
        self._queues: list[queue.SimpleQueue[object]] = [queue.SimpleQueue() for _ in conditions]
        self._claimed = itertools.count()
        self._claim_lock = threading.Lock()
        self._window = threading.Semaphore(jobs + 1)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._read, name=f"export-{spec.name}-{n}", daemon=True)
            for n in range(min(jobs, len(conditions)))
        ]
        for thread in self._threads:
            thread.start()

    def _claim(self) -> int | None:
        self._window.acquire()
        with self._claim_lock:
            index = next(self._claimed)
        if self._stop.is_set() or index >= len(self._conditions):
            return None
        return index

    def _read(self) -> None:
        try:
            with self._dialect.worker(self._engine) as connection:
                while (index := self._claim()) is not None:
                    lines = self._dialect.stream_lines(
                        connection, self._spec, self._conditions[index]
                    )
                    with closing(lines):
                        for data, rows in lines:
                            if self._stop.is_set():
                                raise _CancelledError
                            self._queues[index].put((self._encode(data), rows))
                    self._queues[index].put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the writing thread
            # Every queue: the writer may be waiting on any range this reader would have read.
            for waiting in self._queues:
                waiting.put(error)

    def blocks(self) -> Generator[tuple[bytes, int]]:
        for waiting in self._queues:
            while (item := waiting.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, tuple)
                yield item
            self._window.release()

    def close(self) -> None:
        self._stop.set()
        for _ in self._threads:
            self._window.release()  # wakes a reader waiting for a turn, which then sees the stop
        for thread in self._threads:
            thread.join()


def _and(*conditions: str | None) -> str | None:
    present = [f"({c})" for c in conditions if c]
    return " AND ".join(present) if present else None


def _write_table(
    connection: Connection,
    dialect: DialectIO,
    spec: TableSpec,
    where: str | None,
    output: _LinesFile,
    job: _ExportJob,
) -> None:
    """Stream one table into ``output``: in one go, or in key ranges read in parallel."""
    progress = job.progress
    total = None
    if progress is not None:
        total = _count_rows(connection, spec, where)
        progress(spec.name, 0, total)
    ranges = dialect.split(connection, spec, where, job.jobs)
    readers: _RangeReaders | None = None
    if ranges:
        conditions = [_and(where, key_range) for key_range in ranges]
        readers = _RangeReaders(
            connection.engine, dialect, spec, conditions, job.jobs, output.encode
        )
        blocks = readers.blocks()
    else:
        blocks = _encoded(dialect.stream_lines(connection, spec, where), output.encode)
    try:
        with closing(blocks):
            for data, rows in blocks:
                output.write_encoded(data, rows)
                if progress is not None:
                    progress(spec.name, output.rows, total)
    finally:
        if readers is not None:
            readers.close()


def _encoded(
    lines: Generator[tuple[bytes, int]], encode: Callable[[bytes], bytes]
) -> Generator[tuple[bytes, int]]:
    with closing(lines):
        for data, rows in lines:
            yield encode(data), rows


def _scope_conditions(project_ids: list[int] | None, tables: set[str]) -> dict[str, str | None]:
    """The WHERE condition of every table for an export of ``project_ids`` (None: everything).

    The selected projects' sessions and A/B tests; every global prompt (project_id NULL) and
    every prompt those sessions' references and A/B tests point at, even in another project, with
    all their versions, labels and events; the projects rows those prompts belong to. So restore
    never meets a reference to a row the export left out.
    """
    if project_ids is None:
        return dict.fromkeys(tables)
    # Inlined, not bound: conditions are SQL text, joined with the key ranges. They are ints
    # read from the database.
    ids = ", ".join(str(int(i)) for i in project_ids) or "NULL"
    sessions = f"SELECT id FROM orchestration_sessions WHERE project_id IN ({ids})"
    tests = f"SELECT id FROM ab_tests WHERE project_id IN ({ids})"
    referenced = [
        f"SELECT prompt_id FROM ab_tests WHERE project_id IN ({ids})",
        "SELECT v.prompt_id FROM prompt_versions v JOIN ab_test_variants a "
        f"ON a.prompt_version_id = v.id WHERE a.ab_test_id IN ({tests})",
    ]
    if "session_prompt_refs" in tables:
        referenced.append(
            "SELECT v.prompt_id FROM prompt_versions v JOIN session_prompt_refs r "
            f"ON r.prompt_version_id = v.id WHERE r.session_id IN ({sessions})"
        )
    prompts_condition = (
        f"project_id IN ({ids}) OR project_id IS NULL OR id IN ({' UNION '.join(referenced)})"
    )
    prompts = f"SELECT id FROM prompts WHERE {prompts_condition}"
    conditions: dict[str, str | None] = {
        "projects": (
            f"id IN ({ids}) OR id IN (SELECT project_id FROM prompts WHERE {prompts_condition})"
        ),
        "prompts": prompts_condition,
        "prompt_versions": f"prompt_id IN ({prompts})",
        "orchestration_sessions": f"project_id IN ({ids})",
        "session_prompt_refs": f"session_id IN ({sessions})",
        "orchestration_steps": f"session_id IN ({sessions})",
        "ab_tests": f"project_id IN ({ids})",
        "ab_test_variants": f"ab_test_id IN ({tests})",
        # Both ends: an assignment is meaningless (and unrestorable) without its session.
        "ab_assignments": f"ab_test_id IN ({tests}) AND session_id IN ({sessions})",
        "template_labels": f"prompt_id IN ({prompts})",
        "template_events": f"prompt_id IN ({prompts})",
    }
    return {name: conditions[name] for name in tables}


def _homes() -> set[Path]:
    places = {Path.cwd().resolve()}
    with suppress(RuntimeError):  # no home directory known: nothing to protect there
        places.add(Path.home().resolve())
    return places | {parent for place in places for parent in place.parents}


def _check_target(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise InvalidInputError(f"{target} exists and is not a directory; choose another target")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not force:
        raise InvalidInputError(
            f"{target} is not empty; choose another directory, or pass --force to replace it "
            "(the old contents are removed only once the new export is complete)"
        )
    # --force removes the old contents: never the directory we run in, a home, or a parent.
    if target.resolve() in _homes():
        raise InvalidInputError(
            f"refusing to replace {target}: it is (or holds) the current or home directory; "
            "export to a directory of its own"
        )


def _fsync(path: Path) -> None:
    # Not every platform can open a directory for fsync; where it can't, the rename is all.
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        _fsync(path)
    _fsync(directory)


def _publish(staging: Path, target: Path) -> None:
    """Move the complete export into place; an old one goes only after the new one is in."""
    if not target.exists():
        staging.rename(target)
    elif not any(target.iterdir()):
        target.rmdir()
        staging.rename(target)
    else:
        old = target.with_name(f".{target.name}.replaced-{secrets.token_hex(4)}")
        # The old export goes only once the new one is on disk, even across a machine crash.
        _fsync_tree(staging)
        target.rename(old)
        try:
            staging.rename(target)
        except BaseException:
            old.rename(target)
            raise
        _fsync(target.parent)
        shutil.rmtree(old, ignore_errors=True)


def _project_ids(engine: Engine, slugs: list[str] | None) -> list[int] | None:
    if not slugs:
        return None
    with engine.connect() as connection:
        return list(projects_by_slug(connection, slugs))


def _write_tables(
    connection: Connection, dialect: DialectIO, staging: Path, job: _ExportJob
) -> tuple[str | None, list[ArchivedFile]]:
    revision = MigrationContext.configure(connection).get_current_revision()
    specs = existing_table_specs(connection)
    conditions = _scope_conditions(job.project_ids, {spec.name for spec in specs})
    if job.rows is not None:
        conditions = {name: job.rows.get(name) for name in conditions}
    files = []
    for spec in specs:
        output = _LinesFile(
            staging / (f"{spec.name}.jsonl" + (".gz" if job.compress else "")), job.compress
        )
        try:
            _write_table(connection, dialect, spec, conditions[spec.name], output, job)
        finally:
            output.close()
        files.append(
            ArchivedFile(
                table=spec.name,
                file=output.path.name,
                columns=list(spec.columns),
                kinds=[kind.value for kind in spec.kinds],
                primary_key=list(spec.primary_key),
                rows=output.rows,
                bytes=output.size,
                sha256=output.sha256,
            )
        )
    return revision, files


def _count_rows(connection: Connection, spec: TableSpec, where: str | None) -> int:
    """The rows the export of a table will hold, for its progress: counted in the export's
    snapshot, so the total is exact (one scan, far cheaper than writing the rows out)."""
    condition = f" WHERE {where}" if where else ""
    return int(
        connection.exec_driver_sql(
            f"SELECT count(*) FROM {quoted(spec.name)}{condition}"
        ).scalar_one()
    )


def _write_manifest(staging: Path, manifest: Manifest) -> None:
    with open(staging / MANIFEST_NAME, "x", encoding="utf-8") as file:
        file.write(manifest.to_json())


def export(  # noqa: PLR0913 - keyword-only options; commands.export takes one ExportOptions
    engine: Engine,
    target: Path | str,
    *,
    projects: Sequence[str] | None = None,
    compress: bool = False,
    force: bool = False,
    jobs: int | None = None,
    progress: ProgressCallback | None = None,
    rows: Mapping[str, str | None] | None = None,
    record_run: bool = True,
    readonly: bool = False,
) -> ExportResult:
    """Export the data of ``engine``'s database to the directory ``target``.

    ``projects`` (slugs; None or empty: everything) limits it to those projects' data plus what
    it references. ``compress`` gzips every file. ``jobs`` parallel readers for a big PostgreSQL
    table (default: one per core, at most 4). ``progress(table, rows_done, rows_in_table)`` is
    called as rows are written (each table's rows counted first, only for a progress);
    whatever it (or anything else) raises midway, no complete-looking directory is left behind
    and an existing ``target`` is untouched. ``rows`` (instead of
    ``projects``) is the SQL condition each table's rows must meet (a table it does not name is
    exported whole); ``record_run=False`` writes nothing to the database, not even the ledger
    (the downgrade's archive, taken while the downgrade holds its transaction open).
    ``readonly`` reads in read-only transactions only and records no run (a replica); a user
    who may not write the ledger gets the export too, unrecorded: ``not_recorded`` says why.

    Raises :class:`InvalidInputError` when ``target`` is a non-empty directory and ``force`` is
    not set, :class:`NotFoundError` for an unknown project, :class:`SchemaError` when the
    database is not under Alembic, :class:`UnknownRevisionError` when this prompt-tool does not
    know its revision (an export of a schema it does not know could not be restored).
    """
    require_known_revision(engine, "export")
    target = Path(target).absolute()
    if readonly:
        engine = read_only(engine)
    _check_target(target, force)
    jobs = min(_MAX_AUTO_JOBS, os.cpu_count() or 1) if jobs is None else jobs
    if jobs < 1:
        raise InvalidInputError(f"jobs must be 1 or more, not {jobs}")
    state = database_state(engine)
    if state.revision is None:
        raise SchemaError(
            f"{redact(engine.url)} is not under Alembic; run `orch-migrate db stamp 0001` or "
            "`orch-migrate db upgrade` first, so the export can say which schema it holds"
        )
    if projects and rows is not None:
        raise InvalidInputError("export takes projects or row conditions, not both")
    started = time.perf_counter()
    slugs = list(dict.fromkeys(projects)) if projects else None
    project_ids = _project_ids(engine, slugs)
    job = _ExportJob(target, slugs, project_ids, rows, compress, jobs, progress, started)
    run = (
        start_read_run(
            engine,
            RunKind.EXPORT,
            readonly=readonly,
            project_id=project_ids[0] if project_ids and len(project_ids) == 1 else None,
            params={"directory": str(target), "projects": slugs, "gzip": compress},
        )
        if state.has_run_ledger and record_run
        else ReadRun(None)
    )
    run_id = run.id
    try:
        result = _export(engine, job)
    except OSError as error:
        # Named by the directory the operator gave, not the staging directory beside it.
        failure = InvalidInputError(
            f"cannot write the export to {target}: {error.strerror or error}; nothing was left "
            "there: free space or fix the permissions, then export again"
        )
        if run_id is not None:
            finish_run(engine, run_id, MigrationRunStatus.FAILED, error=str(failure))
        raise failure from None
    except BaseException as error:
        if run_id is not None:
            finish_run(engine, run_id, outcome_of(error), error=_one_line(error))
        raise
    result = replace(result, run_id=run_id, not_recorded=run.not_recorded)
    if run_id is not None:
        finish_run(engine, run_id, MigrationRunStatus.COMPLETED, summary=_summary(result))
    return result


@dataclass(frozen=True, slots=True)
class _ExportJob:
    """One export: where it goes, which rows it holds (some projects' by slugs and ids, or rows
    meeting conditions) and how it writes them."""

    target: Path
    projects: list[str] | None
    project_ids: list[int] | None
    rows: Mapping[str, str | None] | None
    compress: bool
    jobs: int
    progress: ProgressCallback | None
    started: float


def _export(engine: Engine, job: _ExportJob) -> ExportResult:
    target, compress = job.target, job.compress
    leftovers = remove_leftovers(target)
    with staging_directory(target) as staging:
        with engine.connect() as connection:
            dialect = dialect_io(connection)
            with dialect.snapshot(connection):
                revision, files = _write_tables(connection, dialect, staging, job)
        manifest = Manifest(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            tool_version=prompt_tool.__version__,
            alembic_revision=revision,
            source_dialect=dialect_of(engine),
            created_at=datetime.now(UTC).isoformat(),
            projects=job.projects,
            compression="gzip" if compress else None,
            files=files,
        )
        _write_manifest(staging, manifest)  # last: only a complete export has one
        _publish(staging, target)
    return ExportResult(
        database=redact(engine.url),
        directory=str(target),
        alembic_revision=revision,
        tool_version=manifest.tool_version,
        projects=job.projects,
        compression=manifest.compression,
        tables=[ExportedTable(f.table, f.file, f.rows, f.bytes, f.sha256) for f in files],
        rows=sum(f.rows for f in files),
        bytes=sum(f.bytes for f in files),
        seconds=round(time.perf_counter() - job.started, 3),
        run_id=None,
        leftovers_removed=leftovers.removed,
        leftover_bytes_removed=leftovers.bytes,
    )


def _summary(result: ExportResult) -> dict[str, Any]:
    return {
        "directory": result.directory,
        "alembic_revision": result.alembic_revision,
        "rows": {t.table: t.rows for t in result.tables},
        "bytes": result.bytes,
        "seconds": result.seconds,
    }


def _one_line(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"[:1000]
