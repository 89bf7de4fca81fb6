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
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import (
    BigInteger,
    Connection,
    Text,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    literal_column,
    select,
    text,
    true,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.exc import DBAPIError

from prompt_tool.core import content_hash, literal_template
from prompt_tool.db.dialect import (
    BulkInsert,
    acquire_advisory_lock,
    backend_pid,
    comma_joined,
    comma_joined_array,
    is_lock_timeout,
    is_retryable,
    one_of,
    refresh_statistics,
    release_advisory_lock,
    sha256_hex,
    stale_statistics,
    unreadable_text,
    wall_clock,
)
from prompt_tool.db.engine import Connectable, begin, bounded_waits, connect
from prompt_tool.db.models import (
    MigrationBatch,
    MigrationRun,
    OrchestrationSession,
    Prompt,
    PromptRole,
    PromptType,
    PromptVersion,
    Scope,
    SessionPromptRef,
)
from prompt_tool.db.projects import projects_by_slug
from prompt_tool.db.revision_guard import require_known_revision
from prompt_tool.db.revisions import EXPAND
from prompt_tool.errors import InvalidInputError, LockTimeoutError, PromptToolError
from prompt_tool.migrate import backfill_plan
from prompt_tool.migrate.adoption import adopt_orphaned_imports
from prompt_tool.migrate.lock_waits import lock_wait_error
from prompt_tool.migrate.matching import ExistingTemplateMatcher
from prompt_tool.migrate.runs import RunKind, RunStatus, finish_run, outcome_of, start_run
from prompt_tool.settings import Settings, get_settings
from prompt_tool.templates import TemplateManager

__all__ = [
    "IMPORTED_PREFIX",
    "BackfillBusyError",
    "BackfillOptions",
    "BackfillProgress",
    "BackfillSummary",
    "backfill",
    "imported_name",
]

_T = TypeVar("_T")
IMPORTED_PREFIX = "imported/"
SOURCE_BACKFILL = "backfill"
ACTOR = "orch-migrate backfill"
_MIN_BATCH = 50
_ANALYZE_AFTER = 10_000  # references written by a run before it refreshes the statistics
_WRITTEN_TABLES = ("session_prompt_refs", "prompts", "prompt_versions")
_PLANNED_TABLES = ("orchestration_sessions", *_WRITTEN_TABLES)
# Every table a run reads or writes: where a lock that outlasted the retries is looked for.
_TOUCHED_TABLES = (
    "orchestration_sessions",
    "projects",
    *_WRITTEN_TABLES,
    "prompt_labels",
    "migration_runs",
    "migration_batches",
)
BATCH_DONE = "done"
_FIRST_BATCH = 200
# A batch reads at most this many times its size in keys (see _batch_states).
_WINDOW = 8
# Spelled as SQL, not a bound parameter: only then can the planner prove that a query matches
# the partial unique index on (project_id, name) WHERE scope = 'project', also in the generic
# plans psycopg switches to once a statement is prepared.
_IN_PROJECT_SCOPE = Prompt.scope == literal_column("'project'")
_LOCK_NAMESPACE = 0x5054_4246  # "PTBF": keeps our advisory keys apart from the application's
_SESSIONS = OrchestrationSession.__table__
_REFS = SessionPromptRef.__table__


class BackfillBusyError(PromptToolError):
    """Another backfill holds a project's advisory lock."""


def imported_name(role: PromptRole, legacy_hash: str) -> str:
    return f"{IMPORTED_PREFIX}{role.value}/{legacy_hash}"


@dataclass(frozen=True, slots=True)
class BackfillOptions:
    projects: Sequence[str] = ()
    batch_size: int = 1000
    sleep_ms: int = 0
    limit: int | None = None
    dry_run: bool = False
    wait: bool = False
    # Link to an existing template version that renders the legacy text before importing it.
    match_existing: bool = False
    max_retries: int = 5
    # The batch size adapts so one batch's transaction stays near this (see _next_batch_size).
    target_batch_ms: int = 200
    # Processes sharing the run (PostgreSQL; SQLite has one writer and uses one): see _workers.
    workers: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise InvalidInputError("--workers must be at least 1")
        if self.batch_size < 1:
            raise InvalidInputError("--batch-size must be at least 1")
        if self.sleep_ms < 0 or (self.limit is not None and self.limit < 1):
            raise InvalidInputError("--sleep-ms must be >= 0 and --limit >= 1")


@dataclass(frozen=True, slots=True)
class BackfillProgress:
    done: int
    total: int
    batches: int
    elapsed_s: float


@dataclass
class BackfillSummary:
    run_id: int | None
    dry_run: bool
    projects: list[str]
    key_upper_bound: int
    resumed_after: int | None = None
    batches: int = 0
    sessions_scanned: int = 0
    references_created: int = 0
    references_matched: int = 0
    references_relinked: int = 0
    references_removed: int = 0
    references_unchanged: int = 0
    templates_created: int = 0
    templates_adopted: int = 0
    retried: int = 0
    elapsed_s: float = 0.0
    workers: int = 1
    batch_seconds: list[float] = field(default_factory=list, repr=False)
    # Tables analysed before the walk: the planner had no statistics, or stale ones.
    statistics_refreshed: list[str] = field(default_factory=list)
    # Exit codes of --workers processes that died; the run finished their batches itself.
    workers_lost: list[int] = field(default_factory=list)
    # Legacy texts that are not valid UTF-8: left as they are, on the legacy path, not linked.
    unreadable: int = 0
    unreadable_rows: list[str] = field(default_factory=list)  # the first few, named

    @property
    def changed(self) -> bool:
        return bool(
            self.references_created
            or self.references_relinked
            or self.references_removed
            or self.templates_created
            or self.templates_adopted
        )

    def describe(self) -> str:
        refreshed = (
            f"; planner statistics refreshed first ({', '.join(self.statistics_refreshed)})"
            if self.statistics_refreshed
            else ""
        )
        lost = (
            f"; {len(self.workers_lost)} of {self.workers} workers ended early (exit "
            f"{', '.join(map(str, self.workers_lost))}), their batches were finished by this one"
            if self.workers_lost
            else ""
        )
        return self._describe_changes() + self._describe_unreadable() + refreshed + lost

    def _describe_unreadable(self) -> str:
        if not self.unreadable:
            return ""
        shown = ", ".join(self.unreadable_rows)
        more = ", ..." if self.unreadable > len(self.unreadable_rows) else ""
        texts = "legacy text" if self.unreadable == 1 else "legacy texts"
        return (
            f"; {self.unreadable:,} {texts} unreadable (not valid UTF-8), left unchanged on "
            f"the legacy path and not linked: {shown}{more}; fix their bytes and run backfill "
            "again to link them"
        )

    def _describe_changes(self) -> str:
        verb = "would change" if self.dry_run else "changed"
        if not self.changed:
            return (
                f"backfill: nothing to do; {self.sessions_scanned:,} sessions already linked "
                f"({self.batches} batches, {self.elapsed_s:.1f}s)"
            )
        return (
            f"backfill {verb}: {self.references_created:,} references created"
            + (
                f" ({self.references_matched:,} to existing templates)"
                if self.references_matched
                else ""
            )
            + ", "
            f"{self.references_relinked:,} re-linked (stale), {self.references_removed:,} removed, "
            f"{self.templates_created:,} templates imported"
            + (
                f" ({self.templates_adopted:,} left by a downgrade taken back)"
                if self.templates_adopted
                else ""
            )
            + f"; {self.sessions_scanned:,} sessions in "
            f"{self.batches} batches, {self.retried} retries, {self.elapsed_s:.1f}s"
        )


class _RoleState(NamedTuple):
    """One (session, role) of a batch. A tuple: a batch makes thousands of them."""

    session_id: int
    project_id: int
    role: str  # a PromptRole's value
    legacy_hash: str | None  # None: the legacy text is NULL
    linked_hash: str | None  # the reference's legacy_hash, None when no reference
    has_reference: bool
    unreadable: bool = False  # the text's bytes are not valid UTF-8: named, skipped


_ROLES = tuple(role.value for role in PromptRole)


def _lock_key(project_id: int) -> int:
    return (_LOCK_NAMESPACE << 32) | project_id


def _session_filter(project_ids: Sequence[int], scoped: bool) -> Any:
    return _SESSIONS.c.project_id.in_(list(project_ids)) if scoped else true()


def _batch_states(
    connection: Connection,
    after: int,
    upper: int,
    size: int,
    project_ids: Sequence[int],
    scoped: bool,
) -> tuple[list[_RoleState], int]:
    """One batch's sessions: the hash of each legacy text and of what it is linked to now, and
    the key up to which the batch has seen every session of the scope.

    Each legacy text is read and hashed once per batch, here; everything the batch writes
    afterwards is keyed by these hashes.

    Read in windows of at most ``size * _WINDOW`` keys, stepping over windows without a session
    of the scope: a batch then reads one window whatever plan the planner picks. With an open
    range, a never-analysed table gets "every remaining row of the scope, hashed and sorted,
    then LIMIT" for each batch: two projects of 100,000 sessions took 245 s instead of 9.
    """
    window_from = bindparam("window_from", type_=BigInteger)
    window_to = bindparam("window_to", type_=BigInteger)
    query = (
        select(
            _SESSIONS.c.id,
            _SESSIONS.c.project_id,
            *(sha256_hex(_SESSIONS.c[role.legacy_column]) for role in PromptRole),
            *(unreadable_text(_SESSIONS.c[role.legacy_column]) for role in PromptRole),
        )
        .where(
            _SESSIONS.c.id > window_from,
            _SESSIONS.c.id <= window_to,
            _session_filter(project_ids, scoped),
        )
        .order_by(_SESSIONS.c.id)
        .limit(size)
    )
    low = after
    while True:
        high = min(upper, low + size * _WINDOW)
        sessions = connection.execute(query, {"window_from": low, "window_to": high}).all()
        if sessions or high >= upper:
            break
        low = high
    if not sessions:
        return [], upper
    covered_to = sessions[-1][0] if len(sessions) == size else high
    linked = _linked_hashes(connection, after, sessions[-1][0])
    roles = len(_ROLES)
    states = [
        _RoleState(
            session_id,
            project_id,
            role,
            legacy_hash,
            linked.get((session_id, role)),
            (session_id, role) in linked,
            bool(unreadable),
        )
        for session_id, project_id, *values in sessions
        for role, legacy_hash, unreadable in zip(
            _ROLES, values[:roles], values[roles:], strict=True
        )
    ]
    return states, covered_to


def _linked_hashes(connection: Connection, after: int, last: int) -> dict[tuple[int, str], str]:
    """The legacy hash of every reference of the key range (after, last]: one index range scan."""
    rows = connection.execute(
        select(_REFS.c.session_id, _REFS.c.role, _REFS.c.legacy_hash).where(
            _REFS.c.session_id > after, _REFS.c.session_id <= last
        )
    )
    return {(session_id, role): legacy_hash for session_id, role, legacy_hash in rows}


def _linked(session_id: Any, role: PromptRole, column: Any) -> Any:
    """A column of the session's reference for ``role``, as a scalar subquery.

    Scalar subqueries run as primary-key lookups whatever the statistics say; a join here gets
    planned as a scan of the whole (fast-growing, not yet analysed) references table.
    """
    return (
        select(column)
        .where(_REFS.c.session_id == session_id, _REFS.c.role == literal_column(f"'{role.value}'"))
        .scalar_subquery()
    )


def _batch_texts(
    after: int, last: int, project_ids: Sequence[int], scoped: bool, *, needing_link: bool
) -> Any:
    """The batch's non-NULL legacy texts, one row per (session, role), with their hash.

    ``needing_link``: only those without a reference, or whose reference was made for another
    text (stale), which is all a run has to write.
    """
    in_batch = and_(
        _SESSIONS.c.id > after, _SESSIONS.c.id <= last, _session_filter(project_ids, scoped)
    )
    per_role = []
    for role in PromptRole:
        column = _SESSIONS.c[role.legacy_column]
        digest = sha256_hex(column)
        query = select(
            _SESSIONS.c.id.label("session_id"),
            _SESSIONS.c.project_id.label("project_id"),
            literal(role.value).label("role"),
            digest.label("legacy_hash"),
            column.label("legacy_text"),
        ).where(in_batch, column.is_not(None), ~unreadable_text(column))
        if needing_link:
            linked = _linked(_SESSIONS.c.id, role, _REFS.c.legacy_hash)
            query = query.where(linked.is_distinct_from(digest))
        per_role.append(query)
    return union_all(*per_role).subquery()


TextKey = tuple[int, str, str]  # (project id, role, sha256 of the legacy text)
_KNOWN_VERSIONS_CAP = 500_000


class ImportedVersions:
    """The version id of each imported template the run has found or made, by text key.

    An imported template's version 1 never changes, so an id found once stays right for the
    whole run and later batches link to it without asking the database. Capped: memory stays
    flat whatever the number of distinct texts.
    """

    def __init__(self) -> None:
        self._ids: dict[TextKey, int] = {}

    def resolve(self, connection: Connection, keys: set[TextKey]) -> dict[TextKey, int]:
        """The version id of every key that has an imported template (the others are missing).

        Call it before the batch writes any template: what it finds is then committed.
        """
        found = {key: self._ids[key] for key in keys if key in self._ids}
        unknown = keys - found.keys()
        if unknown:
            looked_up = _find_imported(connection, unknown)
            if len(self._ids) + len(looked_up) > _KNOWN_VERSIONS_CAP:
                self._ids.clear()
            self._ids.update(looked_up)
            found.update(looked_up)
        return found


def _imported_version(project_id: Any, name: Any) -> Any:
    """The id of an imported template's version 1, as a scalar subquery.

    Run per key as a lookup in the (project_id, name) unique index, whatever the statistics
    say: the prompts table grows from nothing during a backfill, and a plan made for the empty
    table (a scan, comparing every row with every name) costs tens of milliseconds per batch.
    """
    return (
        select(PromptVersion.id)
        .join(Prompt, Prompt.id == PromptVersion.prompt_id)
        .where(
            Prompt.project_id == project_id,
            _IN_PROJECT_SCOPE,
            Prompt.name == name,
            PromptVersion.version == literal_column("1"),
        )
        .scalar_subquery()
    )


_NAMED_KEYS = (
    func.unnest(
        comma_joined_array("project_ids", BigInteger()), comma_joined_array("names", Text())
    )
    .table_valued("project_id", "name")
    .render_derived()
)
_FIND_IMPORTED_POSTGRESQL = select(
    _NAMED_KEYS.c.project_id,
    _NAMED_KEYS.c.name,
    _imported_version(_NAMED_KEYS.c.project_id, _NAMED_KEYS.c.name),
)


def _find_imported(connection: Connection, keys: set[TextKey]) -> dict[TextKey, int]:
    """Look the imported templates of ``keys`` up by (project, name)."""
    by_name: dict[tuple[int, str], TextKey] = {
        (project_id, imported_name(PromptRole(role), digest)): (project_id, role, digest)
        for project_id, role, digest in keys
    }
    if connection.dialect.name == "postgresql":
        projects, names = zip(*by_name, strict=True)
        rows = connection.execute(
            _FIND_IMPORTED_POSTGRESQL,
            {"project_ids": comma_joined(projects), "names": comma_joined(names)},
        ).all()
    else:  # SQLite plans an IN list as index lookups
        rows = connection.execute(
            select(Prompt.project_id, Prompt.name, PromptVersion.id)
            .join(PromptVersion, PromptVersion.prompt_id == Prompt.id)
            .where(
                _IN_PROJECT_SCOPE,
                tuple_(Prompt.project_id, Prompt.name).in_(list(by_name)),
                PromptVersion.version == literal_column("1"),
            )
        ).all()
    return {
        by_name[(project_id, name)]: version_id
        for project_id, name, version_id in rows
        if version_id is not None and project_id is not None
    }


_IMPORTED_TEMPLATES = BulkInsert(
    Prompt.__table__,
    [("project_id", BigInteger()), ("name", Text()), ("content", Text()), ("content_hash", Text())],
    {
        "category": "imported",
        "is_template": True,
        "prompt_type": PromptType.ORCHESTRATION_TEMPLATE.value,
        "scope": Scope.PROJECT.value,
        "description": "Imported from legacy session text by orch-migrate backfill",
        "tags": ["imported"],
        "declared_variables": [],
    },
    finish=lambda statement: statement.on_conflict_do_nothing(
        index_elements=["project_id", "name"], index_where=text("scope = 'project'")
    ).returning(Prompt.id, Prompt.project_id, Prompt.name),
    commaless=("project_id", "name", "content_hash"),
)


def _import_templates(connection: Connection, wanted: dict[TextKey, int]) -> set[TextKey]:
    """Create the imported template of each key, reading its text from the session given.

    The text is read again and must still hash to the key (else it changed since the batch
    read it and is left for the next run): a template's name always names its content.
    """
    texts: dict[TextKey, str] = {}
    for role in PromptRole:
        sessions = {session_id: key for key, session_id in wanted.items() if key[1] == role.value}
        if not sessions:
            continue
        column = _SESSIONS.c[role.legacy_column]
        rows = connection.execute(
            select(_SESSIONS.c.id, column).where(one_of(connection, _SESSIONS.c.id, list(sessions)))
        )
        for session_id, legacy_text in rows:
            key = sessions[session_id]
            if legacy_text is not None and content_hash(legacy_text) == key[2]:
                texts[key] = legacy_text
    rows_to_insert = []
    by_name: dict[tuple[int, str], TextKey] = {}
    for key, legacy_text in sorted(texts.items()):
        project_id, role_name, digest = key
        source = literal_template(legacy_text)
        name = imported_name(PromptRole(role_name), digest)
        by_name[(project_id, name)] = key
        rows_to_insert.append((project_id, name, source, content_hash(source)))
    if not rows_to_insert:
        return set()
    created = _IMPORTED_TEMPLATES.execute(connection, rows_to_insert).all()
    if not created:
        return set()
    connection.execute(
        insert(PromptVersion).from_select(
            ["prompt_id", "version", "content", "content_hash", "created_by", "change_note"],
            select(
                Prompt.id,
                literal(1),
                Prompt.content,
                Prompt.content_hash,
                literal(ACTOR),
                literal("imported from legacy session text"),
            ).where(one_of(connection, Prompt.id, [row.id for row in created])),
        )
    )
    # No labels: an imported version is only ever reached through the references that pin it,
    # never resolved by name, and labelling a few hundred thousand of them would cost a third
    # of the backfill's writes.
    return {by_name[(row.project_id, row.name)] for row in created}


def _upsert(statement: Any) -> Any:
    """An existing reference is rewritten only when made for another text (it is stale)."""
    excluded = statement.excluded
    return statement.on_conflict_do_update(
        index_elements=["session_id", "role"],
        set_={
            "prompt_version_id": excluded.prompt_version_id,
            "legacy_hash": excluded.legacy_hash,
            "source": excluded.source,
            "variables": None,
        },
        where=_REFS.c.legacy_hash.is_distinct_from(excluded.legacy_hash),
    )


_REFERENCES = BulkInsert(
    SessionPromptRef.__table__,
    [
        ("session_id", BigInteger()),
        ("role", Text()),
        ("prompt_version_id", BigInteger()),
        ("legacy_hash", Text()),
    ],
    {"source": SOURCE_BACKFILL},
    finish=_upsert,
    commaless=("session_id", "role", "prompt_version_id", "legacy_hash"),
)


def _link(
    connection: Connection,
    to_link: Sequence[_RoleState],
    imported: ImportedVersions,
    *,
    dry_run: bool,
) -> set[TextKey]:
    """Link each (session, role) to the imported template of its text, importing the texts
    that have none; the keys imported (in a dry run: that would be)."""
    wanted: dict[TextKey, int] = {}  # each key's first session: where its text is read from
    for state in to_link:
        assert state.legacy_hash is not None
        wanted.setdefault((state.project_id, state.role, state.legacy_hash), state.session_id)
    versions = imported.resolve(connection, set(wanted))
    missing = {key: session_id for key, session_id in wanted.items() if key not in versions}
    if dry_run or not missing:
        created: set[TextKey] = set(missing)
    else:
        created = _import_templates(connection, missing)
        # Not remembered by ``imported``: until this transaction commits they may vanish.
        versions.update(_find_imported(connection, set(missing)))
    if not dry_run:
        references = []
        for state in to_link:
            assert state.legacy_hash is not None
            version_id = versions.get((state.project_id, state.role, state.legacy_hash))
            if version_id is not None:  # else its text changed before it could be imported
                references.append((state.session_id, state.role, version_id, state.legacy_hash))
        if references:
            _REFERENCES.execute(connection, references)
    return created


def _remove_references(connection: Connection, pairs: list[tuple[int, str]]) -> None:
    """A legacy text set to NULL after it was linked: NULL means no reference."""
    if pairs:
        connection.execute(
            delete(SessionPromptRef).where(
                tuple_(SessionPromptRef.session_id, SessionPromptRef.role).in_(pairs)
            )
        )


def _checksum(states: Sequence[_RoleState]) -> str:
    lines = "".join(f"{state.session_id}:{state.role}:{state.legacy_hash}\n" for state in states)
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass
class _BatchResult:
    last_id: int
    sessions: int
    created: int = 0
    matched: int = 0
    relinked: int = 0
    removed: int = 0
    unchanged: int = 0
    templates: int = 0
    unreadable_rows: list[tuple[int, str]] = field(default_factory=list)  # (session, role)


def _run_batch(
    connection: Connection,
    run_id: int | None,
    after: int,
    upper: int,
    options: BackfillOptions,
    size: int,
    project_ids: Sequence[int],
    scoped: bool,
    dry_run_seen: set[tuple[int, str, str]],
    matcher: ExistingTemplateMatcher | None = None,
    planned: PlannedBatch | None = None,
    imported: ImportedVersions | None = None,
) -> _BatchResult | None:
    """``planned``: a range of a planned run (``--workers``) claimed by the caller, whose
    ledger row is completed here instead of a checkpoint being inserted. ``imported``: the
    run's known imported versions, shared by its batches."""
    imported = imported if imported is not None else ImportedVersions()
    states, covered_to = _batch_states(connection, after, upper, size, project_ids, scoped)
    if not states and planned is not None:  # the range's sessions are gone: nothing to link
        empty = _BatchResult(last_id=upper, sessions=0)
        _complete_planned(connection, planned, empty, _checksum(states))
        return empty
    if not states:
        return None
    last_id = covered_to
    result = _BatchResult(last_id=last_id, sessions=len(states) // len(PromptRole))
    removals: list[tuple[int, str]] = []
    for state in states:
        if state.unreadable:  # not valid UTF-8: never read into Python, never linked
            result.unreadable_rows.append((state.session_id, state.role))
        elif state.legacy_hash is None:
            if state.has_reference:
                removals.append((state.session_id, state.role))
                result.removed += 1
        elif not state.has_reference:
            result.created += 1
        elif state.linked_hash != state.legacy_hash:
            result.relinked += 1
        else:
            result.unchanged += 1
    if matcher is not None and (result.created or result.relinked):
        # In a dry run these writes roll back with the batch; they only keep the counts true.
        result.matched = matcher.link(
            connection, _batch_texts(after, last_id, project_ids, scoped, needing_link=True)
        )
    to_link = [
        s
        for s in states
        if s.legacy_hash is not None and s.linked_hash != s.legacy_hash and not s.unreadable
    ]
    if result.matched:
        linked_now = _linked_hashes(connection, after, last_id)
        to_link = [s for s in to_link if linked_now.get((s.session_id, s.role)) != s.legacy_hash]
    if to_link:
        templates = _link(connection, to_link, imported, dry_run=options.dry_run)
        if options.dry_run:
            # Nothing is created in a dry run, so later batches see the same texts as missing
            # again: count each distinct one once over the whole run.
            result.templates = len(templates - dry_run_seen)
            dry_run_seen.update(templates)
        else:
            result.templates = len(templates)
    if options.dry_run:
        return result
    _remove_references(connection, removals)
    if planned is not None:
        _complete_planned(connection, planned, result, _checksum(states))
    elif run_id is not None:
        connection.execute(
            insert(MigrationBatch).values(
                run_id=run_id,
                key_lo=after,
                key_hi=last_id,
                status="done",
                rows_seen=result.sessions,
                counts=_batch_counts(result),
                checksum=_checksum(states),
                finished_at=wall_clock(),
            )
        )
    return result


def _batch_counts(result: _BatchResult) -> dict[str, Any]:
    return {
        "created": result.created,
        "matched": result.matched,
        "relinked": result.relinked,
        "removed": result.removed,
        "unchanged": result.unchanged,
        "templates": result.templates,
        "unreadable": len(result.unreadable_rows),
        # The first few, for the run's summary to name (a planned run totals from here).
        "unreadable_rows": [list(row) for row in result.unreadable_rows[:_UNREADABLE_NAMED]],
    }


_UNREADABLE_NAMED = 10  # unreadable legacy texts a summary names (all are counted)


def unreadable_name(session_id: int, role: str) -> str:
    """How a summary names an unreadable legacy text: table, id and column."""
    return f"{OrchestrationSession.__tablename__} id {session_id} {PromptRole(role).legacy_column}"


def note_unreadable(summary: BackfillSummary, count: int, rows: Sequence[Sequence[Any]]) -> None:
    """Add a batch's unreadable legacy texts to the run's summary (the first few by name)."""
    summary.unreadable += count
    for session_id, role in rows:
        if len(summary.unreadable_rows) < _UNREADABLE_NAMED:
            summary.unreadable_rows.append(unreadable_name(int(session_id), str(role)))


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    """A planned batch (its ledger row) claimed by one worker for one transaction."""

    batch_id: int
    worker: str


def _complete_planned(
    connection: Connection, planned: PlannedBatch, result: _BatchResult, checksum: str
) -> None:
    """Mark a claimed planned batch done, in the batch's own transaction.

    ``started_at`` becomes the transaction's start (``now()``) and ``finished_at`` the wall
    clock, as for an unplanned checkpoint: their difference is how long the batch held locks.
    """
    connection.execute(
        update(MigrationBatch)
        .where(MigrationBatch.id == planned.batch_id)
        .values(
            status=BATCH_DONE,
            rows_seen=result.sessions,
            counts=_batch_counts(result),
            checksum=checksum,
            claimed_by=planned.worker,
            started_at=func.now(),
            finished_at=wall_clock(),
        )
    )


@contextmanager
def _project_locks(
    engine: Connectable, project_ids: Sequence[int], slugs: dict[int, str], wait: bool
) -> Iterator[int | None]:
    """Hold every selected project's advisory lock for the whole run (sorted: no deadlocks).

    Yields the server backend of the connection holding them (None on SQLite): it lives exactly
    as long as the run, so the ledger records it to tell a dead run from a live one.
    """
    with connect(engine) as holder:
        taken: list[int] = []
        try:
            for project_id in sorted(project_ids):
                if not acquire_advisory_lock(holder, _lock_key(project_id), wait=wait):
                    raise BackfillBusyError(
                        f"another backfill is running for project {slugs[project_id]}; wait for "
                        "it to finish, or pass --wait to queue behind it"
                    )
                taken.append(project_id)
            holder_pid = backend_pid(holder)
            _commit_own(engine, holder)
            yield holder_pid
        finally:
            for project_id in taken:
                release_advisory_lock(holder, _lock_key(project_id))
            _commit_own(engine, holder)


def _commit_own(db: Connectable, connection: Connection) -> None:
    """End the lock holder's implicit transaction, unless it is the caller's transaction."""
    if not isinstance(db, Connection):
        connection.commit()


def _resume_point(connection: Connection, scope_key: str) -> tuple[int | None, int | None]:
    """The last checkpoint of an interrupted run of the same scope, and that run's id.

    The latest run of the scope is resumed when it was interrupted (Ctrl-C, SIGTERM), abandoned
    (its process killed, see :func:`~prompt_tool.migrate.runs.reap_dead_runs`), failed
    (a lock held past the retries, a lost connection: its checkpoints are committed batches,
    each one whole, so what they cover stands), or is
    still marked running: we hold the scope's locks, so such a run is a dead one (SIGKILL, a
    crash), and it is marked interrupted now. Once resumed it is no longer the latest run of the
    scope, so it is resumed once. A run that resumed another and was interrupted before its first
    checkpoint carries on from where that one had got to.
    """
    latest = connection.execute(
        select(MigrationRun.id, MigrationRun.status, MigrationRun.params)
        .where(
            MigrationRun.kind == RunKind.BACKFILL.value,
            MigrationRun.params["scope"].as_string() == scope_key,
        )
        .order_by(MigrationRun.id.desc())
        .limit(1)
    ).first()
    if latest is None or latest.status not in (
        RunStatus.RUNNING.value,
        RunStatus.INTERRUPTED.value,
        RunStatus.FAILED.value,
        RunStatus.ABANDONED.value,
    ):
        return None, None
    run = int(latest.id)
    last = connection.execute(
        select(func.max(MigrationBatch.key_hi)).where(
            MigrationBatch.run_id == run, MigrationBatch.status == BATCH_DONE
        )
    ).scalar()
    earlier = (latest.params or {}).get("resumed_after")
    if last is None and isinstance(earlier, int):
        last = earlier
    if latest.status == RunStatus.RUNNING.value:
        connection.execute(
            update(MigrationRun)
            .where(MigrationRun.id == run)
            .values(status=RunStatus.INTERRUPTED.value, finished_at=func.now())
        )
    return last, run


def backfill(
    engine: Connectable,
    options: BackfillOptions | None = None,
    *,
    progress: Callable[[BackfillProgress], None] | None = None,
    settings: Settings | None = None,
) -> BackfillSummary:
    """Link every selected session to imported templates of its legacy texts. See the module."""
    require_known_revision(engine, "backfill", needs=EXPAND)
    options = options or BackfillOptions()
    settings = settings or get_settings()
    started = time.monotonic()
    engine = bounded_waits(
        engine, settings.migration_lock_timeout_ms, settings.migration_statement_timeout_ms
    )
    with connect(engine) as connection:
        projects = projects_by_slug(connection, options.projects)
    refreshed = _refresh_stale_statistics(engine)
    scoped = bool(options.projects)
    project_ids = list(projects)
    scope_key = ",".join(sorted(projects.values())) if scoped else "*"
    with _project_locks(engine, project_ids, projects, options.wait) as holder_pid:

        def prepare(connection: Connection) -> tuple[int, int | None, Any, int]:
            upper = connection.execute(
                select(func.coalesce(func.max(_SESSIONS.c.id), 0)).where(
                    _session_filter(project_ids, scoped)
                )
            ).scalar_one()
            resumed_after, resumed_run = (
                (None, None) if options.dry_run else _resume_point(connection, scope_key)
            )
            # A planned run (--workers) left ranges to do: carry them on, whatever --workers.
            carried = backfill_plan.pending_ranges(connection, resumed_run)
            if carried:
                resumed_after = None
            total = connection.execute(
                select(func.count()).where(
                    _SESSIONS.c.id > (resumed_after or 0),
                    _SESSIONS.c.id <= upper,
                    _session_filter(project_ids, scoped),
                )
            ).scalar_one()
            return upper, resumed_after, carried, total

        upper, resumed_after, carried, total = _retrying(
            engine, options, summary=None, work=prepare, rollback=False
        )
        if options.limit is not None:
            total = min(total, options.limit)
        run_id = None
        if not options.dry_run:
            run_id = start_run(
                engine,
                RunKind.BACKFILL,
                project_id=project_ids[0] if len(project_ids) == 1 and scoped else None,
                params={
                    "scope": scope_key,
                    "batch_size": options.batch_size,
                    "limit": options.limit,
                    "workers": options.workers,
                    "resumed_after": resumed_after,
                },
                key_upper_bound=upper,
                backend_pid=holder_pid,
            )
        summary = BackfillSummary(
            run_id, options.dry_run, sorted(projects.values()), upper, resumed_after
        )
        summary.statistics_refreshed = refreshed
        try:
            adopted = adopt_orphaned_imports(engine, project_ids, scoped, dry_run=options.dry_run)
            summary.templates_adopted = len(adopted)
            walk = _walk
            if run_id is not None and (options.workers > 1 or carried):
                walk = functools.partial(backfill_plan.walk_planned, carried=carried)
            walk(
                engine,
                run_id,
                options,
                settings,
                summary,
                project_ids,
                scoped,
                resumed_after or 0,
                upper,
                total,
                started,
                progress,
                matcher=_matcher(engine, options, projects),
                # A dry run adopts nothing: those texts must not count as imports either.
                dry_run_seen=set(adopted),
            )
        except BaseException as error:
            if run_id is not None:
                outcome = outcome_of(error)
                summary.elapsed_s = time.monotonic() - started
                finish_run(
                    engine,
                    run_id,
                    outcome,
                    summary=_summary_dict(summary),
                    error=(
                        "interrupted" if outcome is RunStatus.INTERRUPTED else str(error)[:2000]
                    ),
                )
            raise
        if summary.references_created + summary.references_relinked > _ANALYZE_AFTER:
            # Readers and verify would otherwise plan for the empty tables the expand step
            # analysed (seq scans of millions of references) until autovacuum catches up.
            with begin(engine) as connection:
                refresh_statistics(connection, _WRITTEN_TABLES)
        summary.elapsed_s = time.monotonic() - started
        if run_id is not None:
            finish_run(engine, run_id, RunStatus.COMPLETED, summary=_summary_dict(summary))
    return summary


def _refresh_stale_statistics(engine: Connectable) -> list[str]:
    """``ANALYZE`` the tables the walk plans over when the planner knows nothing (or little)
    about them, as after a bulk load: its batch queries follow the primary key whatever the
    statistics (see :func:`_session_filter`), but its reference and template lookups are
    planned too. Best effort: without the privilege, or behind a lock, it goes on without."""
    with begin(engine) as connection:
        stale = stale_statistics(connection, _PLANNED_TABLES)
        if stale and refresh_statistics(connection, stale):
            return stale
    return []


def _matcher(
    engine: Connectable, options: BackfillOptions, projects: dict[int, str]
) -> ExistingTemplateMatcher | None:
    if not options.match_existing:
        return None
    with connect(engine) as connection:
        return ExistingTemplateMatcher(connection, TemplateManager(engine), projects)


def _summary_dict(summary: BackfillSummary) -> dict[str, Any]:
    return {
        "batches": summary.batches,
        "sessions_scanned": summary.sessions_scanned,
        "references_created": summary.references_created,
        "references_matched": summary.references_matched,
        "references_relinked": summary.references_relinked,
        "references_removed": summary.references_removed,
        "templates_created": summary.templates_created,
        "templates_adopted": summary.templates_adopted,
        "unreadable": summary.unreadable,
        "unreadable_rows": summary.unreadable_rows,
        "retried": summary.retried,
        "statistics_refreshed": summary.statistics_refreshed,
        "elapsed_s": round(summary.elapsed_s, 3),
    }


def _walk(
    engine: Connectable,
    run_id: int | None,
    options: BackfillOptions,
    settings: Settings,
    summary: BackfillSummary,
    project_ids: Sequence[int],
    scoped: bool,
    after: int,
    upper: int,
    total: int,
    started: float,
    progress: Callable[[BackfillProgress], None] | None,
    matcher: ExistingTemplateMatcher | None = None,
    dry_run_seen: set[tuple[int, str, str]] | None = None,
) -> None:
    # Start small and grow: the first batches import the most templates, so a full-size first
    # batch would be the longest lock of the run.
    size = min(options.batch_size, _FIRST_BATCH)
    dry_run_seen = dry_run_seen if dry_run_seen is not None else set()
    imported = ImportedVersions()
    while options.limit is None or summary.sessions_scanned < options.limit:
        if options.limit is not None:
            size = min(size, options.limit - summary.sessions_scanned)
        batch = functools.partial(
            _run_batch,
            run_id=run_id,
            after=after,
            upper=upper,
            options=options,
            size=size,
            project_ids=project_ids,
            scoped=scoped,
            dry_run_seen=dry_run_seen,
            matcher=matcher,
            imported=imported,
        )
        result = _with_retries(engine, options, summary, batch)
        if result is None:
            break
        size = _next_batch_size(size, summary.batch_seconds[-1], options)
        after = result.last_id
        summary.batches += 1
        summary.sessions_scanned += result.sessions
        summary.references_created += result.created
        summary.references_matched += result.matched
        summary.references_relinked += result.relinked
        summary.references_removed += result.removed
        summary.references_unchanged += result.unchanged
        summary.templates_created += result.templates
        note_unreadable(summary, len(result.unreadable_rows), result.unreadable_rows)
        if progress is not None:
            progress(
                BackfillProgress(
                    summary.sessions_scanned, total, summary.batches, time.monotonic() - started
                )
            )
        if options.sleep_ms:
            time.sleep(options.sleep_ms / 1000)


def _next_batch_size(size: int, seconds: float, options: BackfillOptions) -> int:
    """Keep each batch's transaction near the target: halve after a slow one, grow back after
    fast ones, never above --batch-size. Locks stay short whatever the texts cost to import."""
    target = options.target_batch_ms / 1000
    if seconds > target:
        return max(_MIN_BATCH, size // 2)
    if seconds < target / 2:
        return min(options.batch_size, size * 2)
    return size


def _with_retries(
    engine: Connectable,
    options: BackfillOptions,
    summary: BackfillSummary,
    work: Callable[[Connection], _BatchResult | None],
) -> _BatchResult | None:
    """One batch in one short transaction (rolled back in a dry run), retried as
    :func:`_retrying` does; its time, from the attempt that succeeded, steers the batch size."""
    attempt_began = time.perf_counter()

    def timed(connection: Connection) -> _BatchResult | None:
        nonlocal attempt_began
        attempt_began = time.perf_counter()
        return work(connection)

    result = _retrying(engine, options, summary, timed, rollback=options.dry_run)
    summary.batch_seconds.append(time.perf_counter() - attempt_began)
    return result


def _retrying(
    engine: Connectable,
    options: BackfillOptions,
    summary: BackfillSummary | None,
    work: Callable[[Connection], _T],
    *,
    rollback: bool,
) -> _T:
    """``work`` in one short transaction; lock timeouts and deadlocks roll it back and retry
    with backoff. Past the last retry: :class:`LockTimeoutError`, saying what waited, who held
    the lock, what stands, and that a re-run carries on."""
    attempt = 0
    first_began = time.monotonic()
    while True:
        try:
            with begin(engine) as connection:
                result = work(connection)
                if rollback:
                    connection.rollback()
            return result
        except DBAPIError as error:
            if not is_retryable(error):
                raise
            if attempt >= options.max_retries:
                waited = time.monotonic() - first_began
                raise _gave_up(engine, error, attempt + 1, waited, summary) from None
            attempt += 1
            if summary is not None:
                summary.retried += 1
            # Exponential backoff with a cap: let the lock holder finish before trying again.
            time.sleep(min(2.0, 0.05 * 2**attempt))


def _gave_up(
    engine: Connectable,
    error: DBAPIError,
    attempts: int,
    waited_s: float,
    summary: BackfillSummary | None,
) -> PromptToolError:
    if summary is None or not summary.batches:
        stands = "nothing was written"
    else:
        batches = "the batch" if summary.batches == 1 else f"the {summary.batches:,} batches"
        stands = (
            f"{batches} before it ({summary.sessions_scanned:,} sessions) "
            f"{'is' if summary.batches == 1 else 'are'} committed and a rerun carries on from "
            "its last checkpoint"
        )
    if not is_lock_timeout(error):  # a deadlock, every time
        return LockTimeoutError(
            f"backfill gave up after {attempts} attempts in {waited_s:.1f} s: each was chosen "
            f"as a deadlock victim; {stands}; run the same command again"
        )
    return lock_wait_error(
        engine, "backfill", _TOUCHED_TABLES, stands=stands, attempts=attempts, waited_s=waited_s
    )
