"""The migration toolkit behind `orch-migrate`: export, restore, backfill, verify, status,
rehearse, fingerprint and sample data.

The public face is :mod:`prompt_tool.migrate.commands`, one function per operator command in
the shape of ``alembic.command``::

    from prompt_tool.migrate import BackfillOptions, commands

    summary = commands.backfill("postgresql://...", BackfillOptions(batch_size=500))

The functions stay in ``commands`` rather than here: ``migrate.export``, ``migrate.backfill``,
``migrate.restore``... are the modules that implement them, and a function bound to the same
name in this package would hide the module (``from prompt_tool.migrate import rehearse`` would
then be the function). This package exports the module, each command's options and report, and
every error a command raises.
"""

from prompt_tool.migrate import commands
from prompt_tool.migrate.archive import ExportRevisionMismatchError, InvalidExportError
from prompt_tool.migrate.backfill import (
    BackfillBusyError,
    BackfillOptions,
    BackfillProgress,
    BackfillSummary,
    BackfillWorkerError,
)
from prompt_tool.migrate.backfill.remote import ControlAction, ControlOutcome, ControlRequest
from prompt_tool.migrate.commands import (
    BackfillControlOptions,
    ExportOptions,
    FingerprintOptions,
    RehearseOptions,
    RestoreOptions,
    SampleDataOptions,
    StatusOptions,
)
from prompt_tool.migrate.export import ExportResult
from prompt_tool.migrate.fingerprint import (
    LegacyFingerprint,
    TableFingerprint,
    changed_tables,
    fingerprint_legacy_tables,
    load_fingerprint,
)
from prompt_tool.migrate.rehearse import RehearsalRefusedError, RehearsalReport
from prompt_tool.migrate.restore import (
    DifferingRows,
    DifferingRowsError,
    RestoreConflictError,
    RestoreOutcome,
    RestoreResult,
    UnstorableTextError,
)
from prompt_tool.migrate.retract import ArchiveOutdatedError, UserDataWouldBeLostError
from prompt_tool.migrate.sample import LoadedSample, load_legacy_sample
from prompt_tool.migrate.status import NotReadyError, StatusReport, readiness_guard
from prompt_tool.migrate.verify import VerifyOptions, VerifyReport

__all__ = [
    "ArchiveOutdatedError",
    "BackfillBusyError",
    "BackfillControlOptions",
    "BackfillOptions",
    "BackfillProgress",
    "BackfillSummary",
    "BackfillWorkerError",
    "ControlAction",
    "ControlOutcome",
    "ControlRequest",
    "DifferingRows",
    "DifferingRowsError",
    "ExportOptions",
    "ExportResult",
    "ExportRevisionMismatchError",
    "FingerprintOptions",
    "InvalidExportError",
    "LegacyFingerprint",
    "LoadedSample",
    "NotReadyError",
    "RehearsalRefusedError",
    "RehearsalReport",
    "RehearseOptions",
    "RestoreConflictError",
    "RestoreOptions",
    "RestoreOutcome",
    "RestoreResult",
    "SampleDataOptions",
    "StatusOptions",
    "StatusReport",
    "TableFingerprint",
    "UnstorableTextError",
    "UserDataWouldBeLostError",
    "VerifyOptions",
    "VerifyReport",
    "changed_tables",
    "commands",
    "fingerprint_legacy_tables",
    "load_fingerprint",
    "load_legacy_sample",
    "readiness_guard",
]
