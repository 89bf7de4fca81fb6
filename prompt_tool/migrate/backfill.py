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
    Connection,
    and_,
    delete,
    func,
    insert,
    literal,
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
    acquire_advisory_lock,
    insert_for,
    is_retryable,
    release_advisory_lock,
    set_local_timeouts,
    sha256_hex,
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
    TemplateLabel,
)
from prompt_tool.errors import InvalidInputError, NotFoundError, PromptToolError
from prompt_tool.migrate.runs import RunKind, RunStatus, finish_run, start_run
from prompt_tool.settings import Settings, get_settings

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
    max_retries: int = 5

    def __post_init__(self) -> None:
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
    references_relinked: int = 0
    references_removed: int = 0
    references_unchanged: int = 0
    templates_created: int = 0
    retried: int = 0
    elapsed_s: float = 0.0
    batch_seconds: list[float] = field(default_factory=list, repr=False)

    @property
    def changed(self) -> bool:
        return bool(
            self.references_created
            or self.references_relinked
            or self.references_removed
            or self.templates_created
        )

    def describe(self) -> str:
        verb = "would change" if self.dry_run else "changed"
        if not self.changed:
            return (
                f"backfill: nothing to do; {self.sessions_scanned:,} sessions already linked "
                f"({self.batches} batches, {self.elapsed_s:.1f}s)"
            )
        return (
            f"backfill {verb}: {self.references_created:,} references created, "
            f"{self.references_relinked:,} re-linked (stale), {self.references_removed:,} removed, "
            f"{self.templates_created:,} templates imported; {self.sessions_scanned:,} sessions in "
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
    links = {role: _REFS.alias(f"ref_{role.value}") for role in PromptRole}
    query = select(
        batch,
        *(links[role].c.legacy_hash.label(f"linked_{role.value}") for role in PromptRole),
        *(links[role].c.session_id.label(f"has_{role.value}") for role in PromptRole),
    ).select_from(batch)
    for role, link in links.items():
        query = query.outerjoin(
            link, and_(link.c.session_id == batch.c.id, link.c.role == role.value)
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


def _existing_imports(connection: Connection, wanted: set[tuple[int, str]]) -> set[tuple[int, str]]:
    if not wanted:
        return set()
    rows = connection.execute(
        select(Prompt.project_id, Prompt.name).where(
            Prompt.scope == Scope.PROJECT.value,
            tuple_(Prompt.project_id, Prompt.name).in_(sorted(wanted)),
        )
    )
    return {(project_id, name) for project_id, name in rows if project_id is not None}


def _import_templates(connection: Connection, missing: dict[tuple[int, str], _RoleState]) -> int:
    """Create one imported template per distinct missing text: literal source, version 1."""
    if not missing:
        return 0
    by_session: dict[tuple[int, PromptRole], tuple[int, str]] = {
        (state.session_id, state.role): key for key, state in missing.items()
    }
    texts: dict[tuple[int, str], str] = {}
    for role in PromptRole:
        session_ids = [sid for (sid, r) in by_session if r is role]
        if not session_ids:
            continue
        column = _SESSIONS.c[role.legacy_column]
        for session_id, legacy in connection.execute(
            select(_SESSIONS.c.id, column).where(_SESSIONS.c.id.in_(session_ids))
        ):
            if legacy is not None:
                texts[by_session[(session_id, role)]] = legacy
    rows = []
    for (project_id, name), legacy in texts.items():
        source = literal_template(legacy)
        rows.append(
            {
                "project_id": project_id,
                "name": name,
                "content": source,
                "category": "imported",
                "is_template": True,
                "prompt_type": PromptType.ORCHESTRATION_TEMPLATE.value,
                "scope": Scope.PROJECT.value,
                "description": "Imported from legacy session text by orch-migrate backfill",
                "tags": ["imported", name.split("/")[1]],
                "declared_variables": [],
                "content_hash": content_hash(source),
            }
        )
    if not rows:
        return 0
    statement = insert_for(connection, Prompt.__table__).on_conflict_do_nothing(
        index_elements=["project_id", "name"], index_where=text("scope = 'project'")
    )
    connection.execute(statement, rows)
    created = connection.execute(
        select(Prompt.id, Prompt.content, Prompt.content_hash)
        .where(
            Prompt.scope == Scope.PROJECT.value,
            tuple_(Prompt.project_id, Prompt.name).in_(sorted(texts)),
        )
        .where(~select(PromptVersion.id).where(PromptVersion.prompt_id == Prompt.id).exists())
    ).all()
    if not created:
        return 0
    connection.execute(
        insert(PromptVersion),
        [
            {
                "prompt_id": prompt_id,
                "version": 1,
                "content": source,
                "content_hash": digest,
                "created_by": ACTOR,
                "change_note": "imported from legacy session text",
            }
            for prompt_id, source, digest in created
        ],
    )
    versions = connection.execute(
        select(PromptVersion.prompt_id, PromptVersion.id).where(
            PromptVersion.prompt_id.in_([prompt_id for prompt_id, _, _ in created])
        )
    ).all()
    connection.execute(
        insert(TemplateLabel),
        [
            {
                "prompt_id": prompt_id,
                "label": label,
                "prompt_version_id": version_id,
                "moved_by": ACTOR,
            }
            for prompt_id, version_id in versions
            for label in ("latest", "production")
        ],
    )
    return len(created)


def _upsert_references(
    connection: Connection, after: int, last: int, project_ids: Sequence[int], scoped: bool
) -> None:
    """Link every session of the batch to the imported template of its current text.

    Set-based: one INSERT ... SELECT; an existing reference is rewritten only when its hash
    differs (the legacy text changed since it was made).
    """
    in_batch = and_(
        _SESSIONS.c.id > after, _SESSIONS.c.id <= last, _session_filter(project_ids, scoped)
    )
    texts = union_all(
        *(
            select(
                _SESSIONS.c.id.label("session_id"),
                _SESSIONS.c.project_id.label("project_id"),
                literal(role.value).label("role"),
                sha256_hex(_SESSIONS.c[role.legacy_column]).label("legacy_hash"),
            ).where(in_batch, _SESSIONS.c[role.legacy_column].is_not(None))
            for role in PromptRole
        )
    ).subquery()
    name = literal(IMPORTED_PREFIX) + texts.c.role + literal("/") + texts.c.legacy_hash
    source = (
        select(
            texts.c.session_id,
            texts.c.role,
            PromptVersion.id,
            texts.c.legacy_hash,
            literal(SOURCE_BACKFILL),
        )
        .join(
            Prompt,
            and_(
                Prompt.project_id == texts.c.project_id,
                Prompt.scope == Scope.PROJECT.value,
                Prompt.name == name,
            ),
        )
        .join(PromptVersion, and_(PromptVersion.prompt_id == Prompt.id, PromptVersion.version == 1))
        .where(true())  # SQLite needs a WHERE before ON CONFLICT in INSERT ... SELECT
    )
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
) -> _BatchResult | None:
    set_local_timeouts(
        connection, settings.migration_lock_timeout_ms, settings.migration_statement_timeout_ms
    )
    states = _batch_states(connection, after, upper, size, project_ids, scoped)
    if not states:
        return None
    last_id = states[-1].session_id
    result = _BatchResult(last_id=last_id, sessions=len(states) // len(PromptRole))
    wanted: dict[tuple[int, str], _RoleState] = {}
    removals: list[tuple[int, str]] = []
    for state in states:
        if state.legacy_hash is None:
            if state.has_reference:
                removals.append((state.session_id, state.role.value))
                result.removed += 1
            continue
        if not state.has_reference:
            result.created += 1
        elif state.linked_hash != state.legacy_hash:
            result.relinked += 1
        else:
            result.unchanged += 1
            continue
        wanted.setdefault((state.project_id, imported_name(state.role, state.legacy_hash)), state)
    existing = _existing_imports(connection, set(wanted))
    missing = {key: state for key, state in wanted.items() if key not in existing}
    if options.dry_run:
        result.templates = len(missing)
        return result
    result.templates = _import_templates(connection, missing)
    if result.created or result.relinked:
        _upsert_references(connection, after, last_id, project_ids, scoped)
    _remove_references(connection, removals)
    if run_id is not None:
        connection.execute(
            insert(MigrationBatch).values(
                run_id=run_id,
                key_lo=after,
                key_hi=last_id,
                status="done",
                rows_seen=result.sessions,
                counts={
                    "created": result.created,
                    "relinked": result.relinked,
                    "removed": result.removed,
                    "unchanged": result.unchanged,
                    "templates": result.templates,
                },
                checksum=_checksum(states),
                finished_at=func.now(),
            )
        )
    return result


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
        select(func.max(MigrationBatch.key_hi)).where(MigrationBatch.run_id == run)
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
            resumed_after, _ = (
                (None, None) if options.dry_run else _resume_point(connection, scope_key)
            )
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
                },
                key_upper_bound=upper,
            )
        summary = BackfillSummary(
            run_id, options.dry_run, sorted(projects.values()), upper, resumed_after
        )
        try:
            _walk(
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
            )
        except BaseException as error:
            if run_id is not None and not isinstance(error, KeyboardInterrupt):
                finish_run(engine, run_id, RunStatus.FAILED, error=str(error)[:2000])
            raise
        summary.elapsed_s = time.monotonic() - started
        if run_id is not None:
            finish_run(engine, run_id, RunStatus.COMPLETED, summary=_summary_dict(summary))
    return summary


def _summary_dict(summary: BackfillSummary) -> dict[str, Any]:
    return {
        "batches": summary.batches,
        "sessions_scanned": summary.sessions_scanned,
        "references_created": summary.references_created,
        "references_relinked": summary.references_relinked,
        "references_removed": summary.references_removed,
        "templates_created": summary.templates_created,
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
) -> None:
    while options.limit is None or summary.sessions_scanned < options.limit:
        size = options.batch_size
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
        )
        result = _with_retries(engine, options, summary, batch)
        if result is None:
            break
        after = result.last_id
        summary.batches += 1
        summary.sessions_scanned += result.sessions
        summary.references_created += result.created
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
