"""One backfill batch's SQL: read a key range's sessions (each legacy text hashed once), import
the texts that have no template yet, link every (session, role) to its template, and record
the batch in the ledger, all in the caller's one short transaction."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Connection,
    Text,
    and_,
    bindparam,
    delete,
    insert,
    literal,
    literal_column,
    select,
    text,
    tuple_,
    union_all,
)

from prompt_tool.core import content_hash, literal_template
from prompt_tool.db.dialect import (
    BulkInsert,
    PairLookup,
    one_of,
    sha256_hex,
    unreadable_text,
)
from prompt_tool.db.engine import Connectable, connect
from prompt_tool.db.models import (
    OrchestrationSession,
    Prompt,
    PromptRole,
    PromptType,
    PromptVersion,
    Scope,
    SessionPromptRef,
)
from prompt_tool.migrate.backfill.ledger import complete_planned, record_checkpoint
from prompt_tool.migrate.backfill.quarantine import (
    ImportLimits,
    QuarantinedRow,
    held,
    record,
    release,
    screen,
)
from prompt_tool.migrate.backfill.types import (
    BackfillOptions,
    BackfillRun,
    BackfillScope,
    BatchResult,
    PlannedBatch,
    TextKey,
)
from prompt_tool.migrate.matching import ExistingTemplateMatcher
from prompt_tool.templates import TemplateManager

__all__ = [
    "IMPORTED_PREFIX",
    "WRITTEN_TABLES",
    "ImportedVersions",
    "KeySpan",
    "imported_name",
    "matcher_for",
    "run_batch",
]

IMPORTED_PREFIX = "imported/"
SOURCE_BACKFILL = "backfill"
ACTOR = "orch-migrate backfill"
# A batch reads at most this many times its size in keys (see _batch_states).
_WINDOW = 8
# Spelled as SQL, not a bound parameter: only then can the planner prove that a query matches
# the partial unique index on (project_id, name) WHERE scope = 'project', also in the generic
# plans psycopg switches to once a statement is prepared.
_IN_PROJECT_SCOPE = Prompt.scope == literal_column("'project'")
_SESSIONS = OrchestrationSession.__table__
_REFS = SessionPromptRef.__table__
_ROLES = tuple(role.value for role in PromptRole)
_KNOWN_VERSIONS_CAP = 500_000
WRITTEN_TABLES = ("session_prompt_refs", "prompts", "prompt_versions")


def imported_name(role: PromptRole, legacy_hash: str) -> str:
    return f"{IMPORTED_PREFIX}{role.value}/{legacy_hash}"


class KeySpan(NamedTuple):
    """The sessions a batch may take: keys in (after, upper], at most ``size`` of them."""

    after: int
    upper: int
    size: int


class _RoleState(NamedTuple):
    """One (session, role) of a batch. A tuple: a batch makes thousands of them."""

    session_id: int
    project_id: int
    role: str  # a PromptRole's value
    legacy_hash: str | None  # None: the legacy text is NULL
    linked_hash: str | None  # the reference's legacy_hash, None when no reference
    has_reference: bool
    unreadable: bool = False  # the text's bytes are not valid UTF-8: named, skipped


def _batch_states(
    connection: Connection, span: KeySpan, scope: BackfillScope
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
    after, upper, size = span
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
            scope.sessions(),
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


def _batch_texts(scope: BackfillScope, after: int, last: int) -> Any:
    """The batch's non-NULL legacy texts that need a link, one row per (session, role), with
    their hash: those without a reference, or whose reference was made for another text
    (stale), which is all a run has to write."""
    in_batch = and_(_SESSIONS.c.id > after, _SESSIONS.c.id <= last, scope.sessions())
    per_role = []
    for role in PromptRole:
        column = _SESSIONS.c[role.legacy_column]
        digest = sha256_hex(column)
        linked = _linked(_SESSIONS.c.id, role, _REFS.c.legacy_hash)
        per_role.append(
            select(
                _SESSIONS.c.id.label("session_id"),
                _SESSIONS.c.project_id.label("project_id"),
                literal(role.value).label("role"),
                digest.label("legacy_hash"),
                column.label("legacy_text"),
            ).where(
                in_batch,
                column.is_not(None),
                ~unreadable_text(column),
                linked.is_distinct_from(digest),
            )
        )
    return union_all(*per_role).subquery()


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


def _imported_versions_matching(names: list[tuple[int, str]]) -> Any:
    """Version 1 of the imported templates named (project, name), as one query."""
    return (
        select(Prompt.project_id, Prompt.name, PromptVersion.id)
        .join(PromptVersion, PromptVersion.prompt_id == Prompt.id)
        .where(
            _IN_PROJECT_SCOPE,
            tuple_(Prompt.project_id, Prompt.name).in_(names),
            PromptVersion.version == literal_column("1"),
        )
    )


_IMPORTED_VERSIONS = PairLookup(
    (BigInteger(), Text()), _imported_version, _imported_versions_matching
)


def _find_imported(connection: Connection, keys: set[TextKey]) -> dict[TextKey, int]:
    """Look the imported templates of ``keys`` up by (project, name)."""
    by_name: dict[tuple[int, str], TextKey] = {
        (project_id, imported_name(PromptRole(role), digest)): (project_id, role, digest)
        for project_id, role, digest in keys
    }
    return {
        by_name[(project_id, name)]: version_id
        for project_id, name, version_id in _IMPORTED_VERSIONS.execute(connection, list(by_name))
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


def _read_texts(connection: Connection, wanted: dict[TextKey, int]) -> dict[TextKey, str]:
    """The text of each key, read from the session given.

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
    return texts


def _import_templates(connection: Connection, texts: dict[TextKey, str]) -> set[TextKey]:
    """Create the imported template of each key's text; the keys created."""
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


class _Linked(NamedTuple):
    """What :func:`_link` did with a batch's texts."""

    created: set[TextKey]  # imported (in a dry run: that would be)
    refused: dict[TextKey, str]  # cannot be imported (see quarantine.screen), with the reason
    unresolved: set[TextKey]  # changed before they could be imported: left for the next run


def _link(
    connection: Connection,
    to_link: Sequence[_RoleState],
    imported: ImportedVersions,
    limits: ImportLimits,
    *,
    dry_run: bool,
) -> _Linked:
    """Link each (session, role) to the imported template of its text, importing the texts
    that have none and can be imported (each screened first: see quarantine)."""
    wanted: dict[TextKey, int] = {}  # each key's first session: where its text is read from
    for state in to_link:
        assert state.legacy_hash is not None
        wanted.setdefault((state.project_id, state.role, state.legacy_hash), state.session_id)
    versions = imported.resolve(connection, set(wanted))
    missing = {key: session_id for key, session_id in wanted.items() if key not in versions}
    created: set[TextKey] = set()
    refused: dict[TextKey, str] = {}
    if missing:
        texts = _read_texts(connection, missing)
        refused = screen(texts, limits)
        importable = {key: text for key, text in texts.items() if key not in refused}
        if dry_run:
            created = set(missing) - refused.keys()
        elif importable:
            created = _import_templates(connection, importable)
            # Not remembered by ``imported``: until this transaction commits they may vanish.
            versions.update(_find_imported(connection, set(importable)))
    unresolved = set() if dry_run else wanted.keys() - versions.keys() - refused.keys()
    if not dry_run:
        references = []
        for state in to_link:
            assert state.legacy_hash is not None
            version_id = versions.get((state.project_id, state.role, state.legacy_hash))
            if version_id is not None:  # else its text changed before it could be imported
                references.append((state.session_id, state.role, version_id, state.legacy_hash))
        if references:
            _REFERENCES.execute(connection, references)
    return _Linked(created, refused, unresolved)


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


def _classify(states: Sequence[_RoleState], result: BatchResult) -> list[tuple[int, str]]:
    """Count each (session, role) into ``result``; the references to remove (text now NULL)."""
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
    return removals


def _quarantine(
    connection: Connection,
    run: BackfillRun,
    states: Sequence[_RoleState],
    to_link: Sequence[_RoleState],
    linked: _Linked,
    result: BatchResult,
) -> None:
    """Quarantine the batch's (session, role) rows whose text cannot be imported (they stay
    unlinked, on the legacy path), release those linked now (or left with nothing to link),
    and count the newly quarantined in ``result``; a dry run only counts."""
    rows = []
    for state in to_link:
        key = (state.project_id, state.role, state.legacy_hash or "")
        reason = linked.refused.get(key)
        if reason is None:
            continue
        rows.append(
            QuarantinedRow(
                state.session_id, state.project_id, state.role, state.legacy_hash, reason
            )
        )
        # _classify counted it as linked: it is not.
        if state.has_reference:
            result.relinked -= 1
        else:
            result.created -= 1
    quarantined = {(row.session_id, row.role) for row in rows}
    # The states are in key order: the quarantine rows of their sessions, one range scan.
    before = held(connection, states[0].session_id - 1, states[-1].session_id)
    if run.options.dry_run:
        result.quarantined = len(quarantined - before)
        return
    if before:
        waiting = {
            (state.session_id, state.role)
            for state in to_link
            if (state.project_id, state.role, state.legacy_hash) in linked.unresolved
        }
        in_batch = {(state.session_id, state.role) for state in states}
        release(connection, (before & in_batch) - quarantined - waiting)
    result.quarantined = record(connection, run.run_id, rows)


def run_batch(
    connection: Connection,
    run: BackfillRun,
    span: KeySpan,
    imported: ImportedVersions,
    planned: PlannedBatch | None = None,
) -> BatchResult | None:
    """One batch of ``run`` in the caller's transaction; None when ``span`` holds no session.

    ``planned``: a range of a planned run (``--workers``) claimed by the caller, whose ledger
    row is completed here instead of a checkpoint being inserted. ``imported``: the run's known
    imported versions, shared by its batches."""
    after = span.after
    states, covered_to = _batch_states(connection, span, run.scope)
    if not states and planned is not None:  # the range's sessions are gone: nothing to link
        empty = BatchResult(last_id=span.upper, sessions=0, notes=run.notes)
        complete_planned(connection, planned, empty, _checksum(states))
        return empty
    if not states:
        return None
    last_id = covered_to
    result = BatchResult(last_id=last_id, sessions=len(states) // len(PromptRole), notes=run.notes)
    removals = _classify(states, result)
    if run.matcher is not None and (result.created or result.relinked):
        # In a dry run these writes roll back with the batch; they only keep the counts true.
        result.matched = run.matcher.link(connection, _batch_texts(run.scope, after, last_id))
    to_link = [
        s
        for s in states
        if s.legacy_hash is not None and s.linked_hash != s.legacy_hash and not s.unreadable
    ]
    if result.matched:
        linked_now = _linked_hashes(connection, after, last_id)
        to_link = [s for s in to_link if linked_now.get((s.session_id, s.role)) != s.legacy_hash]
    dry_run = run.options.dry_run
    linked = _Linked(set(), {}, set())
    if to_link:
        limits = ImportLimits.from_settings(run.settings)
        linked = _link(connection, to_link, imported, limits, dry_run=dry_run)
        templates = linked.created
        if dry_run:
            # Nothing is created in a dry run, so later batches see the same texts as missing
            # again: count each distinct one once over the whole run.
            result.templates = len(templates - run.dry_run_seen)
            run.dry_run_seen.update(templates)
        else:
            result.templates = len(templates)
    _quarantine(connection, run, states, to_link, linked, result)
    if dry_run:
        return result
    _remove_references(connection, removals)
    if planned is not None:
        complete_planned(connection, planned, result, _checksum(states))
    elif run.run_id is not None:
        record_checkpoint(connection, run.run_id, after, result, _checksum(states))
    return result


def matcher_for(
    engine: Connectable, options: BackfillOptions, scope: BackfillScope
) -> ExistingTemplateMatcher | None:
    """The run's matcher of existing templates (``--match-existing``), else None."""
    if not options.match_existing:
        return None
    with connect(engine) as connection:
        return ExistingTemplateMatcher(connection, TemplateManager(engine), dict(scope.projects))
