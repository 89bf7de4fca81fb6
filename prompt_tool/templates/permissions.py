"""Who may do what with templates.

Roles are viewer < editor < admin, per project, plus global admins (a grant with no project).
Global templates: anyone reads them, only global admins change them. Project templates: any role
in the project reads them, editors and admins change them. Custom templates: their owner only.
Global admins may do everything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import CursorResult, delete, exists, select
from sqlalchemy.orm import Session

from prompt_tool.core.errors import PermissionDenied
from prompt_tool.db.models import PermissionRole, Project, Prompt, Scope, TemplatePermission
from prompt_tool.db.projects import get_project
from prompt_tool.errors import InvalidInputError, NotFoundError
from prompt_tool.templates.types import TemplateAddress

__all__ = [
    "Action",
    "Grant",
    "check_access",
    "check_template_access",
    "grant_role",
    "list_grants",
    "revoke_role",
    "viewable_by",
]

_RANK = {PermissionRole.VIEWER: 1, PermissionRole.EDITOR: 2, PermissionRole.ADMIN: 3}


class Action(StrEnum):
    VIEW = "view"
    EDIT = "edit"


@dataclass(frozen=True, slots=True)
class Grant:
    user: str
    role: str
    project: str | None
    granted_by: str | None
    granted_at: datetime


def _role_of(session: Session, user: str, project_id: int | None) -> PermissionRole | None:
    condition = (
        TemplatePermission.project_id.is_(None)
        if project_id is None
        else TemplatePermission.project_id == project_id
    )
    role = session.scalars(
        select(TemplatePermission.role).where(TemplatePermission.user_name == user, condition)
    ).one_or_none()
    return PermissionRole(role) if role is not None else None


def _is_global_admin(session: Session, user: str) -> bool:
    return _role_of(session, user, None) is PermissionRole.ADMIN


def _at_least(role: PermissionRole | None, needed: PermissionRole) -> bool:
    return role is not None and _RANK[role] >= _RANK[needed]


def check_template_access(
    session: Session,
    actor: str,
    action: Action,
    *,
    what: str,
    scope: Scope,
    project: Project | None,
    owner: str | None,
) -> None:
    """Raise :class:`PermissionDenied` (naming who, what and the role needed) unless allowed."""
    if _is_global_admin(session, actor):
        return
    if scope is Scope.GLOBAL:
        if action is Action.VIEW:
            return
        raise PermissionDenied(
            f"{actor} may not {action.value} {what}: global templates need a global admin",
            hint="a global admin can run `prompt-tool roles grant USER admin --global`",
        )
    assert project is not None
    if scope is Scope.CUSTOM:
        if owner == actor:
            return
        raise PermissionDenied(
            f"{actor} may not {action.value} {what}: custom templates belong to {owner} only",
            hint="copy it into your own custom scope or ask for a project template",
        )
    needed = PermissionRole.VIEWER if action is Action.VIEW else PermissionRole.EDITOR
    if _at_least(_role_of(session, actor, project.id), needed):
        return
    raise PermissionDenied(
        f"{actor} may not {action.value} {what}: needs role {needed.value} or higher in project "
        f"{project.slug}",
        hint=f"a project admin can run `prompt-tool roles grant {actor} {needed.value} "
        f"--project {project.slug}`",
    )


def check_access(
    session: Session, actor: str, action: Action, address: TemplateAddress
) -> Project | None:
    """:func:`check_template_access` for the template at ``address``; its project, if any."""
    project = get_project(session, address.project) if address.project else None
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


def viewable_by(session: Session, actor: str) -> Callable[[Prompt], bool]:
    """Whether ``actor`` may view a template, by the rules above, for filtering a listing:
    the actor's roles are read once, not once per template."""
    roles = {
        project_id: role
        for project_id, role in session.execute(
            select(TemplatePermission.project_id, TemplatePermission.role).where(
                TemplatePermission.user_name == actor
            )
        )
    }
    if roles.get(None) == "admin":
        return lambda prompt: True

    def can_view(prompt: Prompt) -> bool:
        if prompt.scope == Scope.GLOBAL.value:
            return True
        if prompt.scope == Scope.CUSTOM.value:
            return prompt.owner == actor
        return prompt.project_id in roles

    return can_view


def _require_admin(session: Session, actor: str, project: Project | None) -> None:
    if _is_global_admin(session, actor):
        return
    if project is None:
        any_global_admin = session.scalar(
            select(
                exists().where(
                    TemplatePermission.project_id.is_(None),
                    TemplatePermission.role == PermissionRole.ADMIN.value,
                )
            )
        )
        if not any_global_admin:
            return  # bootstrap: the first global admin of a new deployment grants itself
        raise PermissionDenied(
            f"{actor} may not change global roles: needs global admin",
            hint="ask a global admin",
        )
    if _role_of(session, actor, project.id) is PermissionRole.ADMIN:
        return
    raise PermissionDenied(
        f"{actor} may not change roles in project {project.slug}: needs role admin there "
        "or global admin",
        hint="ask an admin of the project",
    )


def _parse_role(role: str) -> PermissionRole:
    try:
        return PermissionRole(role)
    except ValueError:
        raise InvalidInputError(f"unknown role {role!r}; use viewer, editor or admin") from None


def grant_role(
    session: Session, actor: str, user: str, role: str, project_slug: str | None
) -> Grant:
    """Give ``user`` ``role`` in a project (or globally), replacing any role they had there."""
    parsed = _parse_role(role)
    project = get_project(session, project_slug) if project_slug else None
    _require_admin(session, actor, project)
    project_id = project.id if project else None
    existing = session.scalars(
        select(TemplatePermission).where(
            TemplatePermission.user_name == user,
            TemplatePermission.project_id.is_(None)
            if project_id is None
            else TemplatePermission.project_id == project_id,
        )
    ).one_or_none()
    if existing is None:
        existing = TemplatePermission(project_id=project_id, user_name=user, role=parsed.value)
        session.add(existing)
    existing.role = parsed.value
    existing.granted_by = actor
    session.flush()
    session.refresh(existing)
    return Grant(user, parsed.value, project_slug, actor, existing.granted_at)


def revoke_role(session: Session, actor: str, user: str, project_slug: str | None) -> None:
    project = get_project(session, project_slug) if project_slug else None
    _require_admin(session, actor, project)
    project_id = project.id if project else None
    removed = cast(
        CursorResult[Any],
        session.execute(
            delete(TemplatePermission).where(
                TemplatePermission.user_name == user,
                TemplatePermission.project_id.is_(None)
                if project_id is None
                else TemplatePermission.project_id == project_id,
            )
        ),
    ).rowcount
    if not removed:
        where = f"project {project_slug}" if project_slug else "the global scope"
        raise NotFoundError(f"{user} has no role in {where}; nothing to revoke")


def list_grants(session: Session, project_slug: str | None = None) -> list[Grant]:
    query = (
        select(TemplatePermission, Project.slug)
        .outerjoin(Project, Project.id == TemplatePermission.project_id)
        .order_by(Project.slug.nulls_first(), TemplatePermission.user_name)
    )
    if project_slug:
        query = query.where(TemplatePermission.project_id == get_project(session, project_slug).id)
    return [
        Grant(p.user_name, p.role, slug, p.granted_by, p.granted_at)
        for p, slug in session.execute(query)
    ]
