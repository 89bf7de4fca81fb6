"""`orch-migrate backfill --match-existing`: link a session to a template that already exists.

Before importing a legacy text as a template of its own, the backfill tries the orchestration
templates an operator already wrote: a session is linked to an existing version when rendering
that version with the session's recorded ``variables`` gives its legacy text exactly, byte for
byte. The reference then carries those variables, so the templates path renders the same text.

Candidates are every version of every non-imported orchestration template the session's project
can see without a user: its project-scope templates first, then global ones; newest version
first within a template. Custom templates belong to one user and are never candidates. Each
distinct (project, variables, text) is tried once per run, and each (version, variables)
rendered once, so a batch costs a few renders, not one per session.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, select

from prompt_tool.core import TemplateError, content_hash
from prompt_tool.db.dialect import insert_for
from prompt_tool.db.models import (
    OrchestrationSession,
    Prompt,
    PromptType,
    PromptVersion,
    Scope,
    SessionPromptRef,
)
from prompt_tool.templates import (
    VERSION_COLUMNS,
    ResolvedTemplate,
    TemplateManager,
    resolved_from_row,
)

__all__ = ["SOURCE_MATCH", "ExistingTemplateMatcher"]

SOURCE_MATCH = "match"
_SESSIONS = OrchestrationSession.__table__
_REFS = SessionPromptRef.__table__


class ExistingTemplateMatcher:
    """Finds, for a legacy text, an existing template version that renders it exactly."""

    def __init__(
        self, connection: Connection, manager: TemplateManager, projects: dict[int, str]
    ) -> None:
        self._manager = manager
        self._projects = projects
        self._candidates = self._load_candidates(connection, projects)
        # (project, variables, text hash) -> version id, or None when nothing renders it.
        self._matches: dict[tuple[int, str | None, str], int | None] = {}
        # (version, variables) -> hash of the rendering, or None when it fails to render.
        self._renders: dict[tuple[int, str | None], str | None] = {}

    @staticmethod
    def _load_candidates(
        connection: Connection, projects: dict[int, str]
    ) -> dict[int, list[ResolvedTemplate]]:
        rows = connection.execute(
            select(*VERSION_COLUMNS, Prompt.project_id)
            .select_from(Prompt)
            .join(PromptVersion, PromptVersion.prompt_id == Prompt.id)
            .where(
                Prompt.prompt_type == PromptType.ORCHESTRATION_TEMPLATE.value,
                Prompt.scope.in_([Scope.PROJECT.value, Scope.GLOBAL.value]),
                Prompt.category.is_distinct_from("imported"),
            )
            .order_by(Prompt.id, PromptVersion.version.desc())
        )
        project_scoped: dict[int, list[ResolvedTemplate]] = {}
        global_scoped: list[ResolvedTemplate] = []
        for row in rows:
            resolved = resolved_from_row(row)
            project_id = row[len(VERSION_COLUMNS)]
            if resolved.scope == Scope.GLOBAL.value:
                global_scoped.append(resolved)
            else:
                project_scoped.setdefault(project_id, []).append(resolved)
        return {
            project_id: project_scoped.get(project_id, []) + global_scoped
            for project_id in projects
        }

    def _rendered_hash(
        self, template: ResolvedTemplate, variables_json: str | None, project: str
    ) -> str | None:
        key = (template.version_id, variables_json)
        if key not in self._renders:
            variables = json.loads(variables_json) if variables_json else None
            try:
                if variables is not None and not isinstance(variables, dict):
                    raise TypeError
                text = self._manager.render_resolved(template, variables or {}, project=project)
                self._renders[key] = content_hash(text)
            except (TemplateError, TypeError):
                self._renders[key] = None
        return self._renders[key]

    def match(self, project_id: int, variables_json: str | None, legacy_hash: str) -> int | None:
        """The version whose rendering with these variables has this hash, if any."""
        key = (project_id, variables_json, legacy_hash)
        if key not in self._matches:
            project = self._projects[project_id]
            self._matches[key] = next(
                (
                    template.version_id
                    for template in self._candidates.get(project_id, ())
                    if self._rendered_hash(template, variables_json, project) == legacy_hash
                ),
                None,
            )
        return self._matches[key]

    def link(self, connection: Connection, texts: Any) -> int:
        """Link the texts that an existing template renders exactly; how many it linked.

        ``texts`` is the backfill's subquery of the batch's texts that need a link (session,
        project, role, hash): the import step that follows skips what is linked here.
        """
        if not any(self._candidates.values()):
            return 0
        rows = connection.execute(
            select(
                texts.c.session_id,
                texts.c.project_id,
                texts.c.role,
                texts.c.legacy_hash,
                _SESSIONS.c.variables,
            ).join(_SESSIONS, _SESSIONS.c.id == texts.c.session_id)
        )
        references = []
        for session_id, project_id, role, legacy_hash, variables in rows:
            if project_id not in self._projects:
                continue
            variables_json = _canonical(variables)
            version_id = self.match(project_id, variables_json, legacy_hash)
            if version_id is not None:
                references.append(
                    {
                        "session_id": session_id,
                        "role": role,
                        "prompt_version_id": version_id,
                        "legacy_hash": legacy_hash,
                        "source": SOURCE_MATCH,
                        "variables": variables,
                    }
                )
        if references:
            statement = insert_for(connection, _REFS).values(references)
            excluded = statement.excluded
            connection.execute(
                statement.on_conflict_do_update(
                    index_elements=["session_id", "role"],
                    set_={
                        "prompt_version_id": excluded.prompt_version_id,
                        "legacy_hash": excluded.legacy_hash,
                        "source": excluded.source,
                        "variables": excluded.variables,
                    },
                )
            )
        return len(references)


def _canonical(variables: Any) -> str | None:
    """One spelling per set of variables, so equal sets share their renders."""
    if variables is None:
        return None
    return json.dumps(variables, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
