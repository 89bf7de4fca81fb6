"""Projects: looked up by slug everywhere a user names one."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from prompt_tool.db.models import Project
from prompt_tool.errors import InvalidInputError, NotFoundError

__all__ = ["create_project", "get_project", "list_projects"]


def get_project(session: Session, slug: str) -> Project:
    project = session.scalars(select(Project).where(Project.slug == slug)).one_or_none()
    if project is None:
        raise NotFoundError(
            f"no project with slug {slug!r}; `prompt-tool projects list` shows the projects"
        )
    return project


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
