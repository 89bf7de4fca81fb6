"""Promotion: the winner becomes the template's ``production`` version, and the test stops.

The label moves through :meth:`TemplateManager.move_label`, so it is checked, recorded in the
template's history and invalidates the name caches exactly like any other label move. Then the
test stops (recorded too). Should the process die in between, running ``promote`` again finishes
the job: a label already at the winner is not moved (nor recorded) a second time.
"""

from __future__ import annotations

from sqlalchemy import select

from prompt_tool.ab_testing.errors import ABTestStateError
from prompt_tool.ab_testing.store import (
    check_access,
    infos_of,
    load_test,
    transition,
    unit_of_work,
)
from prompt_tool.ab_testing.types import ABTestStatus, Promotion, TestRef
from prompt_tool.db.models import PromptVersion, TemplateLabel
from prompt_tool.errors import NotFoundError
from prompt_tool.templates import DEFAULT_LABEL, Action, TemplateManager

__all__ = ["promote_variant"]


def promote_variant(
    manager: TemplateManager,
    test: TestRef,
    variant: str,
    *,
    actor: str,
    note: str | None = None,
) -> Promotion:
    """Point the tested template's ``production`` label at ``variant``'s version; stop the test.

    Needs the right to edit the template. A draft test (never run) has nothing to promote.
    """
    with unit_of_work(manager.engine) as session:
        row, prompt = load_test(session, test)
        address = check_access(session, actor, Action.EDIT, prompt)
        if row.status == ABTestStatus.DRAFT.value:
            raise ABTestStateError(
                f"A/B test {row.id} {row.name!r} is a draft and has no results; start it first"
            )
        info = infos_of(session, [row])[0]
        chosen = next((v for v in info.variants if v.name == variant), None)
        if chosen is None:
            names = ", ".join(v.name for v in info.variants)
            raise NotFoundError(
                f"A/B test {row.id} {row.name!r} has no variant {variant!r}; its variants are "
                f"{names}"
            )
        current = session.scalar(
            select(PromptVersion.version)
            .join(TemplateLabel, TemplateLabel.prompt_version_id == PromptVersion.id)
            .where(TemplateLabel.prompt_id == prompt.id, TemplateLabel.label == DEFAULT_LABEL)
        )
    why = f"promoted variant {chosen.name} of A/B test {info.id} {info.name!r}"
    moved = current != chosen.version
    if moved:
        manager.move_label(
            address,
            DEFAULT_LABEL,
            chosen.version,
            actor=actor,
            note=f"{why}: {note}" if note else why,
        )
    transition(manager.engine, info.id, ABTestStatus.STOPPED, actor, note=why)
    return Promotion(
        test_id=info.id,
        test_name=info.name,
        template=address,
        variant=chosen.name,
        label=DEFAULT_LABEL,
        from_version=current,
        to_version=chosen.version,
        label_moved=moved,
    )
