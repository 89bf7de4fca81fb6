"""Dual writes: a session made or changed through templates also gets its rendered text in the
legacy columns, in the same transaction, so flag ``legacy``, ``alembic downgrade -1`` and older
application versions all still see the right text."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Insert, bindparam, func, insert, select, union_all
from sqlalchemy.orm import Session

from prompt_tool.ab_testing import Assignment, check_unit_key, enrol_session
from prompt_tool.core import content_hash, sanitize_variables
from prompt_tool.db.engine import Connectable, begin, make_session_factory, session_scope
from prompt_tool.db.models import (
    OrchestrationSession,
    Project,
    Prompt,
    PromptRole,
    PromptVersion,
    SessionPromptRef,
)
from prompt_tool.db.projects import get_project
from prompt_tool.errors import InvalidInputError, NotFoundError
from prompt_tool.flags import FlagService, Variant
from prompt_tool.templates import DEFAULT_LABEL, ResolvedTemplate, TemplateManager

__all__ = [
    "CreatedSession",
    "TemplateChoice",
    "create_session",
    "set_session_template",
    "update_session_variables",
]

DUAL_WRITE = "dual_write"


@dataclass(frozen=True, slots=True)
class TemplateChoice:
    """Which template a role uses: a name, resolved for the session's project and user."""

    name: str
    label: str = DEFAULT_LABEL
    version: int | None = None


@dataclass(frozen=True, slots=True)
class CreatedSession:
    session_id: int
    project: str
    texts: dict[str, str | None]
    versions: dict[str, int]
    # Role -> the A/B test variant the session was enrolled in (empty when none ran).
    assignments: dict[str, Assignment] = field(default_factory=dict)


def _role(value: str | PromptRole) -> PromptRole:
    try:
        return PromptRole(value)
    except ValueError:
        roles = ", ".join(r.value for r in PromptRole)
        raise InvalidInputError(f"unknown session role {value!r}; use {roles}") from None


def _choice(value: str | TemplateChoice) -> TemplateChoice:
    return value if isinstance(value, TemplateChoice) else TemplateChoice(value)


def _resolve_and_render(
    manager: TemplateManager,
    project: str,
    user: str | None,
    choices: Mapping[PromptRole, TemplateChoice],
    variables: Mapping[str, Any],
) -> dict[PromptRole, tuple[ResolvedTemplate, str]]:
    """Everything that can fail (resolution, rendering) happens before the transaction opens."""
    rendered: dict[PromptRole, tuple[ResolvedTemplate, str]] = {}
    for role, choice in choices.items():
        resolved = manager.resolve(
            choice.name, project=project, user=user, label=choice.label, version=choice.version
        )
        text = manager.render_resolved(resolved, variables, project=project, user=user)
        rendered[role] = (resolved, text)
    return rendered


def _reference(
    session_id: int,
    role: PromptRole,
    resolved: ResolvedTemplate,
    text: str,
    variables: Mapping[str, Any],
) -> SessionPromptRef:
    return SessionPromptRef(
        session_id=session_id,
        role=role.value,
        prompt_version_id=resolved.version_id,
        variables=dict(variables),
        legacy_hash=content_hash(text),
        source=DUAL_WRITE,
    )


def create_session(
    manager: TemplateManager,
    project: str,
    templates: Mapping[str | PromptRole, str | TemplateChoice],
    variables: Mapping[str, Any] | None = None,
    *,
    name: str,
    user: str | None = None,
    flags: FlagService | None = None,
    unit_key: str | None = None,
) -> CreatedSession:
    """Create a session through templates: references and rendered legacy text, one transaction.

    Roles not given keep a NULL legacy text and no reference.

    A/B tests: with ``flags``, in a project whose flag is not ``legacy``, the session is
    enrolled in the running test of each template it uses (see :mod:`prompt_tool.ab_testing`).
    The variant follows from the test and ``unit_key`` (e.g. a user id, so one user always gets
    one variant), else the session id; the enrolled role renders the variant's version, and its
    reference and legacy text are that version's, in the same transaction as everything else.
    """
    values = sanitize_variables(dict(variables or {}))
    choices = {_role(role): _choice(choice) for role, choice in templates.items()}
    if unit_key is not None:
        check_unit_key(unit_key)
    rendered = _resolve_and_render(manager, project, user, choices, values)
    # Asked before the transaction: the flag is answered from memory, off the write path.
    enrol = (
        flags is not None
        and bool(rendered)
        and flags.variant_for(project).variant is not Variant.LEGACY
    )
    assignments: dict[str, Assignment] = {}
    if not enrol:
        return _create_plain(manager.engine, project, name, values, rendered)
    with session_scope(make_session_factory(manager.engine)) as session:
        project_row = get_project(session, project)
        row = OrchestrationSession(
            project_id=project_row.id,
            name=name,
            variables=values,
            **{role.legacy_column: text for role, (_, text) in rendered.items()},
        )
        session.add(row)
        session.flush()
        if enrol:
            enrolled = enrol_session(
                session,
                project_id=project_row.id,
                session_id=row.id,
                templates={role: resolved.template_id for role, (resolved, _) in rendered.items()},
                unit_key=unit_key,
            )
            for role, enrolment in enrolled.items():
                text = manager.render_resolved(
                    enrolment.template, values, project=project, user=user
                )
                rendered[role] = (enrolment.template, text)
                setattr(row, role.legacy_column, text)
                assignments[role.value] = enrolment.assignment
        session.add_all(
            _reference(row.id, role, resolved, text, values)
            for role, (resolved, text) in rendered.items()
        )
        session_id = row.id
    return CreatedSession(
        session_id=session_id,
        project=project,
        texts={role.value: text for role, (_, text) in rendered.items()},
        versions={role.value: resolved.version for role, (resolved, _) in rendered.items()},
        assignments=assignments,
    )


@functools.cache
def _session_insert(columns: tuple[str, ...]) -> Insert:
    """The session INSERT for these legacy text columns, its project looked up inside it.

    Built once per set of columns and reused: SQLAlchemy then skips rebuilding the construct
    and its cache key on every call (a third of the Python time of a create). Values are
    bound parameters named after their columns.
    """
    sessions = OrchestrationSession.__table__
    source = select(
        Project.id,
        bindparam("name", type_=sessions.c.name.type),
        bindparam("variables", type_=sessions.c.variables.type),
        *(bindparam(column, type_=sessions.c[column].type) for column in columns),
    ).where(Project.slug == bindparam("project"))
    return (
        insert(OrchestrationSession)
        .from_select(["project_id", "name", "variables", *columns], source)
        .returning(OrchestrationSession.id)
    )


@functools.cache
def _references_insert(count: int) -> Insert:
    """One INSERT of ``count`` references of one session (parameters ``role_0``, ...), built
    once per count: one statement and one round trip, where an executemany goes through
    psycopg's pipeline mode and costs more for three rows. An INSERT ... SELECT of bound
    parameters, not a multi-row VALUES: SQLAlchemy compiles a multi-row VALUES again on every
    call, a SELECT it compiles once and caches."""
    refs = SessionPromptRef.__table__
    rows = [
        select(
            bindparam("session_id", type_=refs.c.session_id.type),
            bindparam(f"role_{number}", type_=refs.c.role.type),
            bindparam(f"prompt_version_id_{number}", type_=refs.c.prompt_version_id.type),
            bindparam("variables", type_=refs.c.variables.type),
            bindparam(f"legacy_hash_{number}", type_=refs.c.legacy_hash.type),
            bindparam("source", type_=refs.c.source.type),
        )
        for number in range(count)
    ]
    columns = ["session_id", "role", "prompt_version_id", "variables", "legacy_hash", "source"]
    return insert(SessionPromptRef).from_select(
        columns, rows[0] if count == 1 else union_all(*rows)
    )


def _create_plain(
    engine: Connectable,
    project: str,
    name: str,
    values: dict[str, Any],
    rendered: Mapping[PromptRole, tuple[ResolvedTemplate, str]],
) -> CreatedSession:
    """The common case (no A/B enrolment): two statements in one transaction, the session
    (its project looked up inside the INSERT) and then all its references at once."""
    texts = {role.legacy_column: text for role, (_, text) in rendered.items()}
    with begin(engine) as connection:
        session_id = connection.execute(
            _session_insert(tuple(texts)),
            {"project": project, "name": name, "variables": values, **texts},
        ).scalar_one_or_none()
        if session_id is None:
            raise NotFoundError(
                f"no project with slug {project!r}; `prompt-tool projects list` shows the projects"
            )
        if rendered:
            parameters: dict[str, Any] = {
                "session_id": session_id,
                "variables": values,
                "source": DUAL_WRITE,
            }
            for number, (role, (resolved, text)) in enumerate(rendered.items()):
                parameters[f"role_{number}"] = role.value
                parameters[f"prompt_version_id_{number}"] = resolved.version_id
                parameters[f"legacy_hash_{number}"] = content_hash(text)
            connection.execute(_references_insert(len(rendered)), parameters)
    return CreatedSession(
        session_id=int(session_id),
        project=project,
        texts={role.value: text for role, (_, text) in rendered.items()},
        versions={role.value: resolved.version for role, (resolved, _) in rendered.items()},
    )


def _locked_session(session: Session, session_id: int) -> OrchestrationSession:
    row = session.scalars(
        select(OrchestrationSession).where(OrchestrationSession.id == session_id).with_for_update()
    ).one_or_none()
    if row is None:
        raise NotFoundError(f"no orchestration session with id {session_id}")
    return row


def _rerender(
    manager: TemplateManager,
    engine: Connectable,
    session_id: int,
    variables: Mapping[str, Any] | None,
    replace: Mapping[PromptRole, TemplateChoice],
    user: str | None,
) -> CreatedSession:
    """Re-render a session's referenced roles (``variables`` None: keep the stored ones)."""
    with session_scope(make_session_factory(engine)) as session:
        row = _locked_session(session, session_id)
        values = sanitize_variables(dict(row.variables or {} if variables is None else variables))
        project = row.project.slug
        existing = {
            PromptRole(ref.role): ref
            for ref in session.scalars(
                select(SessionPromptRef).where(SessionPromptRef.session_id == session_id)
            )
        }
        choices: dict[PromptRole, TemplateChoice] = {
            role: TemplateChoice(ref_name, version=ref_version)
            for role, (ref_name, ref_version) in _current_versions(session, existing).items()
        }
        choices.update(replace)
        rendered = _resolve_and_render(manager, project, user, choices, values)
        for role, (resolved, text) in rendered.items():
            if role in existing:
                session.delete(existing[role])
                session.flush()
            session.add(_reference(session_id, role, resolved, text, values))
            setattr(row, role.legacy_column, text)
        row.variables = values
        row.updated_at = func.now()
        session.flush()
        texts = {role.value: getattr(row, role.legacy_column) for role in PromptRole}
    return CreatedSession(
        session_id, project, texts, {r.value: res.version for r, (res, _) in rendered.items()}
    )


def _current_versions(
    session: Session, references: Mapping[PromptRole, SessionPromptRef]
) -> dict[PromptRole, tuple[str, int]]:
    """The (template name, version number) each existing reference pins."""
    if not references:
        return {}
    by_version = {ref.prompt_version_id: role for role, ref in references.items()}
    rows = session.execute(
        select(PromptVersion.id, Prompt.name, PromptVersion.version)
        .join(Prompt, Prompt.id == PromptVersion.prompt_id)
        .where(PromptVersion.id.in_(list(by_version)))
    )
    return {by_version[version_id]: (name, number) for version_id, name, number in rows}


def update_session_variables(
    manager: TemplateManager,
    session_id: int,
    variables: Mapping[str, Any],
    *,
    user: str | None = None,
) -> CreatedSession:
    """Change a session's variables: every referenced role is re-rendered, legacy text too."""
    return _rerender(manager, manager.engine, session_id, variables, {}, user)


def set_session_template(
    manager: TemplateManager,
    session_id: int,
    role: str | PromptRole,
    template: str | TemplateChoice,
    *,
    user: str | None = None,
) -> CreatedSession:
    """Point one role of a session at another template version; its legacy text follows."""
    return _rerender(
        manager, manager.engine, session_id, None, {_role(role): _choice(template)}, user
    )
