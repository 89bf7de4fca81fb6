"""Reading the template catalog: listings, one template's detail, its history, diffs.

Read-only: every method is one transaction that changes nothing. With an ``actor``, what that
user may not view is refused (one template) or left out (a listing).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from prompt_tool.core import content_hash
from prompt_tool.core.errors import TemplateNotFound
from prompt_tool.core.textdiff import unified_diff
from prompt_tool.db.models import (
    Project,
    Prompt,
    PromptVersion,
    Scope,
    TemplateEvent,
    TemplateLabel,
)
from prompt_tool.templates.database import TemplateDatabase
from prompt_tool.templates.lookup import TEMPLATE_TYPE, find_template, find_version
from prompt_tool.templates.naming import check_address
from prompt_tool.templates.permissions import Action, check_access, viewable_by
from prompt_tool.templates.types import (
    DEFAULT_LABEL,
    HistoryEntry,
    TemplateAddress,
    TemplateSummary,
    VersionInfo,
)

__all__ = ["TemplateCatalog", "TemplateDetail"]


@dataclass(frozen=True, slots=True)
class TemplateDetail:
    summary: TemplateSummary
    version: VersionInfo
    source: str


def _version_info(version: PromptVersion) -> VersionInfo:
    return VersionInfo(
        version=version.version,
        version_id=version.id,
        content_hash=version.content_hash or content_hash(version.content),
        created_by=version.created_by,
        created_at=version.created_at,
        change_note=version.change_note,
    )


def _labels(session: Session, prompt_ids: Sequence[int]) -> dict[int, dict[str, int]]:
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


def _summaries(
    session: Session, rows: Sequence[tuple[Prompt, str | None]]
) -> list[TemplateSummary]:
    prompt_ids = [prompt.id for prompt, _ in rows]
    labels = _labels(session, prompt_ids)
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


class TemplateCatalog:
    """Lists, shows, diffs and audits templates; never writes."""

    def __init__(self, database: TemplateDatabase) -> None:
        self._database = database

    @contextmanager
    def _viewing(
        self, address: TemplateAddress, actor: str | None
    ) -> Iterator[tuple[Session, Prompt]]:
        """A read of the template at ``address``, refused unless ``actor`` (if any) may view it."""
        check_address(address)
        with self._database.unit() as session:
            if actor is not None:
                check_access(session, actor, Action.VIEW, address)
            yield session, find_template(session, address)

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
        with self._database.unit() as session:
            query = (
                select(Prompt, Project.slug)
                .outerjoin(Project, Project.id == Prompt.project_id)
                .where(Prompt.prompt_type == TEMPLATE_TYPE)
                .order_by(Prompt.scope, Project.slug.nulls_first(), Prompt.owner, Prompt.name)
            )
            if project:
                project_id = self._database.project_id(project, session)
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
                can_view = viewable_by(session, actor)
                rows = [(p, s) for p, s in rows if can_view(p)]
            return _summaries(session, rows)

    def show(
        self,
        address: TemplateAddress,
        *,
        actor: str | None = None,
        version: int | None = None,
        label: str = DEFAULT_LABEL,
    ) -> TemplateDetail:
        """A template's metadata and the source of one version (default: its ``production``)."""
        with self._viewing(address, actor) as (session, prompt):
            (summary,) = _summaries(session, [(prompt, address.project)])
            number = version if version is not None else summary.labels.get(label)
            if number is None:
                raise TemplateNotFound(
                    f"{address.describe()} has no label {label!r}",
                    hint="`prompt-tool templates show` lists its labels",
                )
            chosen = find_version(session, prompt, number)
            return TemplateDetail(summary, _version_info(chosen), chosen.content)

    def history(self, address: TemplateAddress, *, actor: str | None = None) -> list[HistoryEntry]:
        """The audit trail, oldest first: versions published, labels moved, rollbacks."""
        with self._viewing(address, actor) as (session, prompt):
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
        with self._database.unit() as session:
            prompt = find_template(session, address)
            return [
                _version_info(v)
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
        with self._viewing(address, actor) as (session, prompt):
            old = find_version(session, prompt, from_version)
            new = find_version(session, prompt, to_version)
            return unified_diff(
                old.content,
                new.content,
                f"{address.name}@v{from_version}",
                f"{address.name}@v{to_version}",
            )
