"""The template manager: orchestration templates stored as prompts of their own type.

A template lives in a scope (global, project, custom) and has immutable versions; labels
(``production``, ``latest``, ...) point at versions and every move is recorded, so the history
is the audit trail. Names resolve custom -> project -> global for a (project, user), through a
short-lived in-process cache, an optional shared Redis cache, then the database.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, TypeAlias

from sqlalchemy import Connection, and_, case, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from prompt_tool.core import TemplateEngine, content_hash
from prompt_tool.core.errors import TemplateNotFound
from prompt_tool.core.textdiff import unified_diff
from prompt_tool.db.dialect import one_of
from prompt_tool.db.engine import Connectable, make_engine, make_session_factory
from prompt_tool.db.models import (
    Project,
    Prompt,
    PromptType,
    PromptVersion,
    Scope,
    TemplateEvent,
    TemplateLabel,
    TemplatePermission,
)
from prompt_tool.db.projects import create_project, get_project, list_projects
from prompt_tool.db.revision_guard import require_known_revision
from prompt_tool.db.revisions import EXPAND
from prompt_tool.errors import InvalidInputError
from prompt_tool.settings import Settings, get_settings
from prompt_tool.templates.cache import NameCache, RedisSourceCache
from prompt_tool.templates.permissions import (
    Action,
    Grant,
    check_template_access,
    grant_role,
    list_grants,
    revoke_role,
)
from prompt_tool.templates.types import (
    DEFAULT_LABEL,
    LATEST_LABEL,
    HistoryEntry,
    LabelMove,
    PublishResult,
    RenderedTemplate,
    ResolvedTemplate,
    TemplateAddress,
    TemplateSummary,
    VersionInfo,
)

__all__ = ["ProjectInfo", "TemplateDetail", "TemplateManager"]

_LABEL_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,49}$")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,199}$")
_TEMPLATE = PromptType.ORCHESTRATION_TEMPLATE.value
# Resolution order: the most specific scope wins.
_SCOPE_RANK = case(
    (Prompt.scope == Scope.CUSTOM.value, 0), (Prompt.scope == Scope.PROJECT.value, 1), else_=2
)


# The name cache's key: (project, user, name, label, version). A plain tuple, built, hashed
# and compared in C on every render; building a NamedTuple costs a Python-level call (~0.3 us,
# a tenth of a warm render's own overhead). The loader reads it as a _Wanted.
_NameKey: TypeAlias = tuple[str | None, str | None, str, str, int | None]
_NAME: Final = 2


class _Wanted(NamedTuple):
    """What a name cache key asks for, by field."""

    project: str | None
    user: str | None
    name: str
    label: str
    version: int | None


@dataclass(frozen=True, slots=True)
class ProjectInfo:
    id: int
    slug: str
    name: str


@dataclass(frozen=True, slots=True)
class TemplateDetail:
    summary: TemplateSummary
    version: VersionInfo
    source: str


def _check_name(name: str) -> None:
    if not _NAME_PATTERN.match(name):
        raise InvalidInputError(
            f"template name {name!r} must start with a letter or digit and use only letters, "
            "digits and _ . / - (at most 200)"
        )


def _check_label(label: str) -> None:
    if not _LABEL_PATTERN.match(label):
        raise InvalidInputError(
            f"label {label!r} must be lowercase letters, digits, _ . - (at most 50)"
        )


def _check_address(address: TemplateAddress) -> None:
    _check_name(address.name)
    if address.scope is Scope.GLOBAL and (address.project or address.owner):
        raise InvalidInputError("a global template has no --project and no owner")
    if address.scope is Scope.PROJECT and (not address.project or address.owner):
        raise InvalidInputError("a project template needs --project (and has no owner)")
    if address.scope is Scope.CUSTOM and not (address.project and address.owner):
        raise InvalidInputError("a custom template needs --project and its owner (--as USER)")


def find_template(session: Session, address: TemplateAddress, *, lock: bool = False) -> Prompt:
    """The orchestration template at ``address`` (``lock``: FOR UPDATE), or TemplateNotFound."""
    query = select(Prompt).where(
        Prompt.prompt_type == _TEMPLATE,
        Prompt.scope == address.scope.value,
        Prompt.name == address.name,
    )
    if address.project is not None:
        query = query.where(Prompt.project_id == get_project(session, address.project).id)
    if address.scope is Scope.CUSTOM:
        query = query.where(Prompt.owner == address.owner)
    if lock:
        query = query.with_for_update()
    prompt = session.scalars(query).one_or_none()
    if prompt is None:
        raise TemplateNotFound(
            f"{address.describe()} does not exist",
            hint="`prompt-tool templates list` shows the templates",
        )
    return prompt


# What a ResolvedTemplate is built from, in this order (see resolved_from_row).
VERSION_COLUMNS = (
    PromptVersion.id,
    PromptVersion.version,
    PromptVersion.content,
    PromptVersion.content_hash,
    Prompt.id,
    Prompt.name,
    Prompt.scope,
    Prompt.declared_variables,
)


def resolved_from_row(row: Sequence[Any]) -> ResolvedTemplate:
    """A ResolvedTemplate from a row that starts with :data:`VERSION_COLUMNS`."""
    version_id, version, source, digest, template_id, name, scope, declared = row[:8]
    return ResolvedTemplate(
        name=name,
        scope=scope or "global",
        template_id=template_id,
        version_id=version_id,
        version=version,
        source=source,
        content_hash=digest or content_hash(source),
        declared_variables=tuple(declared or ()),
    )


def load_versions(
    connection: Connection, version_ids: Collection[int]
) -> dict[int, ResolvedTemplate]:
    """The versions with these ids, by id, as templates pinned by a reference (no name lookup)."""
    if not version_ids:
        return {}
    rows = connection.execute(
        select(*VERSION_COLUMNS)
        .join(Prompt, Prompt.id == PromptVersion.prompt_id)
        .where(one_of(connection, PromptVersion.id, sorted(version_ids)))
    )
    return {row[0]: resolved_from_row(row) for row in rows}


class TemplateManager:
    """Store, resolve, render and audit orchestration templates."""

    def __init__(
        self,
        engine: Connectable,
        *,
        settings: Settings | None = None,
        template_engine: TemplateEngine | None = None,
        names: NameCache[_NameKey, ResolvedTemplate] | None = None,
        shared_cache: RedisSourceCache | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.engine = engine
        self.template_engine = template_engine or TemplateEngine(settings=self.settings)
        self._sessions: sessionmaker[Session] = make_session_factory(engine)
        self._names: NameCache[_NameKey, ResolvedTemplate] = (
            names if names is not None else NameCache(self.settings.name_cache_ttl_s)
        )
        self._shared = (
            shared_cache
            if shared_cache is not None
            else RedisSourceCache.from_settings(self.settings)
        )
        self._project_ids: dict[str, int] = {}

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> TemplateManager:
        return cls(make_engine(url), **kwargs)

    @contextmanager
    def _unit(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def _writing(self, action: str, needs: str | None = EXPAND) -> Iterator[Session]:
        """A unit of work that writes: refused first on a schema this prompt-tool does not know
        (checked once per engine, see :mod:`prompt_tool.db.revision_guard`)."""
        require_known_revision(self.engine, action, needs=needs)
        with self._unit() as session:
            yield session

    # --- lookups -------------------------------------------------------------------------

    def _project(self, session: Session, slug: str | None) -> Project | None:
        return get_project(session, slug) if slug else None

    def _project_id(self, session: Session, slug: str) -> int:
        # Project ids never change, so the slug -> id map needs no expiry.
        if slug not in self._project_ids:
            self._project_ids[slug] = get_project(session, slug).id
        return self._project_ids[slug]

    def _find(self, session: Session, address: TemplateAddress, *, lock: bool = False) -> Prompt:
        return find_template(session, address, lock=lock)

    def _version(self, session: Session, prompt: Prompt, number: int) -> PromptVersion:
        version = session.scalars(
            select(PromptVersion).where(
                PromptVersion.prompt_id == prompt.id, PromptVersion.version == number
            )
        ).one_or_none()
        if version is None:
            raise TemplateNotFound(
                f"template {prompt.name!r} has no version {number}",
                hint="`prompt-tool templates history` lists its versions",
            )
        return version

    def _labels(self, session: Session, prompt_ids: Sequence[int]) -> dict[int, dict[str, int]]:
        labels: dict[int, dict[str, int]] = {prompt_id: {} for prompt_id in prompt_ids}
        if not prompt_ids:
            return labels
        rows = session.execute(
            select(TemplateLabel.prompt_id, TemplateLabel.label, PromptVersion.version)
            .join(PromptVersion, PromptVersion.id == TemplateLabel.prompt_version_id)
            .where(TemplateLabel.prompt_id.in_(prompt_ids))
        )
        for prompt_id, label, version in rows:
            labels[prompt_id][label] = version
        return labels

    def _check(
        self, session: Session, actor: str, action: Action, address: TemplateAddress
    ) -> Project | None:
        project = self._project(session, address.project)
        check_template_access(
            session,
            actor,
            action,
            what=address.describe(),
            scope=address.scope,
            project=project,
            owner=address.owner,
        )
        return project

    # --- validation ----------------------------------------------------------------------

    def _include_loader(self, project: str | None, user: str | None) -> Callable[[str], str | None]:
        """Includes, imports and extends resolve through the same hierarchy as names do."""

        def load(name: str) -> str | None:
            try:
                return self.resolve(name, project=project, user=user).source
            except TemplateNotFound:
                return None

        return load

    def validate(
        self,
        address: TemplateAddress,
        source: str,
        declared_variables: Sequence[Mapping[str, Any]] | None = None,
    ) -> Any:
        """Check ``source`` as if it were stored at ``address``; raise on any problem."""
        _check_address(address)
        return self.template_engine.validate(
            source,
            name=address.name,
            declared_variables=declared_variables,
            loader=self._include_loader(address.project, address.owner),
        )

    # --- writes --------------------------------------------------------------------------

    def _record(
        self,
        session: Session,
        prompt: Prompt,
        action: str,
        actor: str,
        *,
        label: str | None = None,
        from_id: int | None = None,
        to_id: int | None = None,
        note: str | None = None,
    ) -> None:
        session.add(
            TemplateEvent(
                prompt_id=prompt.id,
                action=action,
                label=label,
                from_version_id=from_id,
                to_version_id=to_id,
                actor=actor,
                note=note,
            )
        )

    def _point(
        self,
        session: Session,
        prompt: Prompt,
        label: str,
        version: PromptVersion,
        actor: str,
        *,
        action: str = "label_moved",
        note: str | None = None,
    ) -> int | None:
        """Point ``label`` at ``version``; return the version number it pointed at before."""
        current = session.get(TemplateLabel, (prompt.id, label))
        before = current.prompt_version_id if current else None
        if current is None:
            session.add(
                TemplateLabel(
                    prompt_id=prompt.id, label=label, prompt_version_id=version.id, moved_by=actor
                )
            )
        else:
            current.prompt_version_id = version.id
            current.moved_by = actor
            current.moved_at = func.now()  # type: ignore[assignment,unused-ignore]
        self._record(
            session, prompt, action, actor, label=label, from_id=before, to_id=version.id, note=note
        )
        if before is None:
            return None
        return session.get_one(PromptVersion, before).version

    def _changed(self, address: TemplateAddress, project_id: int | None) -> None:
        """Forget cached resolutions at once in this process, and in others through Redis."""
        self._names.invalidate_where(lambda key: key[_NAME] == address.name)
        if self._shared is not None:
            self._shared.bump_epoch(None if address.scope is Scope.GLOBAL else project_id)

    def create(
        self,
        address: TemplateAddress,
        source: str,
        *,
        actor: str,
        category: str | None = None,
        tags: Sequence[str] = (),
        description: str | None = None,
        variables: Sequence[Mapping[str, Any]] = (),
        note: str | None = None,
    ) -> PublishResult:
        """Store a new template as version 1, labelled ``latest`` and ``production``."""
        _check_address(address)
        declared = [dict(v) for v in variables]
        with self._writing("create a template") as session:
            project = self._check(session, actor, Action.EDIT, address)
            try:
                self._find(session, address)
            except TemplateNotFound:
                pass
            else:
                raise InvalidInputError(
                    f"{address.describe()} already exists; use `prompt-tool templates update`"
                )
            self.validate(address, source, declared or None)
            digest = content_hash(source)
            prompt = Prompt(
                project_id=project.id if project else None,
                name=address.name,
                content=source,
                category=category,
                is_template=True,
                prompt_type=_TEMPLATE,
                scope=address.scope.value,
                owner=address.owner,
                description=description,
                tags=list(tags),
                declared_variables=declared,
                content_hash=digest,
            )
            session.add(prompt)
            session.flush()
            version = PromptVersion(
                prompt_id=prompt.id,
                version=1,
                content=source,
                created_by=actor,
                change_note=note,
                content_hash=digest,
            )
            session.add(version)
            session.flush()
            self._record(session, prompt, "version_created", actor, to_id=version.id, note=note)
            for label in (LATEST_LABEL, DEFAULT_LABEL):
                self._point(session, prompt, label, version, actor)
            result = PublishResult(
                address, 1, version.id, True, {LATEST_LABEL: 1, DEFAULT_LABEL: 1}
            )
        self._changed(address, prompt.project_id)
        return result

    def update(
        self,
        address: TemplateAddress,
        source: str,
        *,
        actor: str,
        note: str | None = None,
        promote: bool = False,
    ) -> PublishResult:
        """Store ``source`` as a new version (``latest``; also ``production`` with ``promote``).

        Text identical to the latest version creates nothing and says so.
        """
        _check_address(address)
        with self._writing("update a template") as session:
            self._check(session, actor, Action.EDIT, address)
            prompt = self._find(session, address, lock=True)
            latest_number = session.scalar(
                select(func.max(PromptVersion.version)).where(PromptVersion.prompt_id == prompt.id)
            )
            assert latest_number is not None
            latest = self._version(session, prompt, latest_number)
            digest = content_hash(source)
            if latest.content_hash == digest and latest.content == source:
                return PublishResult(address, latest.version, latest.id, False)
            self.validate(address, source, prompt.declared_variables or None)
            version = PromptVersion(
                prompt_id=prompt.id,
                version=latest.version + 1,
                content=source,
                created_by=actor,
                change_note=note,
                content_hash=digest,
            )
            session.add(version)
            session.flush()
            self._record(session, prompt, "version_created", actor, to_id=version.id, note=note)
            labels = [LATEST_LABEL] + ([DEFAULT_LABEL] if promote else [])
            for label in labels:
                self._point(session, prompt, label, version, actor)
            session.execute(
                update(Prompt)
                .where(Prompt.id == prompt.id)
                .values(content=source, content_hash=digest, updated_at=func.now())
            )
            result = PublishResult(
                address, version.version, version.id, True, dict.fromkeys(labels, version.version)
            )
        self._changed(address, prompt.project_id)
        return result

    def move_label(
        self,
        address: TemplateAddress,
        label: str,
        version: int,
        *,
        actor: str,
        note: str | None = None,
    ) -> LabelMove:
        """Point ``label`` at an existing ``version`` (recorded: who, when, from which to which)."""
        _check_address(address)
        _check_label(label)
        with self._writing("move a label") as session:
            self._check(session, actor, Action.EDIT, address)
            prompt = self._find(session, address, lock=True)
            target = self._version(session, prompt, version)
            before = self._point(session, prompt, label, target, actor, note=note)
        self._changed(address, prompt.project_id)
        return LabelMove(address, label, before, target.version)

    def rollback(
        self,
        address: TemplateAddress,
        *,
        actor: str,
        label: str = DEFAULT_LABEL,
        to_version: int | None = None,
        note: str | None = None,
    ) -> LabelMove:
        """Move ``label`` back: to ``to_version``, else to where it pointed before its last move."""
        _check_address(address)
        _check_label(label)
        with self._writing("roll a template back") as session:
            self._check(session, actor, Action.EDIT, address)
            prompt = self._find(session, address, lock=True)
            if to_version is not None:
                target = self._version(session, prompt, to_version)
            else:
                current = session.get(TemplateLabel, (prompt.id, label))
                previous_id = session.scalar(
                    select(TemplateEvent.from_version_id)
                    .where(
                        TemplateEvent.prompt_id == prompt.id,
                        TemplateEvent.label == label,
                        TemplateEvent.to_version_id
                        == (current.prompt_version_id if current else None),
                        TemplateEvent.from_version_id.is_not(None),
                    )
                    .order_by(TemplateEvent.id.desc())
                    .limit(1)
                )
                if previous_id is None:
                    raise InvalidInputError(
                        f"label {label!r} of {address.describe()} has no earlier version to roll "
                        "back to; name one with --to-version"
                    )
                target = session.get_one(PromptVersion, previous_id)
            before = self._point(
                session, prompt, label, target, actor, action="rollback", note=note
            )
        self._changed(address, prompt.project_id)
        return LabelMove(address, label, before, target.version, rollback=True)

    # --- reads ---------------------------------------------------------------------------

    def _summaries(
        self, session: Session, rows: Sequence[tuple[Prompt, str | None]]
    ) -> list[TemplateSummary]:
        prompt_ids = [prompt.id for prompt, _ in rows]
        labels = self._labels(session, prompt_ids)
        latest: dict[int, int] = {}
        if prompt_ids:
            rows_by_prompt = session.execute(
                select(PromptVersion.prompt_id, func.max(PromptVersion.version))
                .where(PromptVersion.prompt_id.in_(prompt_ids))
                .group_by(PromptVersion.prompt_id)
            )
            latest = {prompt_id: number for prompt_id, number in rows_by_prompt}
        return [
            TemplateSummary(
                template_id=prompt.id,
                name=prompt.name,
                scope=prompt.scope or Scope.GLOBAL.value,
                project=slug,
                owner=prompt.owner,
                category=prompt.category,
                tags=tuple(prompt.tags or ()),
                description=prompt.description,
                declared_variables=tuple(prompt.declared_variables or ()),
                labels=labels[prompt.id],
                latest_version=latest.get(prompt.id, 0),
            )
            for prompt, slug in rows
        ]

    def list_templates(
        self,
        *,
        actor: str | None = None,
        project: str | None = None,
        scope: Scope | None = None,
        category: str | None = None,
        tag: str | None = None,
        search: str | None = None,
    ) -> list[TemplateSummary]:
        """Templates with their labels and latest version, in a constant number of statements.

        With ``actor``, only what that user may view.
        """
        with self._unit() as session:
            query = (
                select(Prompt, Project.slug)
                .outerjoin(Project, Project.id == Prompt.project_id)
                .where(Prompt.prompt_type == _TEMPLATE)
                .order_by(Prompt.scope, Project.slug.nulls_first(), Prompt.owner, Prompt.name)
            )
            if project:
                project_id = self._project_id(session, project)
                query = query.where(or_(Prompt.project_id == project_id, Prompt.scope == "global"))
            if scope is not None:
                query = query.where(Prompt.scope == scope.value)
            if category:
                query = query.where(Prompt.category == category)
            if search:
                pattern = f"%{search.lower()}%"
                query = query.where(
                    or_(
                        func.lower(Prompt.name).like(pattern),
                        func.lower(func.coalesce(Prompt.description, "")).like(pattern),
                    )
                )
            rows: list[tuple[Prompt, str | None]] = [
                (prompt, slug) for prompt, slug in session.execute(query)
            ]
            if tag:
                rows = [(p, s) for p, s in rows if tag in (p.tags or ())]
            if actor is not None:
                rows = self._visible(session, actor, rows)
            return self._summaries(session, rows)

    def _visible(
        self, session: Session, actor: str, rows: list[tuple[Prompt, str | None]]
    ) -> list[tuple[Prompt, str | None]]:
        roles = {
            project_id: role
            for project_id, role in session.execute(
                select(TemplatePermission.project_id, TemplatePermission.role).where(
                    TemplatePermission.user_name == actor
                )
            )
        }
        if roles.get(None) == "admin":
            return rows

        def can_view(prompt: Prompt) -> bool:
            if prompt.scope == Scope.GLOBAL.value:
                return True
            if prompt.scope == Scope.CUSTOM.value:
                return prompt.owner == actor
            return prompt.project_id in roles

        return [(p, s) for p, s in rows if can_view(p)]

    def show(
        self,
        address: TemplateAddress,
        *,
        actor: str | None = None,
        version: int | None = None,
        label: str = DEFAULT_LABEL,
    ) -> TemplateDetail:
        """A template's metadata and the source of one version (default: its ``production``)."""
        _check_address(address)
        with self._unit() as session:
            if actor is not None:
                self._check(session, actor, Action.VIEW, address)
            prompt = self._find(session, address)
            slug = address.project
            (summary,) = self._summaries(session, [(prompt, slug)])
            number = version if version is not None else summary.labels.get(label)
            if number is None:
                raise TemplateNotFound(
                    f"{address.describe()} has no label {label!r}",
                    hint="`prompt-tool templates show` lists its labels",
                )
            chosen = self._version(session, prompt, number)
            return TemplateDetail(summary, self._version_info(chosen), chosen.content)

    @staticmethod
    def _version_info(version: PromptVersion) -> VersionInfo:
        return VersionInfo(
            version=version.version,
            version_id=version.id,
            content_hash=version.content_hash or content_hash(version.content),
            created_by=version.created_by,
            created_at=version.created_at,
            change_note=version.change_note,
        )

    def history(self, address: TemplateAddress, *, actor: str | None = None) -> list[HistoryEntry]:
        """The audit trail, oldest first: versions published, labels moved, rollbacks."""
        _check_address(address)
        with self._unit() as session:
            if actor is not None:
                self._check(session, actor, Action.VIEW, address)
            prompt = self._find(session, address)
            numbers = {
                version_id: number
                for version_id, number in session.execute(
                    select(PromptVersion.id, PromptVersion.version).where(
                        PromptVersion.prompt_id == prompt.id
                    )
                )
            }
            events = session.scalars(
                select(TemplateEvent)
                .where(TemplateEvent.prompt_id == prompt.id)
                .order_by(TemplateEvent.id)
            )
            return [
                HistoryEntry(
                    at=event.created_at,
                    action=event.action,
                    actor=event.actor,
                    label=event.label,
                    from_version=numbers.get(event.from_version_id)
                    if event.from_version_id
                    else None,
                    to_version=numbers.get(event.to_version_id) if event.to_version_id else None,
                    note=event.note,
                )
                for event in events
            ]

    def versions(self, address: TemplateAddress) -> list[VersionInfo]:
        with self._unit() as session:
            prompt = self._find(session, address)
            return [
                self._version_info(v)
                for v in session.scalars(
                    select(PromptVersion)
                    .where(PromptVersion.prompt_id == prompt.id)
                    .order_by(PromptVersion.version)
                )
            ]

    def diff(
        self,
        address: TemplateAddress,
        from_version: int,
        to_version: int,
        *,
        actor: str | None = None,
    ) -> str:
        """A unified diff between two versions of one template."""
        _check_address(address)
        with self._unit() as session:
            if actor is not None:
                self._check(session, actor, Action.VIEW, address)
            prompt = self._find(session, address)
            old = self._version(session, prompt, from_version)
            new = self._version(session, prompt, to_version)
            return unified_diff(
                old.content,
                new.content,
                f"{address.name}@v{from_version}",
                f"{address.name}@v{to_version}",
            )

    # --- projects and roles (one unit of work each, for the CLI) -------------------------

    def create_project(self, slug: str, name: str | None = None) -> ProjectInfo:
        with self._writing("create a project", needs=None) as session:
            project = create_project(session, slug, name)
            return ProjectInfo(project.id, project.slug, project.name)

    def projects(self) -> list[ProjectInfo]:
        with self._unit() as session:
            return [ProjectInfo(p.id, p.slug, p.name) for p in list_projects(session)]

    def grant(self, actor: str, user: str, role: str, project: str | None) -> Grant:
        with self._writing("grant a role") as session:
            return grant_role(session, actor, user, role, project)

    def revoke(self, actor: str, user: str, project: str | None) -> None:
        with self._writing("revoke a role") as session:
            revoke_role(session, actor, user, project)

    def roles(self, project: str | None = None) -> list[Grant]:
        with self._unit() as session:
            return list_grants(session, project)

    # --- resolution and rendering --------------------------------------------------------

    def _load_resolution(self, name_key: _NameKey) -> ResolvedTemplate:
        key = _Wanted(*name_key)
        project_id = None
        if key.project:
            project_id = self._project_ids.get(key.project)
            if project_id is None:
                with self._unit() as session:
                    project_id = self._project_id(session, key.project)
        cache_key = f"{key.user or ''}\x1f{key.name}\x1f{key.label}\x1f{key.version or ''}"
        # Redis first, outside any transaction: a shared hit costs no database round trip.
        if self._shared is not None:
            cached = self._shared.get(project_id, cache_key)
            if cached is not None:
                return ResolvedTemplate.from_cache(cached)
        with self._unit() as session:
            resolved = self._query_resolution(session, project_id, key)
        if self._shared is not None:
            self._shared.set(project_id, cache_key, resolved.to_cache())
        return resolved

    def _query_resolution(
        self, session: Session, project_id: int | None, key: _Wanted
    ) -> ResolvedTemplate:
        scopes = [Prompt.scope == Scope.GLOBAL.value]
        if project_id is not None:
            scopes.append(
                and_(Prompt.scope == Scope.PROJECT.value, Prompt.project_id == project_id)
            )
            if key.user:
                scopes.append(
                    and_(
                        Prompt.scope == Scope.CUSTOM.value,
                        Prompt.project_id == project_id,
                        Prompt.owner == key.user,
                    )
                )
        query = (
            select(Prompt.id, Prompt.scope, Prompt.declared_variables, PromptVersion)
            .where(Prompt.prompt_type == _TEMPLATE, Prompt.name == key.name, or_(*scopes))
            .order_by(_SCOPE_RANK)
            .limit(1)
        )
        if key.version is not None:
            query = query.join(PromptVersion, PromptVersion.prompt_id == Prompt.id).where(
                PromptVersion.version == key.version
            )
        else:
            query = query.join(
                TemplateLabel,
                and_(TemplateLabel.prompt_id == Prompt.id, TemplateLabel.label == key.label),
            ).join(PromptVersion, PromptVersion.id == TemplateLabel.prompt_version_id)
        row = session.execute(query).first()
        if row is None:
            wanted = f"version {key.version}" if key.version is not None else f"label {key.label!r}"
            where = f"project {key.project}" if key.project else "the global scope"
            raise TemplateNotFound(
                f"no template {key.name!r} with {wanted} in {where} (looked in custom, project and "
                "global scopes)",
                hint="`prompt-tool templates list` shows what exists",
            )
        prompt_id, scope, declared, version = row
        return ResolvedTemplate(
            name=key.name,
            scope=scope,
            template_id=prompt_id,
            version_id=version.id,
            version=version.version,
            source=version.content,
            content_hash=version.content_hash or content_hash(version.content),
            declared_variables=tuple(declared or ()),
        )

    def resolve(
        self,
        name: str,
        *,
        project: str | None,
        user: str | None = None,
        label: str = DEFAULT_LABEL,
        version: int | None = None,
        fallback: str | None = None,
    ) -> ResolvedTemplate:
        """Which version ``name`` means for (project, user): custom, then project, then global.

        ``fallback`` is used only when the database cannot be reached for a name never fetched
        before; a name fetched before is served from the cache even when expired.
        """
        key: _NameKey = (project, user, name, label, version)
        fallback_load = None
        if fallback is not None:

            def fallback_load() -> ResolvedTemplate:
                return ResolvedTemplate(
                    name=name,
                    scope="fallback",
                    template_id=0,
                    version_id=0,
                    version=0,
                    source=fallback,
                    content_hash=content_hash(fallback),
                )

        return self._names.get(key, lambda: self._load_resolution(key), fallback=fallback_load)

    def render(
        self,
        name: str,
        variables: Mapping[str, Any],
        *,
        project: str | None,
        user: str | None = None,
        label: str = DEFAULT_LABEL,
        version: int | None = None,
        fallback: str | None = None,
    ) -> RenderedTemplate:
        """Resolve ``name`` and render it with ``variables`` in the sandbox."""
        resolved = self.resolve(
            name, project=project, user=user, label=label, version=version, fallback=fallback
        )
        text = self.render_resolved(resolved, variables, project=project, user=user)
        return RenderedTemplate(text, resolved)

    def render_resolved(
        self,
        resolved: ResolvedTemplate,
        variables: Mapping[str, Any],
        *,
        project: str | None,
        user: str | None = None,
    ) -> str:
        # The compiled cache is keyed by the digest of the source as read, never the stored
        # digest: a version whose text was changed in the database behind our back keeps its
        # old digest, and would be rendered as whichever version first filled that slot.
        return self.template_engine.render(
            resolved.source,
            variables,
            name=resolved.name,
            version=resolved.version,
            declared_variables=resolved.declared_variables or None,
            loader=self._include_loader(project, user),
        )
