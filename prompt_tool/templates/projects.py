"""Projects and template roles, one unit of work each (what the CLI's project and role
commands call; the rules themselves live in :mod:`prompt_tool.db.projects` and
:mod:`prompt_tool.templates.permissions`)."""

from __future__ import annotations

from dataclasses import dataclass

from prompt_tool.db.projects import create_project, list_projects
from prompt_tool.templates.database import TemplateDatabase
from prompt_tool.templates.permissions import Grant, grant_role, list_grants, revoke_role

__all__ = ["ProjectInfo", "ProjectsAndRoles"]


@dataclass(frozen=True, slots=True)
class ProjectInfo:
    id: int
    slug: str
    name: str


class ProjectsAndRoles:
    """Creates and lists projects; grants, revokes and lists roles."""

    def __init__(self, database: TemplateDatabase) -> None:
        self._database = database

    def create_project(self, slug: str, name: str | None = None) -> ProjectInfo:
        with self._database.writing("create a project", needs=None) as session:
            project = create_project(session, slug, name)
            return ProjectInfo(project.id, project.slug, project.name)

    def projects(self) -> list[ProjectInfo]:
        with self._database.unit() as session:
            return [ProjectInfo(p.id, p.slug, p.name) for p in list_projects(session)]

    def grant(self, actor: str, user: str, role: str, project: str | None) -> Grant:
        with self._database.writing("grant a role") as session:
            return grant_role(session, actor, user, role, project)

    def revoke(self, actor: str, user: str, project: str | None) -> None:
        with self._database.writing("revoke a role") as session:
            revoke_role(session, actor, user, project)

    def roles(self, project: str | None = None) -> list[Grant]:
        with self._database.unit() as session:
            return list_grants(session, project)
