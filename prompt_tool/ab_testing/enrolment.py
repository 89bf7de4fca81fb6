"""Enrolment: a new session joins the running tests of the templates it uses.

:func:`enrol_session` is called by :func:`prompt_tool.compat.create_session` inside the
session's own transaction, right after its INSERT (the session id is the default unit key, and
it exists only then). It costs one query when no test runs; with tests, one more for the chosen
versions, and the assignment rows go out with the session's other rows. The caller renders the
chosen versions and points the session's references (and legacy text) at them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from prompt_tool.ab_testing.assignment import choose_variant
from prompt_tool.ab_testing.types import ABTestStatus, Assignment
from prompt_tool.core import content_hash
from prompt_tool.db.models import (
    ABAssignment,
    ABTest,
    ABTestVariant,
    Prompt,
    PromptRole,
    PromptVersion,
)
from prompt_tool.templates import ResolvedTemplate

__all__ = ["Enrolment", "enrol_session"]


@dataclass(frozen=True, slots=True)
class Enrolment:
    """Where one role of a new session was enrolled, and the version it must now render."""

    assignment: Assignment
    template: ResolvedTemplate


@dataclass(frozen=True, slots=True)
class _Candidate:
    test_id: int
    test_name: str
    variant_ids: list[int]
    variant_names: list[str]
    weights: list[int]
    version_ids: list[int]


def _running_tests(
    session: Session, project_id: int, templates: Mapping[PromptRole, int]
) -> dict[PromptRole, _Candidate]:
    """The running test of each (role, template) in the project, with its variants in order."""
    wanted = {(role.value, template_id) for role, template_id in templates.items()}
    rows = session.execute(
        select(
            ABTest.id,
            ABTest.name,
            ABTest.target_role,
            ABTest.prompt_id,
            ABTestVariant.id,
            ABTestVariant.name,
            ABTestVariant.weight,
            ABTestVariant.prompt_version_id,
        )
        .join(ABTestVariant, ABTestVariant.ab_test_id == ABTest.id)
        .where(
            ABTest.project_id == project_id,
            ABTest.status == ABTestStatus.RUNNING.value,
            ABTest.prompt_id.in_(sorted({t for _, t in wanted})),
            ABTest.target_role.in_(sorted({r for r, _ in wanted})),
        )
        .order_by(ABTest.id, ABTestVariant.id)
    )
    found: dict[PromptRole, _Candidate] = {}
    for test_id, test_name, role, prompt_id, variant_id, name, weight, version_id in rows:
        if role is None or (role, prompt_id) not in wanted:
            continue
        candidate = found.get(PromptRole(role))
        if candidate is None:
            candidate = _Candidate(test_id, test_name, [], [], [], [])
            found[PromptRole(role)] = candidate
        elif candidate.test_id != test_id:
            continue  # `start` allows one; should data say otherwise, the oldest test wins
        candidate.variant_ids.append(variant_id)
        candidate.variant_names.append(name)
        candidate.weights.append(weight)
        candidate.version_ids.append(version_id)
    return found


def enrol_session(
    session: Session,
    *,
    project_id: int,
    session_id: int,
    templates: Mapping[PromptRole, int],
    unit_key: str | None = None,
) -> dict[PromptRole, Enrolment]:
    """Enrol session ``session_id`` (already inserted) in the running tests of its templates.

    ``templates`` maps each role to the template id its name resolved to. The variant follows
    from (test id, ``unit_key`` or else the session id); the assignment rows are added to
    ``session`` (the caller's transaction). Roles with no running test are not in the result.
    """
    if not templates:
        return {}
    tests = _running_tests(session, project_id, templates)
    if not tests:
        return {}
    key = unit_key if unit_key is not None else str(session_id)
    picks = {
        role: (test, choose_variant(test.test_id, key, test.weights))
        for role, test in tests.items()
    }
    versions = {
        version.id: (version, prompt)
        for version, prompt in session.execute(
            select(PromptVersion, Prompt)
            .join(Prompt, Prompt.id == PromptVersion.prompt_id)
            .where(PromptVersion.id.in_([t.version_ids[i] for t, i in picks.values()]))
        )
    }
    enrolled: dict[PromptRole, Enrolment] = {}
    for role, (test, index) in picks.items():
        version, prompt = versions[test.version_ids[index]]
        session.add(
            ABAssignment(
                ab_test_id=test.test_id,
                session_id=session_id,
                variant_id=test.variant_ids[index],
                unit_key=key,
            )
        )
        enrolled[role] = Enrolment(
            Assignment(
                test_id=test.test_id,
                test_name=test.test_name,
                role=role.value,
                variant_id=test.variant_ids[index],
                variant=test.variant_names[index],
                version=version.version,
                version_id=version.id,
                unit_key=key,
            ),
            ResolvedTemplate(
                name=prompt.name,
                scope=prompt.scope or "global",
                template_id=prompt.id,
                version_id=version.id,
                version=version.version,
                source=version.content,
                content_hash=version.content_hash or content_hash(version.content),
                declared_variables=tuple(prompt.declared_variables or ()),
            ),
        )
    return enrolled
