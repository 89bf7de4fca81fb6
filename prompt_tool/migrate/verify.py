"""`orch-migrate verify`: does the templates path give back every legacy text, byte for byte?

For every selected session and role it classifies what the read shim's ``templates`` path
would return: matched (the rendered reference equals the legacy text), mismatched, unmigrated
(no reference yet), stale (the legacy text changed after the reference was made), render error,
unreadable (its stored bytes are not valid UTF-8: never read, named by session id and column;
backfill leaves it unlinked, so like an unmigrated one it fails the check unless
``allow_unmigrated``: the templates path serves it from the legacy column), quarantined (a text a
backfill could not import, in revision 0003's quarantine: served from the legacy column, and
blocking as an unmigrated one does; the report names the first few with the reason).
Nearly every imported text is a *literal* version (no brace, no declared variable: it renders
to its own source), and those are settled in the database by comparing the legacy text with
the version's source, byte for byte, which costs less than digesting it. Every other text is
digested in the database (SHA-256) and grouped: a batch comes back as one row per (project,
role, version, variables, legacy digest) with its count, so Python work is per distinct
template use, not per session; each distinct (version, variables) pair is rendered once and
its digest compared. Legacy texts never cross the wire except for the first few mismatches,
whose diffs are shown. Sessions are streamed in keyset batches: memory stays flat.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    case,
    cast,
    false,
    func,
    inspect,
    literal,
    null,
    or_,
    select,
    true,
    union_all,
)
from sqlalchemy.types import Text

from prompt_tool.core import content_hash
from prompt_tool.core.errors import TemplateError
from prompt_tool.core.textdiff import unified_diff
from prompt_tool.db.dialect import read_only, set_local_planner, sha256_hex, unreadable_text
from prompt_tool.db.engine import Connectable, connect
from prompt_tool.db.models import (
    MigrationQuarantine,
    OrchestrationSession,
    Prompt,
    PromptRole,
    PromptVersion,
    SessionPromptRef,
)
from prompt_tool.db.projects import projects_by_slug
from prompt_tool.db.revision_guard import require_known_revision
from prompt_tool.db.revisions import EXPAND
from prompt_tool.migrate.backfill.quarantine import named
from prompt_tool.migrate.runs import MigrationRunStatus, RunKind, finish_run, start_read_run
from prompt_tool.templates import ResolvedTemplate, TemplateManager, load_versions

__all__ = [
    "Mismatch",
    "ProjectVerification",
    "VerifyOptions",
    "VerifyReport",
    "corrupted_versions",
    "corrupted_versions_by_project",
    "verify",
]

_SESSIONS = OrchestrationSession.__table__
_REFS = SessionPromptRef.__table__
_RENDER_MEMO_SIZE = 100_000


@dataclass(frozen=True, slots=True)
class VerifyOptions:
    projects: Sequence[str] = ()
    sample: int | None = None
    allow_unmigrated: bool = False
    # Sessions per batch query. Each query pays fixed costs (scanning the versions, hashing
    # the references' range): 500,000 took 8.4 s for 1,000,000 sessions where 200,000 took 9.3
    # to 11.3. Memory stays flat either way: a batch comes back grouped.
    batch_size: int = 500_000
    show_diffs: int = 3
    # Read in read-only transactions and record no run (a replica, a read-only user).
    readonly: bool = False


@dataclass
class ProjectVerification:
    project: str
    checked: int = 0
    matched: int = 0
    mismatched: int = 0
    unmigrated: int = 0
    stale: int = 0
    render_errors: int = 0
    # Legacy texts that are not valid UTF-8: backfill leaves them unlinked, so the templates
    # path serves them from the legacy column, as it does unmigrated ones; they block as those
    # do (``--allow-unmigrated`` accepts both) and the report names them.
    unreadable: int = 0
    # Texts a backfill could not import (the quarantine, revision 0003): served from the legacy
    # column, unlinked (or linked to an older text); they block as unmigrated ones do.
    quarantined: int = 0

    def passed(self, allow_unmigrated: bool) -> bool:
        blocking = self.mismatched + self.render_errors
        if not allow_unmigrated:
            blocking += self.unmigrated + self.stale + self.unreadable + self.quarantined
        return blocking == 0


@dataclass(frozen=True, slots=True)
class Mismatch:
    session_id: int
    project: str
    role: str
    version_id: int
    kind: str  # "mismatch" or "render_error"
    diff: str


@dataclass
class VerifyReport:
    # None: the run is not in the ledger, and ``not_recorded`` says why (the report is whole).
    run_id: int | None
    passed: bool
    allow_unmigrated: bool
    sampled: int | None
    projects: list[ProjectVerification]
    mismatches: list[Mismatch] = field(default_factory=list)
    elapsed_s: float = 0.0
    # The first unreadable legacy texts, each as "table id N column" (all are counted).
    unreadable: list[str] = field(default_factory=list)
    not_recorded: str | None = None
    # Versions whose stored digest is not the sha256 of their text (changed in the database
    # behind the tool's back): they fail the verify whatever they render to.
    corrupted_versions: list[int] = field(default_factory=list)
    # The first quarantined rows, each as "table id N column: reason" (all are counted).
    quarantined: list[str] = field(default_factory=list)

    def totals(self) -> ProjectVerification:
        total = ProjectVerification("(all)")
        for p in self.projects:
            for name in (
                "checked",
                "matched",
                "mismatched",
                "unmigrated",
                "stale",
                "render_errors",
                "unreadable",
                "quarantined",
            ):
                setattr(total, name, getattr(total, name) + getattr(p, name))
        return total


class _RenderedDigests:
    """sha256 of each distinct (version, variables) rendering, or the error: rendered once."""

    def __init__(self, manager: TemplateManager) -> None:
        self._manager = manager
        self._digests: OrderedDict[tuple[int, str, str], str | TemplateError] = OrderedDict()

    def digest(
        self, template: ResolvedTemplate, variables_json: str, project: str
    ) -> str | TemplateError:
        # The project is part of the key: an include resolves through its hierarchy.
        key = (template.version_id, variables_json, project)
        found = self._digests.get(key)
        if found is not None:
            self._digests.move_to_end(key)
            return found
        try:
            variables = json.loads(variables_json) if variables_json else {}
            rendered = self._manager.render_resolved(template, variables or {}, project=project)
            outcome: str | TemplateError = content_hash(rendered)
        except TemplateError as error:
            outcome = error
        self._digests[key] = outcome
        if len(self._digests) > _RENDER_MEMO_SIZE:
            self._digests.popitem(last=False)
        return outcome

    def known(self, version_id: int, variables_json: str, project: str) -> bool:
        return (version_id, variables_json, project) in self._digests

    def known_digest(
        self, version_id: int, variables_json: str, project: str
    ) -> str | TemplateError | None:
        key = (version_id, variables_json, project)
        found = self._digests.get(key)
        if found is not None:
            self._digests.move_to_end(key)
        return found

    def text(self, template: ResolvedTemplate, variables_json: str, project: str) -> str:
        variables = json.loads(variables_json) if variables_json else {}
        return self._manager.render_resolved(template, variables or {}, project=project)


def _batch_bounds(
    connection: Connection, after: int, limit: int, project_ids: Sequence[int], sample_ids: Any
) -> tuple[int | None, int]:
    """The last id and the number of the next ``limit`` selected sessions after ``after``."""
    batch = (
        select(_SESSIONS.c.id).where(_SESSIONS.c.id > after).order_by(_SESSIONS.c.id).limit(limit)
    )
    if project_ids:
        batch = batch.where(_SESSIONS.c.project_id.in_(list(project_ids)))
    if sample_ids is not None:
        batch = batch.where(_SESSIONS.c.id.in_(sample_ids))
    ids = batch.subquery()
    last, count = connection.execute(select(func.max(ids.c.id), func.count())).one()
    return (None if last is None else int(last)), int(count)


_UNMIGRATED, _STALE, _CHECK, _MATCHED = "unmigrated", "stale", "check", "matched"
_UNREADABLE = "unreadable"
_QUARANTINED = "quarantined"
_QUARANTINE = MigrationQuarantine.__table__
_UNREADABLE_NAMED = 20


def _literal_versions() -> Any:
    """The versions whose source has no brace and whose template declares no variable: they
    render to their own source in any project, with any variables; with their digest. The
    conditions are filters of this subquery, so the planner applies them once per version,
    scanning the versions."""
    # Compared as text: anything but an empty list (or none) is left to the renderer.
    declared = func.coalesce(cast(Prompt.declared_variables, Text), literal("[]"))
    return (
        select(PromptVersion.id, PromptVersion.content, PromptVersion.content_hash)
        .join(Prompt, Prompt.id == PromptVersion.prompt_id)
        .where(
            ~PromptVersion.content.contains("{"),
            declared.in_(["[]", "null"]),
            # The stored digest is checked, not trusted: a match needs the reference's digest
            # to be the text's, and only here is it computed (once per version, not per text).
            PromptVersion.content_hash == sha256_hex(PromptVersion.content),
        )
        .subquery()
    )


def _groups_query(
    after: int, last: int, project_ids: Sequence[int], sample_ids: Any, quarantine: bool
) -> Any:
    """Every (session, role) of the key range (after, last], classified and grouped in SQL.

    Settled in SQL, without a digest: a role whose text equals, byte for byte, the source of
    its version when that source has no brace and its template declares no variable (so it
    renders to itself in any project, with any variables: the read shim serves it as it is by
    the same rule), and whose reference was made for that text. Nearly every imported text is
    one, and comparing two texts costs the database less than digesting one. Every other role
    comes back digested and grouped by (project, role, version, variables, legacy digest), for
    Python to render each distinct pair once and compare. One row per group with how many
    session roles it stands for and one of them (for diffs). Roles whose text is NULL and that
    have no reference are left out: NULL stays NULL. With ``quarantine`` (revision 0003), a
    role in the backfill quarantine that is unlinked or linked to another text is quarantined.
    """
    in_range = and_(_SESSIONS.c.id > after, _SESSIONS.c.id <= last)
    if project_ids:
        in_range = and_(in_range, _SESSIONS.c.project_id.in_(list(project_ids)))
    if sample_ids is not None:
        in_range = and_(in_range, _SESSIONS.c.id.in_(sample_ids))
    # Each session row is read once and unpivoted into its roles (a cross join with the role
    # names, the text picked by CASE), and the references are joined on (session, role) in
    # one pass. One query branch per role read the sessions, the references and the literal
    # versions three times: in one backend, a batch of 500,000 sessions took 5.6-5.9 s, now
    # 3.9-4.0 s; with PostgreSQL's parallel workers about the same as before (3.4-3.6 s).
    role_names = union_all(
        *(select(literal(each.value).label("role")) for each in PromptRole)
    ).subquery("roles")
    role = role_names.c.role
    legacy_text = case(
        *((role == each.value, _SESSIONS.c[each.legacy_column]) for each in PromptRole)
    )
    unreadable = unreadable_text(legacy_text)
    literal_versions = _literal_versions()
    settled = and_(
        legacy_text == literal_versions.c.content,
        _REFS.c.legacy_hash == literal_versions.c.content_hash,
    )
    held = _QUARANTINE.c.session_id.is_not(None) if quarantine else false()
    joined = (
        select(
            _SESSIONS.c.id.label("session_id"),
            _SESSIONS.c.project_id.label("project_id"),
            role.label("role"),
            legacy_text.is_(None).label("no_text"),
            unreadable.label("unreadable"),
            # Only the digest leaves this subquery, not the text (NULL for a settled role): a
            # parallel plan then gathers short rows. Its workers read the texts themselves.
            case((settled, null()), else_=sha256_hex(legacy_text)).label("legacy_hash"),
            _REFS.c.prompt_version_id.label("version_id"),
            _REFS.c.legacy_hash.label("linked_hash"),
            cast(_REFS.c.variables, Text).label("variables"),
            held.label("held"),
        )
        .select_from(_SESSIONS.join(role_names, true()))
        .outerjoin(
            _REFS,
            and_(
                _REFS.c.session_id == _SESSIONS.c.id,
                _REFS.c.role == role,
                # The same key range on the references: a range scan of this batch's
                # references, never a scan of the whole table per batch.
                _REFS.c.session_id > after,
                _REFS.c.session_id <= last,
            ),
        )
        .outerjoin(literal_versions, literal_versions.c.id == _REFS.c.prompt_version_id)
    )
    if quarantine:
        joined = joined.outerjoin(
            _QUARANTINE,
            and_(
                _QUARANTINE.c.session_id == _SESSIONS.c.id,
                _QUARANTINE.c.role == role,
                _QUARANTINE.c.session_id > after,
                _QUARANTINE.c.session_id <= last,
            ),
        )
    rows = (
        joined.where(in_range, ~and_(legacy_text.is_(None), _REFS.c.prompt_version_id.is_(None)))
        # A fence (OFFSET 0 keeps PostgreSQL from pulling the subquery up): the digest
        # compares and hashes texts, and pulled up, that would be repeated wherever the
        # classification below names it.
        .offset(0)
        .subquery()
    )
    # A linked role with a text and no digest was settled (a NULL text has no digest either).
    is_settled = and_(rows.c.legacy_hash.is_(None), ~rows.c.no_text)
    not_linked_to_it = or_(
        rows.c.version_id.is_(None),
        and_(~is_settled, rows.c.linked_hash.is_distinct_from(rows.c.legacy_hash)),
    )
    kind = case(
        # Not valid UTF-8: never read or rendered; each such role is its own group, to be named.
        (rows.c.unreadable, literal(_UNREADABLE)),
        # In the quarantine and not linked to its text: served from the legacy column.
        (and_(rows.c.held, not_linked_to_it), literal(_QUARANTINED)),
        (rows.c.version_id.is_(None), literal(_UNMIGRATED)),
        (is_settled, literal(_MATCHED)),
        (rows.c.linked_hash.is_distinct_from(rows.c.legacy_hash), literal(_STALE)),
        else_=literal(_CHECK),
    )
    checked = kind == literal(_CHECK)
    version = case((checked, rows.c.version_id), else_=null())
    variables = case((checked, rows.c.variables), else_=null())
    digest = case((checked, rows.c.legacy_hash), else_=null())
    alone = case((kind == literal(_UNREADABLE), rows.c.session_id), else_=null())
    return select(
        rows.c.project_id,
        rows.c.role,
        kind.label("kind"),
        version.label("version_id"),
        variables.label("variables"),
        digest.label("legacy_hash"),
        func.count().label("n"),
        func.min(rows.c.session_id).label("session_id"),
    ).group_by(rows.c.project_id, rows.c.role, kind, version, variables, digest, alone)


def _diff(engine: Connectable, session_id: int, role: PromptRole, rendered: str) -> str:
    with connect(engine) as connection:
        legacy = (
            connection.execute(
                select(_SESSIONS.c[role.legacy_column]).where(_SESSIONS.c.id == session_id)
            ).scalar_one_or_none()
            or ""
        )
    return unified_diff(
        legacy,
        rendered,
        f"session {session_id} {role.value} (legacy)",
        f"session {session_id} {role.value} (templates)",
    )


def verify(
    engine: Connectable,
    options: VerifyOptions | None = None,
    *,
    manager: TemplateManager | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Compare the templates path with the legacy text for the selected sessions."""
    require_known_revision(engine, "verify", needs=EXPAND)
    options = options or VerifyOptions()
    quarantine = _has_quarantine(engine)
    engine = read_only(engine) if options.readonly else engine
    manager = manager if manager is not None else TemplateManager(engine)
    started = time.monotonic()
    with connect(engine) as connection:
        projects = projects_by_slug(connection, options.projects)
        scope = list(projects) if options.projects else []
        sample_ids = None
        if options.sample is not None:
            chosen = select(_SESSIONS.c.id).order_by(func.random()).limit(options.sample)
            if scope:
                chosen = chosen.where(_SESSIONS.c.project_id.in_(scope))
            sample_ids = [session_id for (session_id,) in connection.execute(chosen)]
        total_query = select(func.count()).select_from(_SESSIONS)
        if scope:
            total_query = total_query.where(_SESSIONS.c.project_id.in_(scope))
        total = (
            len(sample_ids)
            if sample_ids is not None
            else connection.execute(total_query).scalar_one()
        )
    run = start_read_run(
        engine,
        RunKind.VERIFY,
        readonly=options.readonly,
        project_id=scope[0] if len(scope) == 1 else None,
        params={
            "scope": ",".join(sorted(projects[p] for p in scope)) or "*",
            "sample": options.sample,
            "allow_unmigrated": options.allow_unmigrated,
        },
    )
    counts_of = {project_id: ProjectVerification(slug) for project_id, slug in projects.items()}
    run_id = run.id
    report = VerifyReport(run_id, False, options.allow_unmigrated, options.sample, [])
    report.not_recorded = run.not_recorded
    renders = _RenderedDigests(manager)
    try:
        after, seen = 0, 0
        while True:
            with connect(engine) as connection:
                if not isinstance(engine, Connection):  # SET LOCAL: not in the caller's
                    _tune(connection)
                last, count = _batch_bounds(
                    connection, after, options.batch_size, scope, sample_ids
                )
                if last is None:
                    break
                groups = connection.execute(
                    _groups_query(after, last, scope, sample_ids, quarantine)
                ).all()
                _render_batch(connection, groups, renders, projects)
            after = last
            seen += count
            for group in groups:
                _classify(engine, group, counts_of[group.project_id], renders, report, options)
            if progress is not None:
                progress(seen, total)
    except BaseException as error:
        finish_run(engine, run_id, MigrationRunStatus.FAILED, error=str(error)[:2000])
        raise
    report.projects = sorted(counts_of.values(), key=lambda counts: counts.project)
    _name_what_fails(engine, report, scope)
    report.passed = not report.corrupted_versions and all(
        p.passed(options.allow_unmigrated) for p in report.projects
    )
    report.elapsed_s = time.monotonic() - started
    finish_run(
        engine,
        run_id,
        MigrationRunStatus.COMPLETED,
        summary={
            "passed": report.passed,
            "corrupted_versions": report.corrupted_versions,
            "projects": {
                p.project: {**p.__dict__, "passed": p.passed(options.allow_unmigrated)}
                for p in report.projects
            },
        },
    )
    return report


def _has_quarantine(engine: Connectable) -> bool:
    """Whether revision 0003's quarantine table is here (a database at 0002 has none)."""
    with connect(engine) as connection:
        return inspect(connection).has_table(MigrationQuarantine.__tablename__)


def _name_what_fails(engine: Connectable, report: VerifyReport, scope: Sequence[int]) -> None:
    """The versions whose text was changed in the database, and the first quarantined rows."""
    with connect(engine) as connection:
        report.corrupted_versions = corrupted_versions(connection, scope)
        if any(p.quarantined for p in report.projects):
            report.quarantined = [line for _, line in named(connection, scope, _UNREADABLE_NAMED)]


_VERSION_CHUNK = 2_000


def corrupted_versions(connection: Connection, project_ids: Sequence[int] = ()) -> list[int]:
    """The ids of template versions whose stored digest is not the sha256 of their text: the
    text was changed in the database, behind the tool's back (every version may be changed
    only by adding a new one). With ``project_ids``, those the projects' sessions reference;
    else every version. The digest is computed by the database, once per version."""
    query = select(PromptVersion.id).where(
        PromptVersion.content_hash.is_not(None),
        PromptVersion.content_hash != sha256_hex(PromptVersion.content),
    )
    if project_ids:
        referenced = (
            select(_REFS.c.prompt_version_id)
            .join(_SESSIONS, _SESSIONS.c.id == _REFS.c.session_id)
            .where(_SESSIONS.c.project_id.in_(list(project_ids)))
        )
        query = query.where(PromptVersion.id.in_(referenced))
    return [int(version) for version in connection.scalars(query.order_by(PromptVersion.id))]


def corrupted_versions_by_project(
    connection: Connection, project_ids: Sequence[int]
) -> dict[int, list[int]]:
    """:func:`corrupted_versions` referenced by each project's sessions, in one query."""
    rows = connection.execute(
        select(_SESSIONS.c.project_id, PromptVersion.id)
        .distinct()
        .join(_REFS, _REFS.c.session_id == _SESSIONS.c.id)
        .join(PromptVersion, PromptVersion.id == _REFS.c.prompt_version_id)
        .where(
            _SESSIONS.c.project_id.in_(list(project_ids)),
            PromptVersion.content_hash.is_not(None),
            PromptVersion.content_hash != sha256_hex(PromptVersion.content),
        )
        .order_by(_SESSIONS.c.project_id, PromptVersion.id)
    )
    found: dict[int, list[int]] = {}
    for project_id, version_id in rows:
        found.setdefault(int(project_id), []).append(int(version_id))
    return found


def _tune(connection: Connection) -> None:
    """For this batch's transaction: no JIT (it spent most of a second compiling each batch's
    query, measured 854 ms of 4.2 s, and the query runs once), and room to hash the batch's
    join in memory (the default 4 MB spilled it to disk in four batches)."""
    set_local_planner(connection, jit=False, work_mem_mb=64)


def _render_batch(
    connection: Connection,
    groups: Sequence[Any],
    renders: _RenderedDigests,
    projects: dict[int, str],
) -> None:
    """Render every (version, variables) pair of the batch not rendered yet, loading the
    versions in chunks: memory stays flat however many distinct versions a batch holds."""
    wanted: dict[int, set[tuple[str, str]]] = {}
    for group in groups:
        if group.kind != _CHECK:
            continue
        variables = group.variables or ""
        project = projects[group.project_id]
        if not renders.known(group.version_id, variables, project):
            wanted.setdefault(group.version_id, set()).add((variables, project))
    ids = sorted(wanted)
    for start in range(0, len(ids), _VERSION_CHUNK):
        templates = load_versions(connection, set(ids[start : start + _VERSION_CHUNK]))
        for version_id, template in templates.items():
            for variables, project in sorted(wanted[version_id]):
                renders.digest(template, variables, project)


def _classify(
    engine: Connectable,
    group: Any,
    counts: ProjectVerification,
    renders: _RenderedDigests,
    report: VerifyReport,
    options: VerifyOptions,
) -> None:
    """Count one group of session roles (see :func:`_groups_query`) in its project's counts."""
    project = counts.project
    counts.checked += group.n
    if group.kind == _UNREADABLE:
        counts.unreadable += group.n
        if len(report.unreadable) < _UNREADABLE_NAMED:
            column = PromptRole(group.role).legacy_column
            table = OrchestrationSession.__tablename__
            report.unreadable.append(f"{table} id {group.session_id} {column}")
        return
    if group.kind == _UNMIGRATED:
        counts.unmigrated += group.n
        return
    if group.kind == _QUARANTINED:
        counts.quarantined += group.n
        return
    if group.kind == _STALE:
        counts.stale += group.n
        return
    if group.kind == _MATCHED:
        counts.matched += group.n
        return
    variables = group.variables or ""
    role = PromptRole(group.role)
    digest = renders.known_digest(group.version_id, variables, project)
    template: ResolvedTemplate | None = None
    if digest is None:  # rendered in this batch, then evicted by a bigger one: once more
        with connect(engine) as connection:
            template = load_versions(connection, {group.version_id})[group.version_id]
        digest = renders.digest(template, variables, project)
    if isinstance(digest, TemplateError):
        counts.render_errors += group.n
        error = digest
        _keep_failure(
            report,
            options,
            lambda: Mismatch(
                group.session_id, project, role.value, group.version_id, "render_error", str(error)
            ),
        )
    elif digest == group.legacy_hash:
        counts.matched += group.n
    else:
        counts.mismatched += group.n

        def diff() -> str:
            shown = template
            if shown is None:
                with connect(engine) as connection:
                    shown = load_versions(connection, {group.version_id})[group.version_id]
            rendered = renders.text(shown, variables, project)
            return _diff(engine, group.session_id, role, rendered)

        _keep_failure(
            report,
            options,
            lambda: Mismatch(
                group.session_id, project, role.value, group.version_id, "mismatch", diff()
            ),
        )


def _keep_failure(
    report: VerifyReport, options: VerifyOptions, failure: Callable[[], Mismatch]
) -> None:
    """Keep the first few failures, with their detail (a diff is only made for those)."""
    if len(report.mismatches) < options.show_diffs:
        report.mismatches.append(failure())
