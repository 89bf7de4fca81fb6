"""Stored templates and versions found by address or by version id, in a caller's transaction.

Plain functions of a session or connection, with no cache and no manager behind them: the
manager's parts use them, and so do verify, matching, compat and ab_testing (through
``prompt_tool.templates``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Final

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from prompt_tool.core import content_hash
from prompt_tool.core.errors import TemplateNotFound
from prompt_tool.db.dialect import one_of
from prompt_tool.db.models import Prompt, PromptType, PromptVersion, Scope
from prompt_tool.db.projects import get_project
from prompt_tool.templates.types import ResolvedTemplate, TemplateAddress

__all__ = [
    "TEMPLATE_TYPE",
    "VERSION_COLUMNS",
    "find_template",
    "find_version",
    "load_versions",
    "resolved_from_row",
]

TEMPLATE_TYPE: Final = PromptType.ORCHESTRATION_TEMPLATE.value
"""``prompts.prompt_type`` of a template (the same table holds the legacy prompts)."""


def find_template(session: Session, address: TemplateAddress, *, lock: bool = False) -> Prompt:
    """The orchestration template at ``address`` (``lock``: FOR UPDATE), or TemplateNotFound."""
    query = select(Prompt).where(
        Prompt.prompt_type == TEMPLATE_TYPE,
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


def find_version(session: Session, prompt: Prompt, number: int) -> PromptVersion:
    """Version ``number`` of the template ``prompt``, or TemplateNotFound."""
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
