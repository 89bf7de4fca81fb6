"""The operator's commands as library calls: one function per `orch-migrate` command.

Every function has the shape of ``alembic.command``::

    fn(db: Engine | str, options, *, progress=None) -> Report

``db`` is an Engine (used as it is, never disposed here) or a database URL (an engine is made
for the call and disposed after it). ``options`` is the command's frozen dataclass (its
defaults are the command's); ``progress``, where a command reports any, is called as it goes.
The report is plain data that the CLI prints as a table or, with ``--json``, as JSON.

The schema commands (`orch-migrate db ...`) are :mod:`prompt_tool.db.schema`'s, whose functions
already take the URL that Alembic runs on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from prompt_tool.db.engine import connected
from prompt_tool.migrate.archive import ProgressCallback
from prompt_tool.migrate.backfill import BackfillOptions, BackfillProgress, BackfillSummary
from prompt_tool.migrate.backfill import backfill as backfill_sessions
from prompt_tool.migrate.backfill.estimate import BackfillEstimate
from prompt_tool.migrate.backfill.estimate import estimate as estimate_run
from prompt_tool.migrate.backfill.remote import ControlAction, ControlOutcome
from prompt_tool.migrate.backfill.remote import request as request_control
from prompt_tool.migrate.export import ExportResult
from prompt_tool.migrate.export import export as export_data
from prompt_tool.migrate.fingerprint import LegacyFingerprint, fingerprint_legacy_tables
from prompt_tool.migrate.rehearse import RehearsalReport
from prompt_tool.migrate.rehearse import rehearse as rehearse_rollback
from prompt_tool.migrate.restore import DifferingRows, RestoreResult
from prompt_tool.migrate.restore import restore as restore_export
from prompt_tool.migrate.sample import LoadedSample, load_legacy_sample
from prompt_tool.migrate.status import StatusReport
from prompt_tool.migrate.status import status as status_of
from prompt_tool.migrate.verify import VerifyOptions, VerifyReport
from prompt_tool.migrate.verify import verify as verify_texts

__all__ = [
    "BackfillControlOptions",
    "BackfillEstimate",
    "BackfillOptions",
    "ExportOptions",
    "FingerprintOptions",
    "RehearseOptions",
    "RestoreOptions",
    "SampleDataOptions",
    "StatusOptions",
    "VerifyOptions",
    "backfill",
    "backfill_control",
    "estimate_backfill",
    "export",
    "fingerprint",
    "rehearse",
    "restore",
    "sample_data",
    "status",
    "verify",
]


@dataclass(frozen=True, slots=True)
class ExportOptions:
    """`orch-migrate export DIR`: ``projects`` empty exports everything."""

    directory: Path | str
    projects: Sequence[str] = ()
    compress: bool = False
    force: bool = False
    # Parallel readers for a big PostgreSQL table (None: one per core, at most 4).
    jobs: int | None = None
    readonly: bool = False


@dataclass(frozen=True, slots=True)
class RestoreOptions:
    """`orch-migrate restore --from DIR`."""

    source: Path | str
    differing: DifferingRows = DifferingRows.REFUSE
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class BackfillControlOptions:
    """`orch-migrate backfill pause|resume|cancel`: ``run_id`` None asks the one live run."""

    action: ControlAction
    run_id: int | None = None


@dataclass(frozen=True, slots=True)
class StatusOptions:
    """`orch-migrate status`: ``projects`` empty reports every project."""

    projects: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class RehearseOptions:
    """`orch-migrate rehearse`."""

    rollback: bool = False
    # An empty database of the same kind to copy into and rehearse on (the source is only read).
    scratch: str | None = None
    sessions_to_create: int = 3


@dataclass(frozen=True, slots=True)
class FingerprintOptions:
    """`orch-migrate fingerprint`: ``against`` a fingerprint saved earlier with ``--json``."""

    against: Path | None = None


@dataclass(frozen=True, slots=True)
class SampleDataOptions:
    """`orch-migrate sample-data`."""

    sessions: int = 200
    projects: int = 3
    seed: int = 7
    force: bool = False


def _url(db: Engine | str) -> str:
    """The URL of ``db``, for the commands that make their own engines (a scratch copy, a
    separate connection per step)."""
    return db if isinstance(db, str) else db.url.render_as_string(hide_password=False)


def export(
    db: Engine | str, options: ExportOptions, *, progress: ProgressCallback | None = None
) -> ExportResult:
    """Export the data to ``options.directory``; ``progress(table, rows_done, rows_in_table)``."""
    with connected(db) as engine:
        return export_data(
            engine,
            options.directory,
            projects=options.projects,
            compress=options.compress,
            force=options.force,
            jobs=options.jobs,
            progress=progress,
            readonly=options.readonly,
        )


def restore(
    db: Engine | str, options: RestoreOptions, *, progress: ProgressCallback | None = None
) -> RestoreResult:
    """Restore the export in ``options.source``: checked first, all or nothing, idempotent."""
    with connected(db) as engine:
        return restore_export(
            engine,
            options.source,
            differing=options.differing,
            dry_run=options.dry_run,
            progress=progress,
        )


def backfill(
    db: Engine | str,
    options: BackfillOptions | None = None,
    *,
    progress: Callable[[BackfillProgress], None] | None = None,
) -> BackfillSummary:
    """Turn legacy prompt texts into imported templates and link every session to them."""
    with connected(db) as engine:
        return backfill_sessions(engine, options, progress=progress)


def estimate_backfill(db: Engine | str, options: BackfillOptions | None = None) -> BackfillEstimate:
    """Project a backfill's duration, WAL, templates and lock hold from sample batches that are
    rolled back (``orch-migrate backfill --estimate``); nothing stays written."""
    with connected(db) as engine:
        return estimate_run(engine, options)


def backfill_control(db: Engine | str, options: BackfillControlOptions) -> ControlOutcome:
    """Ask a running backfill (from any process or host) to pause, resume or cancel: it
    notices before its next batch."""
    with connected(db) as engine:
        return request_control(engine, options.action, options.run_id)


def verify(
    db: Engine | str,
    options: VerifyOptions | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Compare the templates path with the legacy text; ``progress(sessions_done, total)``."""
    with connected(db) as engine:
        return verify_texts(engine, options, progress=progress)


def status(db: Engine | str, options: StatusOptions | None = None) -> StatusReport:
    """Where the move stands per project and whether each may be switched to templates."""
    options = options or StatusOptions()
    with connected(db) as engine:
        return status_of(engine, projects=options.projects)


def rehearse(db: Engine | str, options: RehearseOptions | None = None) -> RehearsalReport:
    """Rehearse upgrade, backfill, verify, new sessions, downgrade and back."""
    options = options or RehearseOptions()
    return rehearse_rollback(
        _url(db),
        rollback=options.rollback,
        scratch=options.scratch,
        sessions_to_create=options.sessions_to_create,
    )


def fingerprint(db: Engine | str, options: FingerprintOptions | None = None) -> LegacyFingerprint:
    """Row count, highest id and sha256 of every legacy table (compared with a saved one)."""
    options = options or FingerprintOptions()
    return fingerprint_legacy_tables(_url(db), options.against)


def sample_data(db: Engine | str, options: SampleDataOptions | None = None) -> LoadedSample:
    """Load a realistic legacy data set into an empty database (refused where data is)."""
    options = options or SampleDataOptions()
    return load_legacy_sample(
        _url(db),
        sessions=options.sessions,
        projects=options.projects,
        seed=options.seed,
        force=options.force,
    )
