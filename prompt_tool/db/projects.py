"""Projects: looked up by slug everywhere a user names one."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from prompt_tool.db.models import Project
from prompt_tool.errors import InvalidInputError, NotFoundError

__all__ = ["create_project", "get_project", "list_projects", "projects_by_slug"]

_LIST_HINT = "`prompt-tool projects list` shows the projects"


def get_project(session: Session, slug: str) -> Project:
    project = session.scalars(select(Project).where(Project.slug == slug)).one_or_none()
    if project is None:
        raise NotFoundError(f"no project with slug {slug!r}; {_LIST_HINT}")
    return project


def projects_by_slug(connection: Connection, slugs: Sequence[str]) -> dict[int, str]:
    """The projects ``slugs`` name (every project when it is empty), id -> slug in id order.
    Raises :class:`NotFoundError` naming every slug that names no project."""
    query = select(Project.id, Project.slug).order_by(Project.id)
    if slugs:
        query = query.where(Project.slug.in_(list(slugs)))
    found = {project_id: slug for project_id, slug in connection.execute(query)}
    known = set(found.values())
    missing = [slug for slug in dict.fromkeys(slugs) if slug not in known]
    if missing:
        shown = ", ".join(repr(slug) for slug in missing)
        raise NotFoundError(f"no project with slug {shown}; {_LIST_HINT}")
    return found


def create_project(session: Session, slug: str, name: str | None = None) -> Project:
    if not slug or len(slug) > 100 or not slug.replace("-", "").replace("_", "").isalnum():
        raise InvalidInputError(f"project slug {slug!r} must be 1-100 letters, digits, '-' or '_'")
    project = Project(slug=slug, name=name or slug)
    try:
        # A savepoint, so a duplicate slug leaves the caller's transaction usable on PostgreSQL.
        with session.begin_nested():
            session.add(project)
    except IntegrityError:
        raise InvalidInputError(f"a project with slug {slug!r} already exists") from None
    return project


def list_projects(session: Session) -> list[Project]:
    return list(session.scalars(select(Project).order_by(Project.slug)))
