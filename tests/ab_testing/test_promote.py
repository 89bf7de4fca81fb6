"""Promoting a winner moves the template's production label (recorded in its history) and stops
the test; new sessions then get the winner without any test."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine

from prompt_tool import ab_testing
from prompt_tool.ab_testing import ABTestInfo, ABTestStateError, ABTestStatus
from prompt_tool.compat import CreatedSession
from prompt_tool.core.errors import PermissionDenied
from prompt_tool.errors import NotFoundError
from prompt_tool.templates import TemplateManager

from .conftest import CONTROL_AND_CANDIDATE, PLANNER

NewSession = Callable[..., CreatedSession]


def test_promote_moves_production_to_the_winner_records_it_and_stops_the_test(
    db_engine: Engine,
    manager: TemplateManager,
    running_test: ABTestInfo,
    new_session: NewSession,
    set_flag: Any,
) -> None:
    set_flag("acme", "templates")

    promotion = ab_testing.promote_variant(
        manager, running_test.id, "candidate", actor="ed", note="clearer plans"
    )

    assert (promotion.label, promotion.from_version, promotion.to_version) == ("production", 1, 2)
    assert promotion.label_moved
    assert manager.show(PLANNER).summary.labels["production"] == 2
    assert ab_testing.get_ab_test(db_engine, running_test.id).status is ABTestStatus.STOPPED
    moved, stopped = manager.history(PLANNER)[-2:]
    why = f"promoted variant candidate of A/B test {running_test.id} 'wording'"
    assert (moved.action, moved.actor, moved.label) == ("label_moved", "ed", "production")
    assert (moved.from_version, moved.to_version) == (1, 2)
    assert moved.note == f"{why}: clearer plans"
    assert (stopped.action, stopped.actor) == ("ab_test_stopped", "ed")
    assert stopped.note is not None and why in stopped.note
    after = new_session()
    assert (after.assignments, after.versions["planner"]) == ({}, 2)


def test_promoting_again_moves_nothing_twice(
    db_engine: Engine, manager: TemplateManager, running_test: ABTestInfo
) -> None:
    ab_testing.promote_variant(manager, running_test.id, "candidate", actor="ed")
    events = len(manager.history(PLANNER))

    again = ab_testing.promote_variant(manager, running_test.id, "candidate", actor="ed")

    assert (again.label_moved, again.to_version) == (False, 2)
    assert len(manager.history(PLANNER)) == events


def test_promoting_the_control_keeps_production_and_still_stops(
    db_engine: Engine, manager: TemplateManager, running_test: ABTestInfo
) -> None:
    promotion = ab_testing.promote_variant(manager, "wording", "control", actor="root")
    assert (promotion.label_moved, promotion.to_version) == (False, 1)
    assert ab_testing.get_ab_test(db_engine, running_test.id).status is ABTestStatus.STOPPED


def test_promote_needs_the_right_to_edit_the_template(
    db_engine: Engine, manager: TemplateManager, running_test: ABTestInfo
) -> None:
    with pytest.raises(PermissionDenied, match="vi may not edit"):
        ab_testing.promote_variant(manager, running_test.id, "candidate", actor="vi")
    assert manager.show(PLANNER).summary.labels["production"] == 1
    assert ab_testing.get_ab_test(db_engine, running_test.id).status is ABTestStatus.RUNNING


def test_promote_refuses_a_draft_and_an_unknown_variant(
    db_engine: Engine, manager: TemplateManager, running_test: ABTestInfo
) -> None:
    draft = ab_testing.create_ab_test(
        db_engine, PLANNER, "system", CONTROL_AND_CANDIDATE, name="draft", actor="ed"
    )
    with pytest.raises(ABTestStateError, match="draft and has no results"):
        ab_testing.promote_variant(manager, draft.id, "candidate", actor="ed")
    with pytest.raises(NotFoundError, match="no variant 'nope'; its variants are control, cand"):
        ab_testing.promote_variant(manager, running_test.id, "nope", actor="ed")
