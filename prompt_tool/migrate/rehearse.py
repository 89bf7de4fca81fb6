"""`orch-migrate rehearse`: the rollback rehearsal in one command, for CI and for operators.

The journey, every step timed and checked, from whatever revision the database is at (0001: a
legacy deployment about to migrate; head: one already migrated) and back to it:

``refresh_statistics``
    ``ANALYZE`` of the legacy tables, committed before anything else: each rehearsal is planned
    for the data as it is now. A rolled-back rehearsal leaves dead rows behind, and PostgreSQL
    keeps the table sizes an ``ANALYZE`` inside it measured (they are not rolled back): without
    this, the tenth rehearsal of a database is planned for guesses the first never saw.
``fingerprint``
    every legacy table (rows, sha256 of each column's text form, highest id), the revision, and
    (``rollback``) the row count and columns of every table. This is the *baseline*: the legacy
    tables as they were before the migration wrote any row into them (at head: without the rows
    the new system wrote there, templates and their versions, A/B tests of templates).
``upgrade``
    to head (nothing to do when already there).
``backfill``, ``verify``
    every project; verify must pass. The statistics of the tables the backfill filled are
    refreshed inside the rehearsal (PostgreSQL allows ``ANALYZE`` in a transaction).
``create_sessions``
    ``sessions_to_create`` sessions through templates, the dual write: global templates
    ``rehearse/system|planner|synthesis`` made by ``orch-migrate rehearse``, which makes itself
    the bootstrap global admin (when another global admin exists already, it may not, and uses
    custom templates of its own in each project instead: no permission is taken from anyone).
``downgrade``
    to 0001, through every revision above it (0003's quarantine, then 0002). What people made
    with templates (here: the rehearsal's templates, their versions, labels, audit events, the
    links of its sessions) goes into an archive in a temporary directory, in place and in
    ``scratch``; ``rollback`` discards it (nothing is kept anyway, and an archive cannot be
    taken of rows that are never committed). Then ``after_downgrade
    (connection)`` if given.
``legacy_intact``
    every legacy table equals the baseline: projects, prompts, prompt_versions, ab_tests and
    ab_test_variants exactly, row for row, nothing more and nothing less; orchestration_sessions
    has every row it had, byte for byte, and as its only new rows the sessions the rehearsal
    created through templates (they dual-wrote their legacy text). And the downgrade itself
    removed exactly the rows the new system had written and changed nothing else, the new
    sessions included (fingerprints just before and just after it).
``new_sessions_intact``
    each new session's legacy columns hold exactly the text rendered when it was created
    (sha256 compared in SQL), in its project, under its name.
``upgrade_again``
    forward again.
``restore``, ``restored_intact``
    (not in ``rollback``) the downgrade's archive restored with ``orch-migrate restore``'s
    library function, then every row it held (templates, versions, labels, audit events, A/B
    tests of templates, sessions' links...) compared, every column's text, with the same rows
    just before the downgrade. The archive is deleted once they round-trip; otherwise it is kept
    and the report says where.
``backfill_again``, ``verify_again``
    the downgrade dropped the backfill's references, so the backfill links them anew.
``return_to_start``, ``legacy_intact_at_end``
    back down to the starting revision if it was below head (discarding the rehearsal's own
    templates again); the legacy tables against the baseline and the new sessions again.

A step that fails because the database cancelled a statement says so (``stopped_by``
``statement_timeout``, naming ``PROMPT_TOOL_STATEMENT_TIMEOUT_MS``; ``lock_timeout`` likewise):
a timeout is not a difference.

Modes:

- in place (default): real writes on a database meant for rehearsal; it ends at its starting
  revision with the rehearsal's sessions in it. Refused when the downgrade would drop rows the
  rehearsal did not make (an already migrated database with references, flags, runs...):
  rehearse on a copy (``scratch``) or in a transaction (``rollback``) instead.
- ``rollback``: everything runs in one transaction on one connection and is rolled back; the
  last step (``rolled_back_exactly``) proves the database is as it was: revision, tables and
  columns, row count of every table, legacy fingerprint. PostgreSQL's DDL is transactional;
  SQLite's is too once the driver's own transaction handling is switched off for this connection
  (pysqlite otherwise commits DDL on its own), which is what happens here.
- ``scratch``: the source is copied into ``scratch`` (an empty database of the same kind), then
  the rehearsal runs there; the source is only read, in one read-only snapshot.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    Connection,
    Engine,
    MetaData,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from prompt_tool.compat.writes import CreatedSession, create_session
from prompt_tool.core import content_hash
from prompt_tool.core.errors import PermissionDenied, TemplateNotFound
from prompt_tool.db import schema
from prompt_tool.db.bulk_io import copy_table, dialect_io, quoted
from prompt_tool.db.dialect import (
    database_key,
    dialect_of,
    refresh_statistics,
    set_local_timeouts,
    sha256_hex,
)
from prompt_tool.db.engine import (
    Connectable,
    begin,
    check_connection,
    connect,
    make_engine,
    transactional_ddl,
)
from prompt_tool.db.legacy import LEGACY_COLUMNS, LEGACY_TABLES
from prompt_tool.db.models import (
    OrchestrationSession,
    PermissionRole,
    Project,
    PromptRole,
    Scope,
)
from prompt_tool.db.revisions import BASELINE
from prompt_tool.db.url import normalize_url, redact
from prompt_tool.errors import InvalidInputError, PromptToolError, SchemaError
from prompt_tool.migrate.backfill import BackfillOptions, backfill
from prompt_tool.migrate.fingerprint import (
    TableFingerprint,
    changed_tables,
    compare_table,
    fingerprint_legacy_tables,
    fingerprint_rows,
    fingerprint_table,
)
from prompt_tool.migrate.restore import restore
from prompt_tool.migrate.retract import DISCARD_OPTION, DISCARD_VALUE, KEPT_ROWS
from prompt_tool.migrate.verify import VerifyOptions, verify
from prompt_tool.settings import Settings, get_settings
from prompt_tool.templates import TemplateAddress, TemplateManager

__all__ = [
    "ACTOR",
    "ERROR",
    "LOCK_TIMEOUT",
    "STATEMENT_TIMEOUT",
    "TEMPLATE_SOURCES",
    "RehearsalRefusedError",
    "RehearsalReport",
    "RehearsalStep",
    "copy_database",
    "rehearse",
]

ACTOR = "orch-migrate rehearse"
# What the rehearsal's sessions are made from: variables, a loop, raw blocks, CRLF, unicode, so
# the dual write is checked on text that is easy to get wrong.
TEMPLATE_SOURCES: dict[PromptRole, str] = {
    PromptRole.SYSTEM: (
        "You are the rehearsal assistant of {{ project }}.\r\n"
        "Keep {% raw %}{{ braces }}{% endraw %} as written: ünïcödé — 日本語 🚀\n"
    ),
    PromptRole.PLANNER: (
        "Plan for {{ topic }}:\n{% for step in steps %}{{ loop.index }}. {{ step }}\n{% endfor %}"
    ),
    PromptRole.SYNTHESIS: "Combine what was found about {{ topic }} into one answer.{# note #}",
}
_TEMPLATE_NAMES = {role: f"rehearse/{role.value}" for role in PromptRole}
_SESSIONS = OrchestrationSession.__table__
_COPY_BATCH_ROWS = 1_000
_MAX_SHOWN = 5

# At head, the legacy tables also hold rows the new system wrote (what the downgrade of 0002
# takes back out, see prompt_tool.migrate.retract): these conditions keep only the others, the
# legacy rows proper. NULL-safe (NOT EXISTS): a legacy A/B test without a prompt is legacy.
_TEMPLATE = "t.prompt_type = 'orchestration_template'"
_LEGACY_ROWS: Mapping[str, str] = {
    "prompts": "prompts.prompt_type <> 'orchestration_template'",
    "prompt_versions": (
        "NOT EXISTS (SELECT 1 FROM prompts t"
        f" WHERE t.id = prompt_versions.prompt_id AND {_TEMPLATE})"
    ),
    "ab_tests": (
        f"NOT EXISTS (SELECT 1 FROM prompts t WHERE t.id = ab_tests.prompt_id AND {_TEMPLATE})"
    ),
    "ab_test_variants": (
        "NOT EXISTS (SELECT 1 FROM ab_tests a JOIN prompts t ON t.id = a.prompt_id"
        f" WHERE a.id = ab_test_variants.ab_test_id AND {_TEMPLATE})"
        " AND NOT EXISTS (SELECT 1 FROM prompt_versions v JOIN prompts t ON t.id = v.prompt_id"
        f" WHERE v.id = ab_test_variants.prompt_version_id AND {_TEMPLATE})"
    ),
}
# What a backfill (or a restore) writes, analysed before the next step reads it.
_WRITTEN_TABLES = ("session_prompt_refs", "prompts", "prompt_versions", "orchestration_sessions")
# What the downgrade's archive holds, as a person reads it.
_KEPT_WHAT = {
    "prompts": "templates",
    "prompt_versions": "versions",
    "template_labels": "labels",
    "template_events": "audit events",
    "session_prompt_refs": "sessions' links",
    "ab_tests": "A/B tests",
    "ab_test_variants": "A/B variants",
    "ab_assignments": "A/B assignments",
    "orchestration_steps": "step records",
}
# Why a step stopped the rehearsal (RehearsalStep.stopped_by).
STATEMENT_TIMEOUT = "statement_timeout"
LOCK_TIMEOUT = "lock_timeout"
ERROR = "error"


class RehearsalRefusedError(InvalidInputError):
    """The rehearsal cannot run as asked; nothing was written anywhere."""


@dataclass
class RehearsalStep:
    name: str
    ok: bool
    duration_s: float
    details: str
    differences: list[str] = field(default_factory=list)
    # Why the step stopped the rehearsal, when it did not reach a verdict: "statement_timeout",
    # "lock_timeout" or "error" (details says which, in one line). None: it ran to its end.
    stopped_by: str | None = None


@dataclass
class RehearsalReport:
    database: str
    source: str | None
    rollback: bool
    start_revision: str | None
    end_revision: str | None
    head: str
    sessions_created: list[int] = field(default_factory=list)
    steps: list[RehearsalStep] = field(default_factory=list)
    passed: bool = False
    elapsed_s: float = 0.0
    # The downgrade's archive, when the rehearsal stopped before it round-tripped: what it holds
    # is not in the database (`orch-migrate restore --from` it after `db upgrade`).
    archive: str | None = None

    def failures(self) -> list[RehearsalStep]:
        return [step for step in self.steps if not step.ok]


@dataclass(frozen=True, slots=True)
class _Outcome:
    ok: bool
    details: str
    differences: Sequence[str] = ()
    stopped_by: str | None = None


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What ``rollback`` must leave exactly as it found it."""

    revision: str | None
    columns: dict[str, list[str]]
    rows: dict[str, int]
    legacy: dict[str, tuple[int, str]]


# --- reading the database ------------------------------------------------------------------


def _revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _head() -> str:
    return next(r.revision for r in schema.history() if r.is_head)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _legacy_digests(connection: Connection) -> dict[str, tuple[int, str]]:
    """(rows, sha256) of each whole legacy table."""
    digests: dict[str, tuple[int, str]] = {}
    for name in LEGACY_COLUMNS:
        found = fingerprint_table(connection, name)
        digests[name] = (found.rows, found.sha256)
    return digests


def _at_head_columns(connection: Connection) -> bool:
    """Whether the legacy tables carry the new system's rows (revision 0002's columns)."""
    return any(c["name"] == "prompt_type" for c in inspect(connection).get_columns("prompts"))


def _legacy_rows(connection: Connection) -> dict[str, TableFingerprint]:
    """Each legacy table's fingerprint, without the rows the new system wrote into it."""
    where = _LEGACY_ROWS if _at_head_columns(connection) else {}
    return {
        name: fingerprint_table(connection, name, where=where.get(name)) for name in LEGACY_TABLES
    }


def _whole(fingerprints: Mapping[str, TableFingerprint]) -> dict[str, tuple[int, str]]:
    return {name: (entry.rows, entry.sha256) for name, entry in fingerprints.items()}


def _rows_written_by_the_new_system(connection: Connection) -> dict[str, int]:
    """At head: per legacy table, the rows the baseline sets aside."""
    return {
        name: int(
            connection.execute(
                text(f"SELECT count(*) FROM {quoted(name)} WHERE NOT ({condition})")
            ).scalar_one()
        )
        for name, condition in _LEGACY_ROWS.items()
    }


def _kept_rows(connection: Connection) -> dict[str, TableFingerprint]:
    """Every column of the rows the downgrade archives (what people made), per table."""
    return {
        name: fingerprint_rows(connection, name, where=condition)
        for name, condition in KEPT_ROWS.items()
        if name in _KEPT_WHAT
    }


def _snapshot(
    connection: Connection, legacy: dict[str, tuple[int, str]] | None = None
) -> _Snapshot:
    """``legacy``: the whole legacy tables' digests, when already read in this transaction."""
    inspector = inspect(connection)
    names = sorted(inspector.get_table_names())
    rows = {
        name: int(connection.execute(text(f"SELECT count(*) FROM {quoted(name)}")).scalar_one())
        for name in names
    }
    return _Snapshot(
        revision=_revision(connection),
        columns={name: sorted(c["name"] for c in inspector.get_columns(name)) for name in names},
        rows=rows,
        legacy=_legacy_digests(connection) if legacy is None else legacy,
    )


def _snapshot_differences(before: _Snapshot, after: _Snapshot) -> list[str]:
    differences = []
    if before.revision != after.revision:
        differences.append(f"revision: {before.revision} before, {after.revision} after")
    for name in sorted(before.columns.keys() | after.columns.keys()):
        if name not in after.columns:
            differences.append(f"{name}: table gone")
        elif name not in before.columns:
            differences.append(f"{name}: table left behind")
        elif before.columns[name] != after.columns[name]:
            differences.append(f"{name}: columns differ")
        elif before.rows[name] != after.rows[name]:
            differences.append(f"{name}: {before.rows[name]} rows before, {after.rows[name]} after")
    differences += [
        f"{name}: legacy rows differ"
        for name in LEGACY_TABLES
        if before.legacy[name] != after.legacy[name]
    ]
    return differences


# --- why a step stopped -----------------------------------------------------------------------


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error, what it was raised from and what it was raised while handling, recursively
    (a statement timeout is often the context of the error that stopped a step: the next
    statement of the aborted transaction fails too)."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]


def _stopped_by(error: BaseException) -> str:
    for link in _chain(error):
        origin = link.orig if isinstance(link, DBAPIError) else link
        state = getattr(origin, "sqlstate", None)
        if state == "57014" and "user request" not in str(origin):  # query_canceled
            return STATEMENT_TIMEOUT
        if state == "55P03":  # lock_not_available
            return LOCK_TIMEOUT
    return ERROR


def _stopped(error: BaseException, settings: Settings) -> _Outcome:
    """A step that raised: one line saying why, and that the rehearsal stopped there."""
    kind = _stopped_by(error)
    if kind == STATEMENT_TIMEOUT:
        details = (
            f"timed out: the database cancelled a statement that ran longer than "
            f"PROMPT_TOOL_STATEMENT_TIMEOUT_MS ({settings.migration_statement_timeout_ms:,} ms); "
            "the rehearsal stopped here: raise the setting for the rehearsal, or run it when the "
            "database is less busy"
        )
    elif kind == LOCK_TIMEOUT:
        details = (
            f"timed out waiting for a lock: another transaction held one longer than "
            f"PROMPT_TOOL_LOCK_TIMEOUT_MS ({settings.migration_lock_timeout_ms:,} ms); the "
            "rehearsal stopped here: run it again when that transaction ends"
        )
    else:
        details = f"{type(error).__name__}: {_one_line(error)} (the rehearsal stopped here)"
    return _Outcome(False, details, stopped_by=kind)


# --- the database the rehearsal runs on -----------------------------------------------------


class _Target:
    """The database being rehearsed on: its engine, and in ``rollback`` the one connection."""

    def __init__(self, url: str, engine: Engine, connection: Connection | None) -> None:
        self.url = url
        self.engine = engine
        self.connection = connection

    @property
    def db(self) -> Connectable:
        return self.connection if self.connection is not None else self.engine

    def upgrade(self) -> str | None:
        if self.connection is not None:
            return schema.migrate_on(self.connection, "upgrade", schema.HEAD)
        state = schema.upgrade(self.url)
        # No pooled connection keeps statements prepared against the schema before.
        self.engine.dispose()
        return state.current

    def downgrade(self, revision: str, archive: Path | None = None) -> schema.SchemaState | None:
        """Down to ``revision``: what people made goes to ``archive``, else is discarded (in
        ``rollback``, where no archive can be taken, it is rolled back with the rest anyway).
        The schema's state (``None`` in ``rollback``: the revision is read afterwards)."""
        if self.connection is not None:
            schema.migrate_on(
                self.connection, "downgrade", revision, {DISCARD_OPTION: DISCARD_VALUE}
            )
            return None
        state = schema.downgrade(
            self.url, revision, archive=archive, discard_user_templates=archive is None
        )
        self.engine.dispose()
        return state

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        with connect(self.db) as connection:
            yield connection

    @contextmanager
    def unit(self) -> Iterator[Connection]:
        with begin(self.db) as connection:
            yield connection


# --- the journey ------------------------------------------------------------------------------


def _ensure_templates(manager: TemplateManager, slugs: Sequence[str]) -> tuple[str, int]:
    """The rehearsal's templates: global ones as the bootstrap admin, else custom ones."""
    try:
        manager.grant(ACTOR, ACTOR, PermissionRole.ADMIN.value, None)
    except PermissionDenied:
        scope = Scope.CUSTOM
        addresses = [
            (TemplateAddress(_TEMPLATE_NAMES[role], scope, project=slug, owner=ACTOR), source)
            for slug in slugs
            for role, source in TEMPLATE_SOURCES.items()
        ]
    else:
        scope = Scope.GLOBAL
        addresses = [
            (TemplateAddress(_TEMPLATE_NAMES[role], scope), source)
            for role, source in TEMPLATE_SOURCES.items()
        ]
    made = 0
    for address, source in addresses:
        try:
            manager.show(address)
        except TemplateNotFound:
            manager.create(
                address, source, actor=ACTOR, description="made by the rollback rehearsal"
            )
            made += 1
    return scope.value, made


def _counts(found: Mapping[str, TableFingerprint], what: Mapping[str, str]) -> str:
    shown = [
        f"{entry.rows:,} {what.get(name, name)}" for name, entry in found.items() if entry.rows
    ]
    return ", ".join(shown) or "nothing"


class _Journey:
    def __init__(
        self,
        target: _Target,
        report: RehearsalReport,
        settings: Settings,
        sessions_to_create: int,
        after_downgrade: Callable[[Connection], None] | None,
    ) -> None:
        self.target = target
        self.report = report
        self.settings = settings
        self.sessions_to_create = sessions_to_create
        self.after_downgrade = after_downgrade
        self.stopped = False
        self.head = report.head
        self.start: str | None = None
        # The legacy tables before the migration wrote any row into them.
        self.baseline: dict[str, TableFingerprint] = {}
        self.snapshot: _Snapshot | None = None
        self.before_downgrade: dict[str, TableFingerprint] = {}
        self.kept_before: dict[str, TableFingerprint] = {}
        self.archive_root: Path | None = None
        self.archive: Path | None = None
        self.round_tripped = False
        self.created: list[CreatedSession] = []

    @property
    def archiving(self) -> bool:
        """In place and on a scratch copy the downgrade archives what people made; a rolled-back
        rehearsal discards it (its rows are never committed, and are rolled back anyway)."""
        return self.target.connection is None

    # --- bookkeeping ---

    def step(self, name: str, work: Callable[[], _Outcome]) -> None:
        if self.stopped:
            return
        started = time.perf_counter()
        try:
            outcome = work()
        except (PromptToolError, SQLAlchemyError) as error:
            self.stopped = True
            outcome = _stopped(error, self.settings)
        self.report.steps.append(
            RehearsalStep(
                name,
                outcome.ok,
                round(time.perf_counter() - started, 3),
                outcome.details,
                list(outcome.differences),
                outcome.stopped_by,
            )
        )

    def _manager(self) -> TemplateManager:
        # The rehearsal never touches a shared cache: its templates may be rolled back.
        return TemplateManager(self.target.db, settings=self.settings.with_(redis_url=None))

    def _refresh_statistics(self) -> None:
        """Inside the rehearsal (a savepoint in ``rollback``): the next step is planned for the
        rows just written, not for the empty tables the upgrade made."""
        with self.target.unit() as connection:
            refresh_statistics(connection, _WRITTEN_TABLES)

    # --- steps ---

    def fingerprint(self) -> _Outcome:
        with self.target.reading() as connection:
            self.start = _revision(connection)
            self.baseline = _legacy_rows(connection)
            at_head = _at_head_columns(connection)
            if self.target.connection is not None:
                # At 0001 the baseline is every legacy row: the same digests, not read twice.
                whole = None if at_head else _whole(self.baseline)
                self.snapshot = _snapshot(connection, whole)
            written = _rows_written_by_the_new_system(connection) if at_head else {}
        self.report.start_revision = self.start
        rows = ", ".join(f"{name} {entry.rows}" for name, entry in self.baseline.items())
        aside = ""
        if at_head:
            aside = "; set aside, written by the new system: " + (
                ", ".join(f"{name} {rows}" for name, rows in written.items() if rows) or "none"
            )
        return _Outcome(True, f"at revision {self.start}; legacy rows: {rows}{aside}")

    def upgrade(self) -> _Outcome:
        with self.target.reading() as connection:
            before = _revision(connection)
        if before == self.head:
            return _Outcome(True, f"already at head {self.head}")
        return _Outcome(True, f"{before} -> {self.target.upgrade()}")

    def run_backfill(self) -> _Outcome:
        summary = backfill(self.target.db, BackfillOptions(), settings=self.settings)
        self._refresh_statistics()
        return _Outcome(True, summary.describe())

    def run_verify(self) -> _Outcome:
        report = verify(self.target.db, VerifyOptions(), manager=self._manager())
        totals = report.totals()
        differences = [
            f"project {p.project}: {p.mismatched} mismatched, {p.unmigrated} unmigrated, "
            f"{p.stale} stale, {p.render_errors} render errors"
            for p in report.projects
            if not p.passed(report.allow_unmigrated)
        ] + [
            f"session {m.session_id} {m.role} (project {m.project}): {m.kind}"
            for m in report.mismatches
        ]
        return _Outcome(
            report.passed,
            f"{'passed' if report.passed else 'FAILED'}: {totals.checked} texts checked, "
            f"{totals.matched} matched, {totals.mismatched} mismatched, {totals.unmigrated} "
            f"unmigrated, {totals.stale} stale, {totals.render_errors} render errors",
            differences,
        )

    def create_sessions(self) -> _Outcome:
        if self.sessions_to_create == 0:
            return _Outcome(True, "none asked for")
        with self.target.reading() as connection:
            slugs = list(
                connection.execute(
                    select(Project.slug).order_by(Project.id).limit(self.sessions_to_create)
                ).scalars()
            )
        if not slugs:
            return _Outcome(True, "no project to create sessions in: skipped")
        manager = self._manager()
        scope, made = _ensure_templates(manager, slugs)
        for number in range(self.sessions_to_create):
            slug = slugs[number % len(slugs)]
            self.created.append(
                create_session(
                    manager,
                    slug,
                    {role: name for role, name in _TEMPLATE_NAMES.items()},
                    {"project": slug, "topic": "the rollback", "steps": ["read", "plan", "answer"]},
                    name=f"rehearse-{number + 1}",
                    user=ACTOR,
                )
            )
        self.report.sessions_created = [c.session_id for c in self.created]
        used = sorted({c.project for c in self.created})
        return _Outcome(
            True,
            f"{len(self.created)} sessions (ids "
            f"{', '.join(map(str, self.report.sessions_created))}) in {', '.join(used)} "
            f"through {scope} templates rehearse/*; {made} templates made",
        )

    def downgrade(self) -> _Outcome:
        with self.target.reading() as connection:
            before = _revision(connection)
            self.before_downgrade = _legacy_rows(connection)
            if self.archiving:
                self.kept_before = _kept_rows(connection)
        if self.archiving:
            self.archive_root = Path(tempfile.mkdtemp(prefix="prompt-tool-rehearsal-"))
            self.archive = self.archive_root / "archive"
        # Below the expand step: each revision above it comes off first (0003, the quarantine).
        state = self.target.downgrade(BASELINE, self.archive)
        if self.after_downgrade is not None:
            with self.target.unit() as connection:
                self.after_downgrade(connection)
        with self.target.reading() as connection:
            after = _revision(connection)
        if state is None:
            kept = "what people made discarded (rolled back with everything else anyway)"
        else:
            kept = (
                "what people made archived in a temporary directory "
                f"({_counts(self.kept_before, _KEPT_WHAT)})"
            )
        removed = ""
        if state is not None and state.removed:
            removed = "; removed: " + ", ".join(
                f"{name} {rows:,}" for name, rows in state.removed.items()
            )
        return _Outcome(True, f"{before} -> {after}; {kept}{removed}")

    def _against_baseline(
        self, connection: Connection
    ) -> tuple[list[str], dict[str, TableFingerprint]]:
        """Every legacy table against the baseline: exactly as it was, but for the sessions
        the rehearsal created through templates (the only rows allowed to be new). Returns the
        differences and the legacy rows now (as :func:`_legacy_rows`, from the same pass)."""
        where = _LEGACY_ROWS if _at_head_columns(connection) else {}
        differences = []
        now: dict[str, TableFingerprint] = {}
        for name in LEGACY_TABLES:
            saved = self.baseline[name]
            compared = compare_table(connection, saved, where=where.get(name))
            now[name] = compared.now
            then = compared.then
            assert then is not None  # the baseline records each table's highest id
            if compared.changed:
                differences.append(
                    f"{name}: rows there at the start changed or vanished ({saved.rows} rows "
                    f"then, {then.rows} of them now)"
                )
            if name != "orchestration_sessions" and compared.added:
                differences.append(
                    f"{name}: {compared.added} rows more than at the start (only sessions "
                    "created through templates may be new)"
                )
        bound = self.baseline["orchestration_sessions"].max_id or 0
        new_ids = set(
            connection.execute(select(_SESSIONS.c.id).where(_SESSIONS.c.id > bound)).scalars()
        )
        created = {c.session_id for c in self.created}
        if new_ids != created:
            differences.append(
                "orchestration_sessions: the new sessions are "
                f"{sorted(new_ids)[:_MAX_SHOWN]}, expected those created through templates "
                f"{sorted(created)[:_MAX_SHOWN]}"
            )
        return differences, now

    def legacy_intact(self) -> _Outcome:
        with self.target.reading() as connection:
            differences, after = self._against_baseline(connection)
        differences += [
            f"{name}: the downgrade changed rows it had to keep ({kept.rows} rows before it, "
            f"{after[name].rows} after)"
            for name, kept in self.before_downgrade.items()
            if (after[name].rows, after[name].sha256) != (kept.rows, kept.sha256)
        ]
        return self._verdict(
            differences,
            "every legacy table as at the start, row for row; the only new rows are the "
            f"{len(self.created)} sessions created through templates",
        )

    def new_sessions_intact(self) -> _Outcome:
        if not self.created:
            return _Outcome(True, "no new sessions to check")
        by_id = {c.session_id: c for c in self.created}
        with self.target.reading() as connection:
            project_ids = {
                slug: project_id
                for slug, project_id in connection.execute(
                    select(Project.slug, Project.id).where(
                        Project.slug.in_({c.project for c in self.created})
                    )
                )
            }
            rows = connection.execute(
                select(
                    _SESSIONS.c.id,
                    _SESSIONS.c.project_id,
                    _SESSIONS.c.name,
                    *(sha256_hex(_SESSIONS.c[role.legacy_column]) for role in PromptRole),
                ).where(_SESSIONS.c.id.in_(list(by_id)))
            ).all()
        differences = [f"session {sid}: gone" for sid in sorted(set(by_id) - {r[0] for r in rows})]
        for session_id, project_id, name, *hashes in rows:
            created = by_id[session_id]
            if project_id != project_ids.get(created.project) or not name.startswith("rehearse-"):
                differences.append(f"session {session_id}: project or name changed")
            for role, stored in zip(PromptRole, hashes, strict=True):
                wanted = created.texts.get(role.value)
                if stored != (None if wanted is None else content_hash(wanted)):
                    differences.append(
                        f"session {session_id}: {role.legacy_column} is not the rendered text"
                    )
        return self._verdict(
            differences, f"{len(rows)} new sessions hold their rendered text in the legacy columns"
        )

    def restore_archive(self) -> _Outcome:
        assert self.archive is not None
        result = restore(self.target.db, self.archive)
        inserted = ", ".join(
            f"{t.inserted:,} {_KEPT_WHAT.get(t.table, t.table)}"
            for t in result.tables
            if t.inserted
        )
        return _Outcome(
            True,
            f"{result.inserted:,} rows back from the downgrade's archive: {inserted or 'none'}",
        )

    def restored_intact(self) -> _Outcome:
        with self.target.reading() as connection:
            now = _kept_rows(connection)
        differences = [
            f"{name}: {_KEPT_WHAT[name]} differ from before the downgrade ({then.rows} rows then, "
            f"{now[name].rows} now)"
            for name, then in self.kept_before.items()
            if (now[name].rows, now[name].sha256) != (then.rows, then.sha256)
        ]
        self.round_tripped = not differences
        return self._verdict(
            differences,
            "every column of what people made as before the downgrade: "
            + _counts(self.kept_before, _KEPT_WHAT),
        )

    def return_to_start(self, start: str) -> _Outcome:
        with self.target.reading() as connection:
            before = _revision(connection)
        # What people made is the rehearsal's own here (in place, anything else is refused
        # before the rehearsal starts; a scratch database is a copy): discarded, as at the start.
        state = self.target.downgrade(start)
        after = None if state is None else state.current
        return _Outcome(True, f"{before} -> {after}; the rehearsal's templates discarded")

    def legacy_intact_at_end(self) -> _Outcome:
        with self.target.reading() as connection:
            differences, _ = self._against_baseline(connection)
        sessions = self.new_sessions_intact()
        differences += list(sessions.differences)
        return self._verdict(
            differences,
            "every legacy table as at the start; the only new rows are the sessions created "
            "through templates, holding their rendered text",
        )

    @staticmethod
    def _verdict(differences: Sequence[str], good: str) -> _Outcome:
        if not differences:
            return _Outcome(True, good)
        tables = sorted({d.split(":", 1)[0] for d in differences})
        return _Outcome(False, f"DIFFERENT: {', '.join(tables)}", differences)

    # --- the whole ---

    def run(self) -> None:
        try:
            self._run()
        finally:
            self._settle_archive()

    def _run(self) -> None:
        self.step("fingerprint", self.fingerprint)
        self.step("upgrade", self.upgrade)
        self.step("backfill", self.run_backfill)
        self.step("verify", self.run_verify)
        self.step("create_sessions", self.create_sessions)
        self.step("downgrade", self.downgrade)
        self.step("legacy_intact", self.legacy_intact)
        self.step("new_sessions_intact", self.new_sessions_intact)
        self.step("upgrade_again", self.upgrade)
        if self.archiving:
            self.step("restore", self.restore_archive)
            self.step("restored_intact", self.restored_intact)
        self.step("backfill_again", self.run_backfill)
        self.step("verify_again", self.run_verify)
        if self.target.connection is None:
            if self.start is not None and self.start != self.head:
                start = self.start
                self.step("return_to_start", lambda: self.return_to_start(start))
            self.step("legacy_intact_at_end", self.legacy_intact_at_end)

    def _settle_archive(self) -> None:
        """Delete the downgrade's archive once what it held is back, byte for byte; else keep
        it, and say where: it may hold rows the database no longer has."""
        if self.archive_root is None:
            return
        if self.round_tripped or self.archive is None or not self.archive.exists():
            shutil.rmtree(self.archive_root, ignore_errors=True)
        else:
            self.report.archive = str(self.archive)


# --- copying into a scratch database ----------------------------------------------------------


def copy_database(source_url: str, scratch_url: str) -> dict[str, int]:
    """Copy every table of ``source_url`` into the empty ``scratch_url``; returns rows per table.

    The scratch database is first brought to the source's revision with the migration scripts,
    then the rows are copied in foreign-key order, in batches, with their ids, inside one
    transaction (a failed copy leaves the scratch database at that revision with no rows). The
    source is only read, in one read-only snapshot. Both must be the same kind of database: a
    rehearsal is about that database's DDL.
    """
    source = make_engine(source_url)
    scratch = make_engine(scratch_url)
    try:
        check_connection(source)
        check_connection(scratch)
        _check_copy(source, scratch, source_url, scratch_url)
        with source.connect() as connection:
            revision = _revision(connection)
        schema.upgrade(scratch_url, str(revision))
        scratch.dispose()
        copied: dict[str, int] = {}
        with source.connect() as reader, dialect_io(reader).source_snapshot(reader):
            metadata = MetaData()
            metadata.reflect(reader)
            with scratch.begin() as writer:
                for source_table in metadata.sorted_tables:
                    if source_table.name == "alembic_version":
                        continue
                    copied[source_table.name] = _copy_table(reader, writer, source_table)
    finally:
        source.dispose()
        scratch.dispose()
    return copied


def _check_copy(source: Engine, scratch: Engine, source_url: str, scratch_url: str) -> None:
    if dialect_of(source) != dialect_of(scratch):
        raise RehearsalRefusedError(
            f"--scratch must be the same kind of database as the source ({dialect_of(source)}, "
            f"not {dialect_of(scratch)}): the rehearsal is about that database's DDL"
        )
    if database_key(source) == database_key(scratch):
        raise RehearsalRefusedError(
            "--scratch names the source database itself; give an empty database to copy into"
        )
    with source.connect() as connection:
        tables = inspect(connection).get_table_names()
        revision = _revision(connection)
    if "projects" not in tables or revision is None:
        raise RehearsalRefusedError(
            f"{redact(source_url)} has no legacy tables under Alembic to rehearse on; "
            "`orch-migrate db stamp 0001` adopts a legacy deployment"
        )
    with scratch.connect() as connection:
        present = inspect(connection).get_table_names()
    if present:
        raise RehearsalRefusedError(
            f"the scratch database {redact(scratch_url)} is not empty ({len(present)} tables); "
            "give an empty one: the rehearsal copies the source into it"
        )


def _copy_table(reader: Connection, writer: Connection, source_table: Any) -> int:
    name = source_table.name
    columns = [c.name for c in source_table.columns]
    target_columns = {c["name"] for c in inspect(writer).get_columns(name)}
    if not set(columns) <= target_columns:
        raise SchemaError(
            f"table {name} of the source has columns the migration scripts do not make "
            f"({', '.join(sorted(set(columns) - target_columns))}); the source has drifted from "
            "its revision, so a copy would not be the same database"
        )
    order = [c.name for c in source_table.primary_key.columns] or columns
    return copy_table(reader, writer, name, columns, order, batch_rows=_COPY_BATCH_ROWS)


# --- the public face --------------------------------------------------------------------------


def _refuse_in_place_data_loss(engine: Engine, url: str) -> None:
    """In place, the downgrade drops the tables above the legacy schema: they must hold nothing
    the rehearsal did not make."""
    with engine.connect() as connection:
        names = [
            name
            for name in inspect(connection).get_table_names()
            if name not in LEGACY_TABLES and name != "alembic_version"
        ]
        holding = [
            name
            for name in sorted(names)
            if connection.execute(text(f"SELECT count(*) FROM {quoted(name)}")).scalar_one()
        ]
    if holding:
        raise RehearsalRefusedError(
            f"rehearsing in place on {redact(url)} would drop the rows of "
            f"{', '.join(holding)} with the downgrade; rehearse on a copy (--scratch URL) or in "
            "one rolled-back transaction (--rollback)"
        )


def _analyse_legacy_tables(engine: Engine, settings: Settings) -> bool:
    """``ANALYZE`` the legacy tables, committed, bounded by the lock and statement timeouts;
    False when it is not allowed or gives up (the database keeps the statistics it had)."""
    with engine.begin() as connection:
        set_local_timeouts(
            connection, settings.migration_lock_timeout_ms, settings.migration_statement_timeout_ms
        )
        return refresh_statistics(connection, LEGACY_TABLES)


def _refresh_statistics_first(engine: Engine, settings: Settings) -> RehearsalStep:
    """Before the rehearsal starts (see the module): the planner sees the rows as they are now,
    not what an earlier rolled-back rehearsal left in its statistics. Skipped, not failed, when
    the tables cannot be analysed."""
    started = time.perf_counter()
    done = _analyse_legacy_tables(engine, settings)
    return RehearsalStep(
        "refresh_statistics",
        True,
        round(time.perf_counter() - started, 3),
        "planner statistics of the legacy tables refreshed (ANALYZE): the rehearsal is planned "
        "for the rows as they are now"
        if done
        else "skipped: the legacy tables could not be analysed (no privilege, or a lock held "
        "elsewhere); the rehearsal runs on the statistics the database has",
    )


def _check_rehearsable(engine: Engine, url: str) -> None:
    check_connection(engine)
    with engine.connect() as connection:
        tables = inspect(connection).get_table_names()
        revision = _revision(connection)
    if "projects" not in tables:
        raise RehearsalRefusedError(
            f"{redact(url)} has no legacy tables to rehearse on; load a deployment (or "
            "`orch-migrate sample-data` on a scratch database) first"
        )
    if revision is None:
        raise RehearsalRefusedError(
            f"{redact(url)} has the legacy tables but is not under Alembic; adopt it with "
            "`orch-migrate db stamp 0001` first"
        )


def rehearse(
    url: str,
    *,
    rollback: bool = False,
    scratch: str | None = None,
    sessions_to_create: int = 3,
    after_downgrade: Callable[[Connection], None] | None = None,
    settings: Settings | None = None,
) -> RehearsalReport:
    """Rehearse upgrade, backfill, verify, dual writes, downgrade and back. See the module.

    ``scratch``: copy ``url`` into this empty database and rehearse there (``url`` is only read).
    ``rollback``: run everything in one transaction and roll it back. ``after_downgrade`` runs on
    the rehearsal's connection right after the downgrade (tests sabotage the legacy data there).
    Raises :class:`RehearsalRefusedError` before writing anything when it cannot run as asked;
    any difference found is in the report (``passed`` False), not raised.
    """
    if sessions_to_create < 0:
        raise InvalidInputError(f"sessions to create {sessions_to_create} must be 0 or more")
    settings = settings or get_settings()
    started = time.perf_counter()
    head = _head()
    copy_step: RehearsalStep | None = None
    if scratch is not None:
        normalize_url(scratch)
        copy_started = time.perf_counter()
        copied = copy_database(url, scratch)
        unequal = changed_tables(fingerprint_legacy_tables(url), fingerprint_legacy_tables(scratch))
        copy_step = RehearsalStep(
            "copy_to_scratch",
            not unequal,
            round(time.perf_counter() - copy_started, 3),
            f"{sum(copied.values())} rows of {len(copied)} tables copied from {redact(url)}; "
            + ("legacy fingerprint as the source's" if not unequal else "NOT the same legacy rows"),
            [f"{name}: differs from the source" for name in unequal],
        )
    target_url = scratch or url
    report = RehearsalReport(
        database=redact(target_url),
        source=redact(url) if scratch is not None else None,
        rollback=rollback,
        start_revision=None,
        end_revision=None,
        head=head,
        steps=[copy_step] if copy_step else [],
    )
    engine = make_engine(target_url)
    try:
        _check_rehearsable(engine, target_url)
        if scratch is None and not rollback:
            _refuse_in_place_data_loss(engine, target_url)
        report.steps.append(_refresh_statistics_first(engine, settings))
        if rollback:
            _run_in_transaction(
                engine, target_url, report, settings, sessions_to_create, after_downgrade
            )
        else:
            journey = _Journey(
                _Target(target_url, engine, None),
                report,
                settings,
                sessions_to_create,
                after_downgrade,
            )
            journey.run()
            with engine.connect() as connection:
                report.end_revision = _revision(connection)
    finally:
        engine.dispose()
    report.passed = bool(report.steps) and all(step.ok for step in report.steps)
    report.elapsed_s = round(time.perf_counter() - started, 3)
    return report


def _run_in_transaction(
    engine: Engine,
    url: str,
    report: RehearsalReport,
    settings: Settings,
    sessions_to_create: int,
    after_downgrade: Callable[[Connection], None] | None,
) -> None:
    transactional_ddl(engine)
    engine.dispose()  # connections made before must not be reused without it
    with engine.connect() as connection:
        transaction = connection.begin()
        journey = _Journey(
            _Target(url, engine, connection), report, settings, sessions_to_create, after_downgrade
        )
        try:
            journey.run()
        finally:
            transaction.rollback()
    before = journey.snapshot
    started = time.perf_counter()
    # The rows are rolled back, the table sizes an ANALYZE inside measured are not (PostgreSQL
    # writes them in place): measured again, so nothing is planned for rows that never were.
    analysed = _analyse_legacy_tables(engine, settings)
    with engine.connect() as connection:
        after = _snapshot(connection)
    report.end_revision = after.revision
    if before is None:
        return
    differences = _snapshot_differences(before, after)
    report.steps.append(
        RehearsalStep(
            "rolled_back_exactly",
            not differences,
            round(time.perf_counter() - started, 3),
            "revision, tables, columns, row counts and legacy fingerprint as at the start"
            + ("; the legacy tables' statistics measured again" if analysed else "")
            if not differences
            else "DIFFERENT after the rollback",
            differences,
        )
    )
