"""Tests of orchestration templates in the legacy tables: create, start, pause, stop, list.

A test is a row of ``ab_tests`` whose ``prompt_id`` is an orchestration template and whose
``target_role`` names the session role it applies to; its variants are ``ab_test_variants``
rows pointing at versions of that template. Legacy tests (``target_role`` NULL, on plain
prompts) are left alone: every function here refuses them.

Who may do what: the same as editing the template (``check_template_access`` with
:attr:`Action.EDIT` on its address) for every change; viewing it for reads. Every change is
also recorded in the template's history (``template_events``), so who started or stopped a test
of a template, and when, is in the same audit trail as its label moves.

At most one test runs per (template, role, project): a session's role resolves to exactly one
template, so this is what guarantees that a session is never enrolled in two tests for the same
role. ``start`` enforces it under a lock on the template's row (PostgreSQL), after its own
status update (which takes SQLite's one write lock), so two concurrent starts cannot both win.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from prompt_tool.ab_testing.errors import (
    ABTestConflictError,
    ABTestFrozenError,
    ABTestStateError,
)
from prompt_tool.ab_testing.types import (
    ABTestInfo,
    ABTestStatus,
    TestRef,
    VariantInfo,
    VariantSpec,
)
from prompt_tool.core.errors import PermissionDenied, TemplateNotFound
from prompt_tool.db.engine import Connectable, make_session_factory, session_scope
from prompt_tool.db.models import (
    ABTest,
    ABTestVariant,
    Project,
    Prompt,
    PromptRole,
    PromptType,
    PromptVersion,
    Scope,
    TemplateEvent,
)
from prompt_tool.db.projects import get_project
from prompt_tool.db.revision_guard import require_known_revision
from prompt_tool.db.revisions import EXPAND
from prompt_tool.errors import InvalidInputError, NotFoundError
from prompt_tool.templates import Action, TemplateAddress, find_template
from prompt_tool.templates.permissions import check_access as check_template_access

__all__ = [
    "create_ab_test",
    "get_ab_test",
    "list_ab_tests",
    "pause_ab_test",
    "set_variants",
    "start_ab_test",
    "stop_ab_test",
]

_TEMPLATE = PromptType.ORCHESTRATION_TEMPLATE.value
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,49}$")
MAX_WEIGHT = 1_000_000
_MAX_TEST_NAME = 200

# What may follow what; a test already in the target state is left as it is (no error).
_ALLOWED_FROM = {
    ABTestStatus.RUNNING: {ABTestStatus.DRAFT, ABTestStatus.PAUSED},
    ABTestStatus.PAUSED: {ABTestStatus.RUNNING},
    ABTestStatus.STOPPED: {ABTestStatus.DRAFT, ABTestStatus.RUNNING, ABTestStatus.PAUSED},
}
_VERB = {
    ABTestStatus.RUNNING: "start",
    ABTestStatus.PAUSED: "pause",
    ABTestStatus.STOPPED: "stop",
}
# The history's name for each change (template_events.action).
_EVENT = {
    ABTestStatus.RUNNING: "ab_test_started",
    ABTestStatus.PAUSED: "ab_test_paused",
    ABTestStatus.STOPPED: "ab_test_stopped",
}


@contextmanager
def unit_of_work(db: Connectable) -> Iterator[Session]:
    """One transaction over A/B tests of templates: refused first on a schema this prompt-tool
    does not know, or one before the templates tables (checked once per engine)."""
    require_known_revision(db, "work with A/B tests of templates", needs=EXPAND)
    with session_scope(make_session_factory(db)) as session:
        yield session


# --- lookups ---------------------------------------------------------------------------------


def _role(value: str | PromptRole) -> PromptRole:
    try:
        return PromptRole(value)
    except ValueError:
        roles = ", ".join(r.value for r in PromptRole)
        raise InvalidInputError(f"unknown session role {value!r}; use {roles}") from None


def _address_of(session: Session, prompt: Prompt) -> TemplateAddress:
    slug = session.get_one(Project, prompt.project_id).slug if prompt.project_id else None
    return TemplateAddress(
        prompt.name, Scope(prompt.scope or Scope.GLOBAL.value), slug, prompt.owner
    )


def check_access(session: Session, actor: str, action: Action, prompt: Prompt) -> TemplateAddress:
    """Raise :class:`PermissionDenied` unless ``actor`` may ``action`` the template."""
    address = _address_of(session, prompt)
    check_template_access(session, actor, action, address)
    return address


def load_test(session: Session, ref: TestRef, *, lock: bool = False) -> tuple[ABTest, Prompt]:
    """The template test ``ref`` names (an id, or a unique name) and its template."""
    query = select(ABTest, Prompt).join(Prompt, Prompt.id == ABTest.prompt_id)
    if isinstance(ref, int) or ref.isdigit():
        query = query.where(ABTest.id == int(ref))
    else:
        query = query.where(ABTest.name == ref, ABTest.target_role.is_not(None))
    if lock:
        query = query.with_for_update(of=ABTest)
    rows = session.execute(query).all()
    if not rows:
        raise NotFoundError(f"no A/B test {ref!r}; `prompt-tool ab list` shows the tests")
    if len(rows) > 1:
        ids = ", ".join(str(test.id) for test, _ in rows)
        raise InvalidInputError(f"several A/B tests are named {ref!r} (ids {ids}); use the id")
    test, prompt = rows[0]
    if test.target_role is None or prompt.prompt_type != _TEMPLATE:
        raise InvalidInputError(
            f"A/B test {test.id} {test.name!r} is a legacy test of a plain prompt; "
            "`prompt-tool ab` runs tests of orchestration templates only"
        )
    return test, prompt


def infos_of(session: Session, tests: Sequence[ABTest]) -> list[ABTestInfo]:
    """Infos of ``tests`` (with variants), in two statements whatever their number."""
    if not tests:
        return []
    ids = [test.id for test in tests]
    owner_project = aliased(Project)
    heads = {
        test_id: (prompt, slug, template_slug)
        for test_id, prompt, slug, template_slug in session.execute(
            select(ABTest.id, Prompt, Project.slug, owner_project.slug)
            .join(Prompt, Prompt.id == ABTest.prompt_id)
            .join(Project, Project.id == ABTest.project_id)
            .outerjoin(owner_project, owner_project.id == Prompt.project_id)
            .where(ABTest.id.in_(ids))
        )
    }
    variants: dict[int, list[tuple[ABTestVariant, PromptVersion]]] = {
        test_id: [] for test_id in ids
    }
    for variant, version in session.execute(
        select(ABTestVariant, PromptVersion)
        .join(PromptVersion, PromptVersion.id == ABTestVariant.prompt_version_id)
        .where(ABTestVariant.ab_test_id.in_(ids))
        .order_by(ABTestVariant.ab_test_id, ABTestVariant.id)
    ):
        variants[variant.ab_test_id].append((variant, version))
    infos = []
    for test in tests:
        prompt, slug, template_slug = heads[test.id]
        total = sum(variant.weight for variant, _ in variants[test.id]) or 1
        infos.append(
            ABTestInfo(
                id=test.id,
                name=test.name,
                status=ABTestStatus(test.status),
                project=slug,
                template=TemplateAddress(
                    prompt.name,
                    Scope(prompt.scope or Scope.GLOBAL.value),
                    template_slug,
                    prompt.owner,
                ),
                template_id=prompt.id,
                role=test.target_role or "",
                variants=tuple(
                    VariantInfo(
                        id=variant.id,
                        name=variant.name,
                        version=version.version,
                        version_id=version.id,
                        weight=variant.weight,
                        share=variant.weight / total,
                    )
                    for variant, version in variants[test.id]
                ),
                created_at=test.created_at,
            )
        )
    return infos


def _record(
    session: Session, test: ABTest, prompt: Prompt, action: str, actor: str, note: str
) -> None:
    session.add(
        TemplateEvent(
            prompt_id=prompt.id,
            action=action,
            actor=actor,
            note=f"A/B test {test.id} {test.name!r} (role {test.target_role}): {note}",
        )
    )


# --- variants --------------------------------------------------------------------------------


def _checked_variants(
    session: Session, prompt: Prompt, specs: Sequence[VariantSpec]
) -> list[tuple[VariantSpec, PromptVersion]]:
    if len(specs) < 2:
        raise InvalidInputError(
            "an A/B test needs at least two variants, e.g. --variant control=1 "
            "--variant candidate=2"
        )
    names: set[str] = set()
    numbers: set[int] = set()
    for spec in specs:
        if not _VARIANT_NAME.match(spec.name):
            raise InvalidInputError(
                f"variant name {spec.name!r} must start with a letter or digit and use only "
                "letters, digits and _ . - (at most 50)"
            )
        if spec.name in names:
            raise InvalidInputError(f"two variants are named {spec.name!r}; name each once")
        if spec.version in numbers:
            raise InvalidInputError(
                f"two variants test version {spec.version}; give each variant its own version"
            )
        if isinstance(spec.weight, bool) or not 1 <= spec.weight <= MAX_WEIGHT:
            raise InvalidInputError(
                f"variant {spec.name!r} has weight {spec.weight!r}; use a whole number from 1 "
                f"to {MAX_WEIGHT} (weights are relative: 50 and 50 split evenly)"
            )
        names.add(spec.name)
        numbers.add(spec.version)
    versions = {
        version.version: version
        for version in session.scalars(
            select(PromptVersion).where(
                PromptVersion.prompt_id == prompt.id, PromptVersion.version.in_(numbers)
            )
        )
    }
    for spec in specs:
        if spec.version not in versions:
            raise TemplateNotFound(
                f"template {prompt.name!r} has no version {spec.version} (variant {spec.name!r})",
                hint="`prompt-tool templates history` lists its versions",
            )
    return [(spec, versions[spec.version]) for spec in specs]


def _describe_variants(rows: Sequence[tuple[VariantSpec, PromptVersion]]) -> str:
    return ", ".join(f"{spec.name}=v{spec.version}:{spec.weight}" for spec, _ in rows)


def _add_variants(
    session: Session, test: ABTest, rows: Sequence[tuple[VariantSpec, PromptVersion]]
) -> None:
    session.add_all(
        ABTestVariant(
            ab_test_id=test.id, prompt_version_id=version.id, name=spec.name, weight=spec.weight
        )
        for spec, version in rows
    )
    session.flush()


# --- the library -----------------------------------------------------------------------------


def create_ab_test(
    db: Connectable,
    address: TemplateAddress,
    role: str | PromptRole,
    variants: Sequence[VariantSpec],
    *,
    name: str,
    actor: str,
    project: str | None = None,
) -> ABTestInfo:
    """A draft test of ``role`` of the template at ``address``, with its variants.

    It enrols sessions of the template's project; a test of a global template names the
    project whose sessions it enrols with ``project``.
    """
    target = _role(role)
    if not name.strip() or len(name) > _MAX_TEST_NAME:
        raise InvalidInputError(f"a test needs a name of 1 to {_MAX_TEST_NAME} characters")
    if name.isdigit():
        raise InvalidInputError(f"test name {name!r} must not be a number (ids are numbers)")
    with unit_of_work(db) as session:
        prompt = find_template(session, address)
        check_access(session, actor, Action.EDIT, prompt)
        if address.scope is Scope.GLOBAL:
            if project is None:
                raise InvalidInputError(
                    f"a test of the global {address.describe()} enrols the sessions of one "
                    "project: name it with --project SLUG"
                )
            project_id = get_project(session, project).id
        else:
            if project is not None and project != address.project:
                raise InvalidInputError(
                    f"{address.describe()} belongs to project {address.project}, so its test "
                    f"enrols that project's sessions, not {project}'s"
                )
            assert prompt.project_id is not None
            project_id = prompt.project_id
        rows = _checked_variants(session, prompt, variants)
        test = ABTest(
            project_id=project_id,
            prompt_id=prompt.id,
            name=name,
            status=ABTestStatus.DRAFT.value,
            target_role=target.value,
        )
        session.add(test)
        session.flush()
        _add_variants(session, test, rows)
        _record(session, test, prompt, "ab_test_created", actor, _describe_variants(rows))
        session.refresh(test)
        return infos_of(session, [test])[0]


def set_variants(
    db: Connectable, test_ref: TestRef, variants: Sequence[VariantSpec], *, actor: str
) -> ABTestInfo:
    """Replace a draft test's variants; a test that has run keeps its own (create a new one)."""
    with unit_of_work(db) as session:
        test, prompt = load_test(session, test_ref, lock=True)
        check_access(session, actor, Action.EDIT, prompt)
        if test.status != ABTestStatus.DRAFT.value:
            raise ABTestFrozenError(
                f"A/B test {test.id} {test.name!r} is {test.status}: its variants and weights "
                "are frozen once it has run, so every unit keeps its variant; create a new test "
                "to try other variants"
            )
        rows = _checked_variants(session, prompt, variants)
        for variant in session.scalars(
            select(ABTestVariant).where(ABTestVariant.ab_test_id == test.id)
        ):
            session.delete(variant)
        session.flush()
        _add_variants(session, test, rows)
        _record(session, test, prompt, "ab_test_changed", actor, _describe_variants(rows))
        return infos_of(session, [test])[0]


def transition(
    db: Connectable,
    test_ref: TestRef,
    target: ABTestStatus,
    actor: str,
    *,
    note: str | None = None,
) -> ABTestInfo:
    """Move a test to ``target`` (see :class:`ABTestStatus`); recorded in the history."""
    with unit_of_work(db) as session:
        test, prompt = load_test(session, test_ref, lock=True)
        check_access(session, actor, Action.EDIT, prompt)
        current = ABTestStatus(test.status)
        if current is target:
            return replace(infos_of(session, [test])[0], changed=False)
        if current not in _ALLOWED_FROM[target]:
            hint = {
                ABTestStatus.STOPPED: "a stopped test stays stopped; create a new test",
                ABTestStatus.DRAFT: "start it first",
            }.get(current, "")
            raise ABTestStateError(
                f"A/B test {test.id} {test.name!r} is {current.value} and cannot "
                f"{_VERB[target]}" + (f"; {hint}" if hint else "")
            )
        if target is ABTestStatus.RUNNING:
            _start_checks(session, test, prompt)
        test.status = target.value
        session.flush()
        if target is ABTestStatus.RUNNING:
            _only_running(session, test, prompt)
        change = f"{current.value} -> {target.value}" + (f" ({note})" if note else "")
        _record(session, test, prompt, _EVENT[target], actor, change)
        return infos_of(session, [test])[0]


def _start_checks(session: Session, test: ABTest, prompt: Prompt) -> None:
    # Serialise starts of tests of one template (PostgreSQL; SQLite has one writer anyway).
    session.execute(select(Prompt.id).where(Prompt.id == prompt.id).with_for_update())
    count = session.scalar(
        select(func.count()).select_from(ABTestVariant).where(ABTestVariant.ab_test_id == test.id)
    )
    if (count or 0) < 2:
        raise ABTestStateError(
            f"A/B test {test.id} {test.name!r} has {count or 0} variant(s); it needs at least "
            "two to start"
        )


def _only_running(session: Session, test: ABTest, prompt: Prompt) -> None:
    """After this test's own update, so a concurrent start has either committed or waits."""
    other = session.scalar(
        select(ABTest.id)
        .where(
            ABTest.prompt_id == prompt.id,
            ABTest.target_role == test.target_role,
            ABTest.project_id == test.project_id,
            ABTest.status == ABTestStatus.RUNNING.value,
            ABTest.id != test.id,
        )
        .limit(1)
    )
    if other is not None:
        raise ABTestConflictError(
            f"A/B test {other} already runs on role {test.target_role} of template "
            f"{prompt.name!r} in this project; pause or stop it before starting test {test.id}"
        )


def start_ab_test(db: Connectable, test_ref: TestRef, *, actor: str) -> ABTestInfo:
    """Start (or resume) a test: new sessions of its project are enrolled from now on."""
    return transition(db, test_ref, ABTestStatus.RUNNING, actor)


def pause_ab_test(db: Connectable, test_ref: TestRef, *, actor: str) -> ABTestInfo:
    """Stop enrolling new sessions for now; outcomes may still be recorded."""
    return transition(db, test_ref, ABTestStatus.PAUSED, actor)


def stop_ab_test(db: Connectable, test_ref: TestRef, *, actor: str) -> ABTestInfo:
    """End the test for good; its results stay readable and outcomes recordable."""
    return transition(db, test_ref, ABTestStatus.STOPPED, actor)


def get_ab_test(db: Connectable, test_ref: TestRef, *, actor: str | None = None) -> ABTestInfo:
    """One test with its variants (``actor``: only if they may view the template)."""
    with unit_of_work(db) as session:
        test, prompt = load_test(session, test_ref)
        if actor is not None:
            check_access(session, actor, Action.VIEW, prompt)
        return infos_of(session, [test])[0]


def list_ab_tests(
    db: Connectable,
    *,
    project: str | None = None,
    status: ABTestStatus | None = None,
    actor: str | None = None,
) -> list[ABTestInfo]:
    """Tests of orchestration templates, newest first (``actor``: those they may view)."""
    with unit_of_work(db) as session:
        query = (
            select(ABTest, Prompt)
            .join(Prompt, Prompt.id == ABTest.prompt_id)
            .where(ABTest.target_role.is_not(None), Prompt.prompt_type == _TEMPLATE)
            .order_by(ABTest.id.desc())
        )
        if project is not None:
            query = query.where(ABTest.project_id == get_project(session, project).id)
        if status is not None:
            query = query.where(ABTest.status == status.value)
        rows = [(test, prompt) for test, prompt in session.execute(query)]
        if actor is not None:
            visible: dict[int, bool] = {}
            for _, prompt in rows:
                if prompt.id not in visible:
                    try:
                        check_access(session, actor, Action.VIEW, prompt)
                        visible[prompt.id] = True
                    except PermissionDenied:
                        visible[prompt.id] = False
            rows = [(test, prompt) for test, prompt in rows if visible[prompt.id]]
        return infos_of(session, [test for test, _ in rows])
