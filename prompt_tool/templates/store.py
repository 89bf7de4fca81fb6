"""Writing templates: new templates, new versions, label moves and rollbacks.

Versions are immutable; labels (``production``, ``latest``, ...) point at versions and every
move is recorded as a template event, so the history is the audit trail. Each write checks the
actor's access, and afterwards makes every cached resolution of the name forget it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from prompt_tool.core import content_hash
from prompt_tool.core.errors import TemplateNotFound
from prompt_tool.db.models import Prompt, PromptVersion, TemplateEvent, TemplateLabel
from prompt_tool.errors import InvalidInputError
from prompt_tool.templates.database import TemplateDatabase
from prompt_tool.templates.lookup import TEMPLATE_TYPE, find_template, find_version
from prompt_tool.templates.naming import check_address, check_label
from prompt_tool.templates.permissions import Action, check_access
from prompt_tool.templates.resolution import TemplateResolver
from prompt_tool.templates.types import (
    DEFAULT_LABEL,
    LATEST_LABEL,
    LabelMove,
    PublishResult,
    TemplateAddress,
)

__all__ = ["TemplateStore"]


def _record(
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
    _record(
        session, prompt, action, actor, label=label, from_id=before, to_id=version.id, note=note
    )
    if before is None:
        return None
    return session.get_one(PromptVersion, before).version


def _add_version(
    session: Session,
    prompt: Prompt,
    number: int,
    source: str,
    *,
    digest: str,
    labels: Sequence[str],
    actor: str,
    note: str | None,
) -> PromptVersion:
    """Store ``source`` as version ``number`` of ``prompt`` and point ``labels`` at it, each
    step recorded in the history."""
    version = PromptVersion(
        prompt_id=prompt.id,
        version=number,
        content=source,
        created_by=actor,
        change_note=note,
        content_hash=digest,
    )
    session.add(version)
    session.flush()
    _record(session, prompt, "version_created", actor, to_id=version.id, note=note)
    for label in labels:
        _point(session, prompt, label, version, actor)
    return version


class TemplateStore:
    """Creates templates, stores versions and moves labels, each in one checked transaction."""

    def __init__(self, database: TemplateDatabase, resolver: TemplateResolver) -> None:
        self._database = database
        # The resolver validates a new source (its includes resolve like names do) and forgets
        # the name once a write is committed.
        self._resolver = resolver

    @contextmanager
    def _editing(
        self, address: TemplateAddress, actor: str, action: str, *, label: str | None = None
    ) -> Iterator[tuple[Session, Prompt]]:
        """A write to the template at ``address``, locked, refused unless ``actor`` may edit it.

        The caller forgets the name once committed (not here: an update that stores nothing
        must leave every cache as it is)."""
        check_address(address)
        if label is not None:
            check_label(label)
        with self._database.writing(action) as session:
            check_access(session, actor, Action.EDIT, address)
            yield session, find_template(session, address, lock=True)

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
        check_address(address)
        declared = [dict(v) for v in variables]
        with self._database.writing("create a template") as session:
            project = check_access(session, actor, Action.EDIT, address)
            try:
                find_template(session, address)
            except TemplateNotFound:
                pass
            else:
                raise InvalidInputError(
                    f"{address.describe()} already exists; use `prompt-tool templates update`"
                )
            self._resolver.validate(address, source, declared or None)
            digest = content_hash(source)
            prompt = Prompt(
                project_id=project.id if project else None,
                name=address.name,
                content=source,
                category=category,
                is_template=True,
                prompt_type=TEMPLATE_TYPE,
                scope=address.scope.value,
                owner=address.owner,
                description=description,
                tags=list(tags),
                declared_variables=declared,
                content_hash=digest,
            )
            session.add(prompt)
            session.flush()
            version = _add_version(
                session,
                prompt,
                1,
                source,
                digest=digest,
                labels=(LATEST_LABEL, DEFAULT_LABEL),
                actor=actor,
                note=note,
            )
            result = PublishResult(
                address, 1, version.id, True, {LATEST_LABEL: 1, DEFAULT_LABEL: 1}
            )
        self._resolver.forget(address, prompt.project_id)
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
        with self._editing(address, actor, "update a template") as (session, prompt):
            latest_number = session.scalar(
                select(func.max(PromptVersion.version)).where(PromptVersion.prompt_id == prompt.id)
            )
            assert latest_number is not None
            latest = find_version(session, prompt, latest_number)
            digest = content_hash(source)
            if latest.content_hash == digest and latest.content == source:
                return PublishResult(address, latest.version, latest.id, False)
            self._resolver.validate(address, source, prompt.declared_variables or None)
            labels = [LATEST_LABEL] + ([DEFAULT_LABEL] if promote else [])
            version = _add_version(
                session,
                prompt,
                latest.version + 1,
                source,
                digest=digest,
                labels=labels,
                actor=actor,
                note=note,
            )
            session.execute(
                update(Prompt)
                .where(Prompt.id == prompt.id)
                .values(content=source, content_hash=digest, updated_at=func.now())
            )
            result = PublishResult(
                address, version.version, version.id, True, dict.fromkeys(labels, version.version)
            )
        self._resolver.forget(address, prompt.project_id)
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
        with self._editing(address, actor, "move a label", label=label) as (session, prompt):
            target = find_version(session, prompt, version)
            before = _point(session, prompt, label, target, actor, note=note)
        self._resolver.forget(address, prompt.project_id)
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
        editing = self._editing(address, actor, "roll a template back", label=label)
        with editing as (session, prompt):
            if to_version is not None:
                target = find_version(session, prompt, to_version)
            else:
                target = _previous_version(session, prompt, address, label)
            before = _point(session, prompt, label, target, actor, action="rollback", note=note)
        self._resolver.forget(address, prompt.project_id)
        return LabelMove(address, label, before, target.version, rollback=True)


def _previous_version(
    session: Session, prompt: Prompt, address: TemplateAddress, label: str
) -> PromptVersion:
    """The version ``label`` pointed at before it was last moved to where it points now."""
    current = session.get(TemplateLabel, (prompt.id, label))
    previous_id = session.scalar(
        select(TemplateEvent.from_version_id)
        .where(
            TemplateEvent.prompt_id == prompt.id,
            TemplateEvent.label == label,
            TemplateEvent.to_version_id == (current.prompt_version_id if current else None),
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
    return session.get_one(PromptVersion, previous_id)
