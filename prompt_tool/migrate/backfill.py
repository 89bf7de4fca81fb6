"""`orch-migrate backfill`: turn the legacy TEXT columns into template references.

Every distinct legacy text of a project and role becomes an imported template (scope project,
name ``imported/<role>/<sha256 of the text>``, its single version a literal template that renders
back to the text byte for byte), and each session gets a reference to it. Sessions are walked in
keyset batches on the primary key, up to a bound fixed when the run starts (newer sessions are
dual-written); each batch is one short transaction that reads the sessions without locking them,
creates the missing templates, upserts the references set-based, and records a checkpoint in the
migration ledger. Runs are idempotent (a second run changes nothing), resumable (an interrupted
run continues after its last checkpoint) and guarded by an advisory lock per project.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    and_,
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

from prompt_tool.core import literal_template
from prompt_tool.db.dialect import (
    acquire_advisory_lock,
    insert_for,
    is_retryable,
    literal_template_sql,
    provide_sqlite_function,
    refresh_statistics,
    release_advisory_lock,
    set_local_timeouts,
    sha256_hex,
    wall_clock,
)
from prompt_tool.db.engine import Connectable, begin, connect
from prompt_tool.db.models import (
    MigrationBatch,
    MigrationRun,
    OrchestrationSession,
    Project,
    Prompt,
    PromptRole,
    PromptType,
    PromptVersion,
    Scope,
    SessionPromptRef,
)
from prompt_tool.errors import InvalidInputError, NotFoundError, PromptToolError
from prompt_tool.migrate import backfill_plan
from prompt_tool.migrate.adoption import adopt_orphaned_imports
from prompt_tool.migrate.matching import ExistingTemplateMatcher
from prompt_tool.migrate.runs import RunKind, RunStatus, finish_run, start_run
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

IMPORTED_PREFIX = "imported/"
SOURCE_BACKFILL = "backfill"
ACTOR = "orch-migrate backfill"
_MIN_BATCH = 50
_ANALYZE_AFTER = 10_000  # references written by a run before it refreshes the statistics
_WRITTEN_TABLES = ("session_prompt_refs", "prompts", "prompt_versions")
BATCH_DONE = "done"
_FIRST_BATCH = 200
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


@dataclass(frozen=True, slots=True)
class _RoleState:
    session_id: int
    project_id: int
    role: PromptRole
    legacy_hash: str | None  # None: the legacy text is NULL
    linked_hash: str | None  # the reference's legacy_hash, None when no reference
    has_reference: bool


def _lock_key(project_id: int) -> int:
    return (_LOCK_NAMESPACE << 32) | project_id


def _project_ids(connection: Connection, slugs: Sequence[str]) -> dict[int, str]:
    query = select(Project.id, Project.slug).order_by(Project.id)
    if slugs:
        query = query.where(Project.slug.in_(list(slugs)))
    found = {project_id: slug for project_id, slug in connection.execute(query)}
    missing = sorted(set(slugs) - set(found.values()))
    if missing:
        raise NotFoundError(f"no project with slug {', '.join(missing)}; check --project")
    return found


def _session_filter(project_ids: Sequence[int], scoped: bool) -> Any:
    return _SESSIONS.c.project_id.in_(list(project_ids)) if scoped else true()


def _batch_states(
    connection: Connection,
    after: int,
    upper: int,
    size: int,
    project_ids: Sequence[int],
    scoped: bool,
) -> list[_RoleState]:
    """One batch's sessions: the hash of each legacy text and of what it is linked to now."""
    batch = (
        select(
            _SESSIONS.c.id,
            _SESSIONS.c.project_id,
            *(sha256_hex(_SESSIONS.c[role.legacy_column]).label(role.value) for role in PromptRole),
        )
        .where(
            _SESSIONS.c.id > after, _SESSIONS.c.id <= upper, _session_filter(project_ids, scoped)
        )
        .order_by(_SESSIONS.c.id)
        .limit(size)
        .subquery()
    )
    query = select(
        batch,
        *(
            _linked(batch.c.id, role, _REFS.c.legacy_hash).label(f"linked_{role.value}")
            for role in PromptRole
        ),
        *(
            _linked(batch.c.id, role, _REFS.c.session_id).label(f"has_{role.value}")
            for role in PromptRole
        ),
    )
    states: list[_RoleState] = []
    for row in connection.execute(query.order_by(batch.c.id)).mappings():
        for role in PromptRole:
            states.append(
                _RoleState(
                    session_id=row["id"],
                    project_id=row["project_id"],
                    role=role,
                    legacy_hash=row[role.value],
                    linked_hash=row[f"linked_{role.value}"],
                    has_reference=row[f"has_{role.value}"] is not None,
                )
            )
    return states


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


def _imported_version(project_id: Any, name: Any) -> Any:
    """The id of an imported template's version 1, as a scalar subquery (index lookups)."""
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
        ).where(in_batch, column.is_not(None))
        if needing_link:
            linked = _linked(_SESSIONS.c.id, role, _REFS.c.legacy_hash)
            query = query.where(linked.is_distinct_from(digest))
        per_role.append(query)
    return union_all(*per_role).subquery()


def _imported_name_of(texts: Any) -> Any:
    return literal(IMPORTED_PREFIX) + texts.c.role + literal("/") + texts.c.legacy_hash


def _literal_or_null(text_value: str | None) -> str | None:
    return None if text_value is None else literal_template(text_value)


def _import_templates(
    connection: Connection, after: int, last: int, project_ids: Sequence[int], scoped: bool
) -> int:
    """Create the imported template of every distinct text that has none yet: set-based.

    Its single version is the literal template of the text, computed in SQL.
    """
    provide_sqlite_function(connection, "pt_literal_template", _literal_or_null)
    texts = _batch_texts(after, last, project_ids, scoped, needing_link=True)
    name = _imported_name_of(texts)
    distinct_texts = (
        select(
            texts.c.project_id,
            name.label("name"),
            func.min(texts.c.legacy_text).label("legacy_text"),
        )
        .where(_imported_version(texts.c.project_id, name).is_(None))
        .group_by(texts.c.project_id, texts.c.role, texts.c.legacy_hash)
        .subquery()
    )
    source = literal_template_sql(distinct_texts.c.legacy_text)
    rows = select(
        distinct_texts.c.project_id,
        distinct_texts.c.name,
        source,
        literal("imported"),
        true(),
        literal(PromptType.ORCHESTRATION_TEMPLATE.value),
        literal(Scope.PROJECT.value),
        literal("Imported from legacy session text by orch-migrate backfill"),
        literal(["imported"], type_=JSON),
        literal([], type_=JSON),
        sha256_hex(source),
    ).where(true())  # SQLite needs a WHERE before ON CONFLICT in INSERT ... SELECT
    statement = (
        insert_for(connection, Prompt.__table__)
        .from_select(
            [
                "project_id",
                "name",
                "content",
                "category",
                "is_template",
                "prompt_type",
                "scope",
                "description",
                "tags",
                "declared_variables",
                "content_hash",
            ],
            rows,
        )
        .on_conflict_do_nothing(
            index_elements=["project_id", "name"], index_where=text("scope = 'project'")
        )
        .returning(Prompt.id)
    )
    created = list(connection.execute(statement).scalars())
    if not created:
        return 0
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
            ).where(Prompt.id.in_(created)),
        )
    )
    # No labels: an imported version is only ever reached through the references that pin it,
    # never resolved by name, and labelling a few hundred thousand of them would cost a third
    # of the backfill's writes.
    return len(created)


def _missing_templates(
    connection: Connection, after: int, last: int, project_ids: Sequence[int], scoped: bool
) -> set[tuple[int, str, str]]:
    """The (project, role, text hash) :func:`_import_templates` would create (for --dry-run)."""
    texts = _batch_texts(after, last, project_ids, scoped, needing_link=True)
    name = _imported_name_of(texts)
    distinct = (
        select(texts.c.project_id, texts.c.role, texts.c.legacy_hash)
        .where(_imported_version(texts.c.project_id, name).is_(None))
        .group_by(texts.c.project_id, texts.c.role, texts.c.legacy_hash)
        .subquery()
    )
    return {
        (project_id, role, digest)
        for project_id, role, digest in connection.execute(select(distinct))
    }


def _upsert_references(
    connection: Connection,
    after: int,
    last: int,
    project_ids: Sequence[int],
    scoped: bool,
    *,
    needing_link: bool = True,
) -> None:
    """Link every session of the batch to the imported template of its current text.

    Set-based: one INSERT ... SELECT; an existing reference is rewritten only when its hash
    differs (the legacy text changed since it was made).
    """
    texts = _batch_texts(after, last, project_ids, scoped, needing_link=needing_link)
    linked = (
        select(
            texts.c.session_id,
            texts.c.role,
            _imported_version(texts.c.project_id, _imported_name_of(texts)).label("version_id"),
            texts.c.legacy_hash,
        )
        # OFFSET 0 keeps the planner from inlining this subquery, which would run the version
        # lookup twice per row (once in the filter below, once for the value).
        .offset(0)
    ).subquery()
    source = select(
        linked.c.session_id,
        linked.c.role,
        linked.c.version_id,
        linked.c.legacy_hash,
        literal(SOURCE_BACKFILL),
    ).where(linked.c.version_id.is_not(None))
    statement = insert_for(connection, _REFS).from_select(
        ["session_id", "role", "prompt_version_id", "legacy_hash", "source"], source
    )
    excluded = statement.excluded
    statement = statement.on_conflict_do_update(
        index_elements=["session_id", "role"],
        set_={
            "prompt_version_id": excluded.prompt_version_id,
            "legacy_hash": excluded.legacy_hash,
            "source": excluded.source,
            "variables": None,
        },
        where=_REFS.c.legacy_hash.is_distinct_from(excluded.legacy_hash),
    )
    connection.execute(statement)


def _remove_references(connection: Connection, pairs: list[tuple[int, str]]) -> None:
    """A legacy text set to NULL after it was linked: NULL means no reference."""
    if pairs:
        connection.execute(
            delete(SessionPromptRef).where(
                tuple_(SessionPromptRef.session_id, SessionPromptRef.role).in_(pairs)
            )
        )


def _checksum(states: Sequence[_RoleState]) -> str:
    digest = hashlib.sha256()
    for state in states:
        digest.update(f"{state.session_id}:{state.role.value}:{state.legacy_hash}\n".encode())
    return digest.hexdigest()


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


def _run_batch(
    connection: Connection,
    run_id: int | None,
    after: int,
    upper: int,
    options: BackfillOptions,
    size: int,
    project_ids: Sequence[int],
    scoped: bool,
    settings: Settings,
    dry_run_seen: set[tuple[int, str, str]],
    matcher: ExistingTemplateMatcher | None = None,
    planned: PlannedBatch | None = None,
) -> _BatchResult | None:
    """``planned``: a range of a planned run (``--workers``) claimed by the caller, whose
    ledger row is completed here instead of a checkpoint being inserted."""
    set_local_timeouts(
        connection, settings.migration_lock_timeout_ms, settings.migration_statement_timeout_ms
    )
    states = _batch_states(connection, after, upper, size, project_ids, scoped)
    if not states and planned is not None:  # the range's sessions are gone: nothing to link
        empty = _BatchResult(last_id=upper, sessions=0)
        _complete_planned(connection, planned, empty, _checksum(states))
        return empty
    if not states:
        return None
    last_id = states[-1].session_id
    result = _BatchResult(last_id=last_id, sessions=len(states) // len(PromptRole))
    removals: list[tuple[int, str]] = []
    for state in states:
        if state.legacy_hash is None:
            if state.has_reference:
                removals.append((state.session_id, state.role.value))
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
    if not (result.created or result.relinked or result.removed):
        pass
    elif options.dry_run:
        # Nothing is created in a dry run, so later batches see the same texts as missing
        # again: count each distinct one once over the whole run.
        missing = _missing_templates(connection, after, last_id, project_ids, scoped)
        result.templates = len(missing - dry_run_seen)
        dry_run_seen.update(missing)
        return result
    else:
        result.templates = _import_templates(connection, after, last_id, project_ids, scoped)
    if options.dry_run:
        return result
    if result.created or result.relinked:
        # No text of the batch was linked when it was read: every one needs its reference,
        # so the per-row "still needs a link?" check can go (ON CONFLICT settles any race).
        fresh = not (result.relinked or result.unchanged or result.matched)
        _upsert_references(connection, after, last_id, project_ids, scoped, needing_link=not fresh)
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


def _batch_counts(result: _BatchResult) -> dict[str, int]:
    return {
        "created": result.created,
        "matched": result.matched,
        "relinked": result.relinked,
        "removed": result.removed,
        "unchanged": result.unchanged,
        "templates": result.templates,
    }


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
) -> Iterator[None]:
    """Hold every selected project's advisory lock for the whole run (sorted: no deadlocks)."""
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
            _commit_own(engine, holder)
            yield
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

    We hold the scope's locks, so a run of this scope still marked running is a dead one.
    """
    run = connection.execute(
        select(MigrationRun.id)
        .where(
            MigrationRun.kind == RunKind.BACKFILL.value,
            MigrationRun.status == RunStatus.RUNNING.value,
            MigrationRun.params["scope"].as_string() == scope_key,
        )
        .order_by(MigrationRun.id.desc())
        .limit(1)
    ).scalar()
    if run is None:
        return None, None
    last = connection.execute(
        select(func.max(MigrationBatch.key_hi)).where(
            MigrationBatch.run_id == run, MigrationBatch.status == BATCH_DONE
        )
    ).scalar()
    connection.execute(
        update(MigrationRun)
        .where(MigrationRun.id == run)
        .values(status="interrupted", finished_at=func.now())
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
    options = options or BackfillOptions()
    settings = settings or get_settings()
    started = time.monotonic()
    with connect(engine) as connection:
        projects = _project_ids(connection, options.projects)
    scoped = bool(options.projects)
    project_ids = list(projects)
    scope_key = ",".join(sorted(projects.values())) if scoped else "*"
    with _project_locks(engine, project_ids, projects, options.wait):
        with begin(engine) as connection:
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
                },
                key_upper_bound=upper,
            )
        summary = BackfillSummary(
            run_id, options.dry_run, sorted(projects.values()), upper, resumed_after
        )
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
            if run_id is not None and not isinstance(error, KeyboardInterrupt):
                finish_run(engine, run_id, RunStatus.FAILED, error=str(error)[:2000])
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
        "retried": summary.retried,
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
            settings=settings,
            dry_run_seen=dry_run_seen,
            matcher=matcher,
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
    """One batch in one short transaction; lock timeouts and deadlocks retry with backoff."""
    attempt = 0
    while True:
        began = time.perf_counter()
        try:
            with begin(engine) as connection:
                result = work(connection)
                if options.dry_run:
                    connection.rollback()
            summary.batch_seconds.append(time.perf_counter() - began)
            return result
        except DBAPIError as error:
            if not is_retryable(error) or attempt >= options.max_retries:
                raise
            attempt += 1
            summary.retried += 1
            # Exponential backoff with a cap: let the lock holder finish before trying again.
            time.sleep(min(2.0, 0.05 * 2**attempt))
