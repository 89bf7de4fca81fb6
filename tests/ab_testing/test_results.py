"""Outcomes recorded per session, and results per variant from one aggregate query."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, event

from prompt_tool import ab_testing
from prompt_tool.ab_testing import ABTestInfo, choose_variant
from prompt_tool.compat import CreatedSession, create_session
from prompt_tool.core.errors import PermissionDenied
from prompt_tool.errors import InvalidInputError, NotFoundError
from prompt_tool.templates import TemplateManager

NewSession = Callable[..., CreatedSession]


def _keys_for(test: ABTestInfo, index: int, count: int) -> list[str]:
    """``count`` unit keys that the test assigns to variant ``index``."""
    keys = (f"user-{n}" for n in range(10_000))
    weights = [v.weight for v in test.variants]
    return [k for k in keys if choose_variant(test.id, k, weights) == index][:count]


def test_results_match_a_hand_computed_example(
    db_engine: Engine, running_test: ABTestInfo, new_session: NewSession, set_flag: Any
) -> None:
    set_flag("acme", "templates")
    control = [new_session(unit_key=k).session_id for k in _keys_for(running_test, 0, 11)]
    candidate = [new_session(unit_key=k).session_id for k in _keys_for(running_test, 1, 10)]
    # control: 11 sessions, 10 outcomes, 2 successes; metrics 1, 2, 3 (mean 2).
    for n, session_id in enumerate(control[:10]):
        metric = float(n + 1) if n < 3 else None
        ab_testing.record_outcome(db_engine, session_id, success=n < 2, metric=metric)
    # candidate: 10 sessions, 10 outcomes, 5 successes; metrics 4 and 6 (mean 5).
    for n, session_id in enumerate(candidate):
        ab_testing.record_outcome(db_engine, session_id, success=n % 2 == 0)
    ab_testing.record_outcome(db_engine, candidate[0], metric=4.0)
    ab_testing.record_outcome(db_engine, candidate[1], metric=6.0)

    results = ab_testing.ab_results(db_engine, running_test.id)

    rows = [
        (v.name, v.sessions, v.outcomes, v.successes, v.success_rate, v.metrics, v.mean_metric)
        for v in results.variants
    ]
    assert rows == [
        ("control", 11, 10, 2, 0.2, 3, pytest.approx(2.0)),
        ("candidate", 10, 10, 5, 0.5, 2, pytest.approx(5.0)),
    ]
    # By hand: pooled rate 7/20 = 0.35, pooled SE = sqrt(0.35 * 0.65 * (1/10 + 1/10))
    #   = sqrt(0.0455) = 0.2133073; z = 0.3 / 0.2133073 = 1.406422;
    #   p = 2 * (1 - Phi(1.406422)) = 0.159599.
    # Unpooled SE = sqrt(0.2 * 0.8 / 10 + 0.5 * 0.5 / 10) = sqrt(0.041) = 0.2024846;
    #   95% CI = 0.3 +- 1.959964 * 0.2024846 = 0.3 +- 0.3968625.
    (comparison,) = results.comparisons
    assert (comparison.variant, comparison.control) == ("candidate", "control")
    assert comparison.test.difference == pytest.approx(0.3)
    assert comparison.test.z == pytest.approx(1.406422, abs=1e-6)
    assert comparison.test.p_value == pytest.approx(0.159599, abs=1e-6)
    assert comparison.test.ci_low == pytest.approx(0.3 - 0.3968625, abs=1e-6)
    assert comparison.test.ci_high == pytest.approx(0.3 + 0.3968625, abs=1e-6)


def test_results_cost_a_fixed_number_of_queries_whatever_the_number_of_sessions(
    db_engine: Engine, running_test: ABTestInfo, new_session: NewSession, set_flag: Any
) -> None:
    set_flag("acme", "templates")

    def queries_for_results() -> int:
        statements: list[str] = []

        def count(*args: Any) -> None:
            statements.append(args[2])

        event.listen(db_engine, "before_cursor_execute", count)
        try:
            ab_testing.ab_results(db_engine, running_test.id)
        finally:
            event.remove(db_engine, "before_cursor_execute", count)
        return len([s for s in statements if "ab_assignments" in s])

    new_session()
    few = queries_for_results()
    for _ in range(6):
        new_session()
    assert queries_for_results() == few == 1


def test_a_test_without_sessions_has_empty_results(
    db_engine: Engine, running_test: ABTestInfo
) -> None:
    results = ab_testing.ab_results(db_engine, running_test.id, confidence=0.9)
    assert [(v.sessions, v.success_rate, v.mean_metric) for v in results.variants] == [
        (0, None, None),
        (0, None, None),
    ]
    assert results.comparisons[0].test.p_value is None
    assert results.comparisons[0].test.confidence == 0.9


def test_a_later_outcome_replaces_only_what_it_gives(
    db_engine: Engine, running_test: ABTestInfo, new_session: NewSession, set_flag: Any
) -> None:
    set_flag("acme", "templates")
    session_id = new_session().session_id
    ab_testing.record_outcome(db_engine, session_id, success=False, metric=1.5)
    (outcome,) = ab_testing.record_outcome(db_engine, session_id, success=True)
    assert (outcome.test_id, outcome.session_id, outcome.success, outcome.metric) == (
        running_test.id,
        session_id,
        True,
        1.5,
    )
    assert outcome.outcome_at is not None
    (by_test,) = ab_testing.record_outcome(db_engine, session_id, metric=2.0, test="wording")
    assert (by_test.success, by_test.metric) == (True, 2.0)


def test_outcomes_need_an_enrolled_session_and_something_to_record(
    db_engine: Engine,
    manager: TemplateManager,
    running_test: ABTestInfo,
    new_session: NewSession,
    set_flag: Any,
) -> None:
    set_flag("acme", "legacy")
    not_enrolled = new_session().session_id
    with pytest.raises(NotFoundError, match=f"session {not_enrolled} is not enrolled"):
        ab_testing.record_outcome(db_engine, not_enrolled, success=True)
    with pytest.raises(NotFoundError, match="no orchestration session with id 999"):
        ab_testing.record_outcome(db_engine, 999, success=True)
    with pytest.raises(InvalidInputError, match="success flag, a metric, or both"):
        ab_testing.record_outcome(db_engine, not_enrolled)
    with pytest.raises(InvalidInputError, match="finite"):
        ab_testing.record_outcome(db_engine, not_enrolled, metric=float("nan"))


def test_results_need_the_right_to_view_the_template(
    db_engine: Engine, running_test: ABTestInfo
) -> None:
    assert ab_testing.ab_results(db_engine, running_test.id, actor="vi").test.id == running_test.id
    with pytest.raises(PermissionDenied, match="stranger may not view"):
        ab_testing.ab_results(db_engine, running_test.id, actor="stranger")


def test_sessions_of_another_test_do_not_count(
    db_engine: Engine,
    manager: TemplateManager,
    running_test: ABTestInfo,
    new_session: NewSession,
    set_flag: Any,
) -> None:
    set_flag("acme", "templates")
    ab_testing.stop_ab_test(db_engine, running_test.id, actor="ed")
    second = ab_testing.create_ab_test(
        db_engine,
        running_test.template,
        "planner",
        [ab_testing.VariantSpec("control", 1), ab_testing.VariantSpec("other", 3)],
        name="second",
        actor="ed",
    )
    ab_testing.start_ab_test(db_engine, second.id, actor="ed")
    create_session(manager, "acme", {"planner": "planner"}, {"topic": "x"}, name="s")
    new_session()
    assert [v.sessions for v in ab_testing.ab_results(db_engine, running_test.id).variants] == [
        0,
        0,
    ]
    assert sum(v.sessions for v in ab_testing.ab_results(db_engine, second.id).variants) == 1
