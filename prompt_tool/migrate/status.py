"""`orch-migrate status`: where the move to templates stands, per project, and whether a project
may be switched to ``templates``.

Per project: its sessions, how many are migrated, unmigrated (a non-NULL legacy text without a
reference) or stale (a reference whose ``legacy_hash`` differs from the sha256 of the current
legacy text, which includes a reference left on a text set to NULL), quarantined (revision
0003: a legacy text a backfill could not import, read from the legacy column; the first few are
named with the reason, and `orch-migrate backfill --retry-quarantined` tries them again), the
flag variant, and the last export, backfill and verify run that covered it. The counts are one
set-based query: the hashes are computed by the database
(:class:`~prompt_tool.db.dialect.sha256_hex`), no legacy text crosses the wire.

A project is *ready* for ``templates`` when it is fully backfilled (nothing unmigrated, nothing
stale) and its last verify passed: a verify that covered it, completed, passed for it, checked
every session (not a sample), and started after its last backfill finished. A project without any
session has nothing to verify and is ready as soon as the schema has the templates tables.
:func:`readiness_guard` turns this into the guard ``flags.set_variant(..., guard=)`` calls before
it writes, which is how ``orch-migrate flag set ... templates`` refuses a project that is not.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    Connection,
    Engine,
    and_,
    case,
    exists,
    false,
    func,
    inspect,
    not_,
    or_,
    select,
)

from prompt_tool import flags
from prompt_tool.ab_testing import LegacyABTest, legacy_orchestration_ab_tests
from prompt_tool.db import schema
from prompt_tool.db.dialect import sha256_hex, unreadable_text
from prompt_tool.db.engine import Connectable, connect
from prompt_tool.db.models import (
    MigrationQuarantine,
    MigrationRun,
    OrchestrationSession,
    Project,
    PromptRole,
    SessionPromptRef,
)
from prompt_tool.db.projects import projects_by_slug
from prompt_tool.db.url import redact
from prompt_tool.errors import PromptToolError, SchemaError
from prompt_tool.migrate.backfill import quarantine
from prompt_tool.migrate.backfill.observe import RunView, recent_backfills
from prompt_tool.migrate.backfill.types import QUARANTINED_SCOPE
from prompt_tool.migrate.runs import MigrationRunStatus, RunKind, dead_runs, life_of
from prompt_tool.migrate.verify import corrupted_versions_by_project

__all__ = [
    "LastRun",
    "NotReadyError",
    "ProjectStatus",
    "Readiness",
    "RecentRun",
    "StatusReport",
    "natural_key",
    "readiness",
    "readiness_guard",
    "status",
]

_SESSIONS = OrchestrationSession.__table__
_REFS = SessionPromptRef.__table__
# The tables the expand step (0002) adds that status reads; below it there is nothing migrated.
_TEMPLATES_TABLES = ("session_prompt_refs", "migration_runs", "feature_flag_states")
_QUARANTINE = MigrationQuarantine.__table__
_QUARANTINE_NAMED = 3  # quarantined rows a project's status names, with the reason
_REPORTED_KINDS = (RunKind.EXPORT, RunKind.BACKFILL, RunKind.VERIFY)
_ALL = "*"


class NotReadyError(PromptToolError):
    """A project (or the default) may not be switched to ``templates`` yet; says what to run."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether a project may be switched to ``templates``; if not, why and what to run."""

    ready: bool
    reasons: list[str]


@dataclass(frozen=True, slots=True)
class LastRun:
    """The latest run of one kind that covered a project (a run over all projects counts)."""

    id: int
    kind: str
    status: str
    all_projects: bool
    started_at: datetime | None
    finished_at: datetime | None
    # verify only: whether it passed for this project, and whether it checked a sample only.
    passed: bool | None = None
    sampled: bool = False
    error: str | None = None
    # live / finished / interrupted / dead, and why (RunState, RunLife).
    state: str = ""
    reason: str = ""

    def describe(self) -> str:
        outcome = self.status
        if self.passed is not None and self.status == MigrationRunStatus.COMPLETED.value:
            outcome = "passed" if self.passed else "FAILED"
        elif self.state and self.state != "finished":
            outcome = self.state
        when = f" {self.started_at:%Y-%m-%d %H:%M}" if self.started_at else ""
        return f"#{self.id} {outcome}{when}"


@dataclass(frozen=True, slots=True)
class RecentRun:
    """One run of the ledger, as `status` lists the latest: where it is and why."""

    id: int
    kind: str
    status: str  # as stored; abandoned for a run marked running whose process is gone
    state: str  # live / finished / interrupted / dead
    scope: str  # the projects it covered, or "all"
    started_at: datetime | None
    finished_at: datetime | None
    started_by: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class ProjectStatus:
    project: str
    sessions: int
    # A partition of ``sessions`` (with ``unreadable``): stale wins over unreadable, and both over
    # unmigrated, when a session is several.
    migrated: int
    unmigrated: int
    stale: int
    flag: str
    flag_source: str
    last_export: LastRun | None
    last_backfill: LastRun | None
    last_verify: LastRun | None
    readiness: Readiness
    # Of ``sessions`` too: a legacy text that is not valid UTF-8 and so cannot be linked.
    unreadable: int = 0
    # Of ``sessions`` too (wins over the others): a legacy text a backfill could not import
    # (revision 0003's quarantine), read from the legacy column; the first few, with the reason.
    quarantined: int = 0
    quarantine_reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StatusReport:
    database: str
    revision: str | None
    head: str
    # False below 0002: no references, no runs, no flags yet.
    templates_schema: bool
    projects: list[ProjectStatus] = field(default_factory=list)
    # A/B tests of legacy orchestration prompts: `prompt-tool ab` cannot run them; each is to be
    # recreated on the template its prompt became.
    legacy_ab_tests: list[LegacyABTest] = field(default_factory=list)
    # The latest runs, the latest of each kind, and every run still marked running, newest first.
    runs: list[RecentRun] = field(default_factory=list)
    # The running backfills and the latest ones: progress, rate, ETA, lock hold (observe).
    backfills: list[RunView] = field(default_factory=list)
    # Set when this prompt-tool does not know the revision (or several are recorded): what to do;
    # nothing else is read then.
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class _Counts:
    sessions: int = 0
    unmigrated: int = 0
    stale: int = 0
    unreadable: int = 0
    quarantined: int = 0
    quarantine_reasons: tuple[str, ...] = ()
    # Versions its sessions reference whose stored digest is not their text's (changed in SQL).
    corrupted: tuple[int, ...] = ()


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key reading digit runs as numbers: project-2 before project-10."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part.casefold())
        for part in re.split(r"(\d+)", name)
        if part
    )


def _head() -> str:
    return next(r.revision for r in schema.history() if r.is_head)


def _database_name(db: Connectable) -> str:
    engine = db if isinstance(db, Engine) else db.engine
    return redact(engine.url)


def _session_counts(
    connection: Connection, project_ids: Sequence[int], with_quarantine: bool
) -> dict[int, _Counts]:
    """Sessions, unmigrated and stale per project: one grouped query, hashes in SQL.
    ``with_quarantine`` (revision 0003): a session not fully linked that holds a quarantined
    role counts as quarantined, not as one of the others."""
    links = {role: _REFS.alias(f"ref_{role.value}") for role in PromptRole}
    stale = or_(
        *(
            and_(
                links[role].c.session_id.is_not(None),
                links[role].c.legacy_hash.is_distinct_from(
                    sha256_hex(_SESSIONS.c[role.legacy_column])
                ),
            )
            for role in PromptRole
        )
    )
    unmigrated = or_(
        *(
            and_(_SESSIONS.c[role.legacy_column].is_not(None), links[role].c.session_id.is_(None))
            for role in PromptRole
        )
    )
    # Text that is not valid UTF-8 (SQLite): no backfill can link it, it stays on the legacy path.
    unreadable = or_(
        *(
            and_(
                unreadable_text(_SESSIONS.c[role.legacy_column]), links[role].c.session_id.is_(None)
            )
            for role in PromptRole
        )
    )
    held = (
        and_(
            or_(stale, unmigrated),
            exists().where(_QUARANTINE.c.session_id == _SESSIONS.c.id),
        )
        if with_quarantine
        else false()
    )
    joined: Any = _SESSIONS
    for role, link in links.items():
        joined = joined.outerjoin(
            link, and_(link.c.session_id == _SESSIONS.c.id, link.c.role == role.value)
        )
    query = (
        select(
            _SESSIONS.c.project_id,
            func.count().label("sessions"),
            func.sum(case((held, 1), else_=0)).label("quarantined"),
            func.sum(case((and_(not_(held), stale), 1), else_=0)).label("stale"),
            func.sum(case((and_(not_(held), not_(stale), unreadable), 1), else_=0)).label(
                "unreadable"
            ),
            func.sum(
                case((and_(not_(held), not_(stale), not_(unreadable), unmigrated), 1), else_=0)
            ).label("unmigrated"),
        )
        .select_from(joined)
        .where(_SESSIONS.c.project_id.in_(list(project_ids)))
        .group_by(_SESSIONS.c.project_id)
    )
    return {
        row.project_id: _Counts(
            int(row.sessions),
            int(row.unmigrated or 0),
            int(row.stale or 0),
            int(row.unreadable or 0),
            int(row.quarantined or 0),
        )
        for row in connection.execute(query)
    }


def _name_quarantined(connection: Connection, counts: dict[int, _Counts]) -> None:
    """The first few quarantined rows of each project that has any, with the reason."""
    for project_id, count in counts.items():
        if count.quarantined:
            named = quarantine.named(connection, [project_id], limit=_QUARANTINE_NAMED)
            counts[project_id] = dataclasses.replace(
                count, quarantine_reasons=tuple(line for _, line in named)
            )


def _legacy_counts(connection: Connection, project_ids: Sequence[int]) -> dict[int, _Counts]:
    """Below 0002 nothing is migrated: every session with a legacy text is unmigrated."""
    has_text = or_(*(_SESSIONS.c[role.legacy_column].is_not(None) for role in PromptRole))
    query = (
        select(
            _SESSIONS.c.project_id,
            func.count().label("sessions"),
            func.sum(case((has_text, 1), else_=0)).label("unmigrated"),
        )
        .where(_SESSIONS.c.project_id.in_(list(project_ids)))
        .group_by(_SESSIONS.c.project_id)
    )
    return {
        row.project_id: _Counts(int(row.sessions), int(row.unmigrated or 0), 0)
        for row in connection.execute(query)
    }


def _covered(run: Any, slugs: Mapping[int, str]) -> set[str] | None:
    """The slugs a run covered (``None``: every project)."""
    if run.project_id is not None:
        return {slugs.get(run.project_id, "")}
    summary = run.summary or {}
    if run.kind == RunKind.VERIFY.value and isinstance(summary.get("projects"), dict):
        return {str(slug) for slug in summary["projects"]}
    params = run.params or {}
    scope = params.get("scope")
    if isinstance(scope, str):
        scope = scope.removesuffix(QUARANTINED_SCOPE)  # a --retry-quarantined run's scope
        return None if scope in ("", _ALL) else set(scope.split(","))
    named = params.get("projects")
    if isinstance(named, list) and named:
        return {str(slug) for slug in named}
    return None


def _verify_outcome(run: Any, slug: str) -> tuple[bool | None, bool]:
    """(passed for ``slug``, sampled) of a verify run."""
    sampled = (run.params or {}).get("sample") is not None
    if run.status != MigrationRunStatus.COMPLETED.value:
        return None, sampled
    summary = run.summary or {}
    per_project = summary.get("projects")
    if isinstance(per_project, dict) and isinstance(per_project.get(slug), dict):
        return bool(per_project[slug].get("passed")), sampled
    return bool(summary.get("passed")), sampled


def _last_runs(connection: Connection, slugs: Mapping[int, str]) -> dict[str, dict[str, LastRun]]:
    """Per project slug and kind, the latest run that covered it.

    Read from the ledger rather than :func:`~prompt_tool.migrate.runs.last_runs`, which keys a
    run over several named projects as a run over all of them. The ledger has one row per
    operator run, so reading the three kinds whole is cheap.
    """
    latest: dict[str, dict[str, LastRun]] = {slug: {} for slug in slugs.values()}
    ledger = MigrationRun.__table__
    runs = connection.execute(
        select(ledger)
        .where(ledger.c.kind.in_([kind.value for kind in _REPORTED_KINDS]))
        .order_by(ledger.c.id)
    ).all()
    # A run still marked running whose process (or server backend) is gone shows as dead.
    dead = dead_runs(connection, runs)
    for run in runs:
        covered = _covered(run, slugs)
        for slug in latest if covered is None else covered & latest.keys():
            passed, sampled = (
                _verify_outcome(run, slug) if run.kind == RunKind.VERIFY.value else (None, False)
            )
            life = life_of(run, dead)
            latest[slug][run.kind] = LastRun(
                id=run.id,
                kind=run.kind,
                status=MigrationRunStatus.ABANDONED.value if run.id in dead else run.status,
                all_projects=covered is None,
                started_at=run.started_at,
                finished_at=run.finished_at,
                passed=passed,
                sampled=sampled,
                error=run.error,
                state=life.state.value,
                reason=life.reason,
            )
    return latest


_RECENT = 10


def _recent_runs(connection: Connection) -> list[RecentRun]:
    """The latest runs, the latest of each kind, and every run still marked running, newest
    first."""
    ledger = MigrationRun.__table__
    latest = select(ledger.c.id).order_by(ledger.c.id.desc()).limit(_RECENT).scalar_subquery()
    latest_of_kind = select(func.max(ledger.c.id)).group_by(ledger.c.kind).scalar_subquery()
    runs = connection.execute(
        select(ledger, Project.slug)
        .outerjoin(Project, Project.id == ledger.c.project_id)
        .where(
            or_(
                ledger.c.id.in_(latest),
                ledger.c.id.in_(latest_of_kind),
                ledger.c.status == MigrationRunStatus.RUNNING.value,
            )
        )
        .order_by(ledger.c.id.desc())
    ).all()
    dead = dead_runs(connection, runs)
    recent = []
    for run in runs:
        life = life_of(run, dead)
        params = run.params if isinstance(run.params, dict) else {}
        scope = run.slug or params.get("scope") or "*"
        recent.append(
            RecentRun(
                id=run.id,
                kind=run.kind,
                status=MigrationRunStatus.ABANDONED.value if run.id in dead else run.status,
                state=life.state.value,
                scope="all" if scope == _ALL else str(scope),
                started_at=run.started_at,
                finished_at=run.finished_at,
                started_by=run.started_by,
                reason=life.reason,
            )
        )
    return recent


def _flag_variants(db: Connectable, templates_schema: bool) -> dict[str, tuple[str, str]]:
    """(variant, where it comes from) per project slug, as stored."""
    if not templates_schema:
        return {}
    listing = flags.list_flags(db if isinstance(db, Engine) else db.engine)
    if listing.kill_switch:
        kill = (flags.Variant.LEGACY.value, flags.DecisionSource.KILL_SWITCH.value)
        every = [*listing.without_override, *(s.project_slug for s in listing.overrides)]
        return {slug: kill for slug in every if slug}
    default = (
        (listing.default.variant, flags.DecisionSource.DEFAULT.value)
        if listing.default is not None
        else (listing.builtin_default, flags.DecisionSource.BUILTIN_DEFAULT.value)
    )
    variants = {slug: default for slug in listing.without_override}
    for state in listing.overrides:
        if state.project_slug:
            variants[state.project_slug] = (state.variant, flags.DecisionSource.OVERRIDE.value)
    return variants


def _readiness_of(
    slug: str,
    counts: _Counts,
    runs: Mapping[str, LastRun],
    templates_schema: bool,
    revision: str | None,
) -> Readiness:
    if not templates_schema:
        return Readiness(
            False,
            [
                f"the schema is at {revision or 'no revision'}, before the templates tables: "
                "run `orch-migrate db upgrade`"
            ],
        )
    reasons: list[str] = []
    verify_command = f"`orch-migrate verify --project {slug}`"
    if counts.unmigrated or counts.stale:
        pending = " and ".join(
            f"{number} {what}"
            for number, what in ((counts.unmigrated, "unmigrated"), (counts.stale, "stale"))
            if number
        )
        noun = "session" if counts.unmigrated + counts.stale == 1 else "sessions"
        reasons.append(f"{pending} {noun}: run `orch-migrate backfill --project {slug}`")
    if counts.unreadable:
        noun = "session holds" if counts.unreadable == 1 else "sessions hold"
        reasons.append(
            f"{counts.unreadable} {noun} legacy text that is not valid UTF-8, which no backfill "
            f"can link (`orch-migrate backfill --project {slug}` names them): correct those "
            "bytes, then backfill"
        )
    if counts.quarantined:
        noun = "session holds" if counts.quarantined == 1 else "sessions hold"
        reasons.append(
            f"{counts.quarantined} {noun} legacy text a backfill could not import (quarantined, "
            "read from the legacy column; the reasons are listed): fix the cause (e.g. raise "
            f"{quarantine.LIMIT_SETTING}), then `orch-migrate backfill --retry-quarantined "
            f"--project {slug}`"
        )
    if counts.sessions == 0:
        return Readiness(not reasons, reasons)
    verify = runs.get(RunKind.VERIFY.value)
    backfill = runs.get(RunKind.BACKFILL.value)
    if verify is None:
        reasons.append(f"no verify has checked it: run {verify_command}")
    elif verify.status != MigrationRunStatus.COMPLETED.value:
        reasons.append(
            f"its last verify (run {verify.id}) is {verify.status}: run {verify_command}"
        )
    elif not verify.passed:
        reasons.append(
            f"its last verify (run {verify.id}) found differences: fix them (the report of "
            f"{verify_command} shows them) and verify again"
        )
    elif verify.sampled:
        reasons.append(
            f"its last verify (run {verify.id}) checked a sample only: run {verify_command}"
        )
    elif backfill is not None and _older(verify, backfill):
        reasons.append(
            f"its last verify (run {verify.id}) is older than its last backfill (run "
            f"{backfill.id}): run {verify_command}"
        )
    if counts.corrupted:  # last: what the verify said comes first
        ids = ", ".join(str(version) for version in counts.corrupted)
        reasons.append(
            f"template versions {ids} no longer match their stored digest (their text was "
            "changed in the database): restore them from an export, then verify"
        )
    return Readiness(not reasons, reasons)


def _older(verify: LastRun, backfill: LastRun) -> bool:
    """Whether ``verify`` did not start after ``backfill`` finished (or it has not finished)."""
    if verify.id < backfill.id or backfill.finished_at is None:
        return True
    return verify.started_at is not None and verify.started_at < backfill.finished_at


def _collect(
    db: Connectable, only: Sequence[str], *, with_flags: bool = True
) -> tuple[str | None, bool, list[ProjectStatus]]:
    with connect(db) as connection:
        tables = set(inspect(connection).get_table_names())
        if "projects" not in tables or "orchestration_sessions" not in tables:
            raise SchemaError(
                f"{_database_name(db)} has no prompt-tool tables; run `orch-migrate db upgrade` "
                "(or `db stamp 0001` for a legacy deployment) first"
            )
        revision = MigrationContext.configure(connection).get_current_revision()
        templates_schema = all(table in tables for table in _TEMPLATES_TABLES)
        # Revision 0003: a database at 0002 has no quarantine (and status still works there).
        with_quarantine = templates_schema and MigrationQuarantine.__tablename__ in tables
        by_id = projects_by_slug(connection, only)
        slugs = dict(sorted(by_id.items(), key=lambda project: natural_key(project[1])))
        if templates_schema:
            counts = _session_counts(connection, list(slugs), with_quarantine)
            _name_quarantined(connection, counts)
            for project_id, versions in corrupted_versions_by_project(
                connection, list(slugs)
            ).items():
                counts[project_id] = dataclasses.replace(
                    counts.get(project_id, _Counts()), corrupted=tuple(versions)
                )
            runs = _last_runs(connection, slugs)
        else:
            counts = _legacy_counts(connection, list(slugs))
            runs = {slug: {} for slug in slugs.values()}
    variants = _flag_variants(db, templates_schema) if with_flags else {}
    fallback = (flags.BUILTIN_DEFAULT.value, flags.DecisionSource.BUILTIN_DEFAULT.value)
    projects = []
    for project_id, slug in slugs.items():
        count = counts.get(project_id, _Counts())
        project_runs = runs.get(slug, {})
        variant, source = variants.get(slug, fallback)
        projects.append(
            ProjectStatus(
                project=slug,
                sessions=count.sessions,
                migrated=(
                    count.sessions
                    - count.unmigrated
                    - count.stale
                    - count.unreadable
                    - count.quarantined
                ),
                unmigrated=count.unmigrated,
                stale=count.stale,
                unreadable=count.unreadable,
                quarantined=count.quarantined,
                quarantine_reasons=list(count.quarantine_reasons),
                flag=variant,
                flag_source=source,
                last_export=project_runs.get(RunKind.EXPORT.value),
                last_backfill=project_runs.get(RunKind.BACKFILL.value),
                last_verify=project_runs.get(RunKind.VERIFY.value),
                readiness=_readiness_of(slug, count, project_runs, templates_schema, revision),
            )
        )
    return revision, templates_schema, projects


def status(db: Connectable, *, projects: Sequence[str] = ()) -> StatusReport:
    """Where every project (or the ``projects`` named by slug) stands. See the module."""
    with connect(db) as connection:
        recorded = schema.recorded_revisions(connection)
    problem = schema.revision_problem(_database_name(db), recorded)
    if problem is not None:
        shown = ",".join(sorted(recorded))
        return StatusReport(_database_name(db), shown, _head(), False, problem=problem)
    revision, templates_schema, found = _collect(db, projects)
    selected = {p.project for p in found}
    recent: list[RecentRun] = []
    backfills: list[RunView] = []
    if templates_schema:
        with connect(db) as connection:
            recent = _recent_runs(connection)
            backfills = recent_backfills(connection)
    return StatusReport(
        database=_database_name(db),
        revision=revision,
        head=_head(),
        templates_schema=templates_schema,
        projects=found,
        legacy_ab_tests=sorted(
            (test for test in legacy_orchestration_ab_tests(db) if test.project in selected),
            key=lambda test: (natural_key(test.project), test.id),
        ),
        runs=recent,
        backfills=backfills,
    )


def readiness(db: Connectable, project: str) -> Readiness:
    """Whether ``project`` may be switched to ``templates``; the reasons say what to run."""
    _, _, found = _collect(db, [project], with_flags=False)
    return found[0].readiness


def _not_ready_message(what: str, reasons: Iterable[str]) -> str:
    return f"{what} is not ready for templates: {'; '.join(reasons)}; or pass --force"


def readiness_guard(db: Connectable) -> flags.Guard:
    """The guard for ``flags.set_variant``/``set_default``: refuses ``templates`` unless ready.

    A project must be ready itself; the default may become ``templates`` only when every project
    that follows it (no override of its own) is ready. Other variants always pass.
    """

    def guard(change: flags.PendingChange) -> None:
        if change.new_variant is not flags.Variant.TEMPLATES:
            return
        if change.project_slug is not None:
            found = readiness(db, change.project_slug)
            if not found.ready:
                raise NotReadyError(
                    _not_ready_message(f"project {change.project_slug}", found.reasons)
                )
            return
        engine = db if isinstance(db, Engine) else db.engine
        following = flags.list_flags(engine).without_override
        if not following:
            return
        blocked = [p for p in status(db, projects=following).projects if not p.readiness.ready]
        if blocked:
            raise NotReadyError(
                _not_ready_message(
                    f"the default (followed by {', '.join(following)})",
                    (f"{p.project}: {', '.join(p.readiness.reasons)}" for p in blocked),
                )
            )

    return guard
