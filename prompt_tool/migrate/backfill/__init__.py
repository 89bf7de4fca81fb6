"""`orch-migrate backfill`: turn the legacy TEXT columns into template references.

Every distinct legacy text of a project and role becomes an imported template (scope project,
name ``imported/<role>/<sha256 of the text>``, its single version a literal template that renders
back to the text byte for byte), and each session gets a reference to it. Sessions are walked in
keyset batches on the primary key, up to a bound fixed when the run starts (newer sessions are
dual-written); each batch is one short transaction that reads the sessions without locking them
(each text read and hashed once), creates the missing templates, upserts the references in one
statement, and records a checkpoint in the migration ledger. Runs are idempotent (a second run
changes nothing), resumable (an interrupted run continues after its last checkpoint) and guarded
by an advisory lock per project. A legacy text whose stored bytes are not valid UTF-8 (SQLite
keeps whatever a raw driver wrote) is never read into Python: it is counted as unreadable, named
(table, id, column), left unlinked on the legacy path, and not a byte of it changes.

Modules, arrows pointing down: ``command`` (the entry: locks, resume, the run's record) ->
``workers`` (planned ranges, SKIP LOCKED claims, worker processes) -> ``walk`` (the keyset walk,
retries) -> ``batch`` (one batch's SQL) -> ``ledger`` (batch records, resume, statuses) ->
``types`` (options, scope, the frozen :class:`BackfillRun`, summary).
"""

from prompt_tool.migrate.backfill.batch import IMPORTED_PREFIX, ImportedVersions, imported_name
from prompt_tool.migrate.backfill.command import BackfillBusyError, backfill
from prompt_tool.migrate.backfill.types import BackfillOptions, BackfillProgress, BackfillSummary
from prompt_tool.migrate.backfill.workers import BackfillWorkerError

__all__ = [
    "IMPORTED_PREFIX",
    "BackfillBusyError",
    "BackfillOptions",
    "BackfillProgress",
    "BackfillSummary",
    "BackfillWorkerError",
    "ImportedVersions",
    "backfill",
    "imported_name",
]
