"""Outcomes and results: what happened to each enrolled session, and what it says per variant.

Recording an outcome needs no role: outcomes come from the application that ran the session
(the same writer that created it, which needs none either), and they only annotate an existing
enrolment. Reading results needs view access to the template.
"""

from __future__ import annotations

import math

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from prompt_tool.ab_testing.stats import DEFAULT_CONFIDENCE, normal_quantile, two_proportion_z_test
from prompt_tool.ab_testing.store import check_access, infos_of, load_test, unit_of_work
from prompt_tool.ab_testing.types import (
    ABResults,
    Comparison,
    RecordedOutcome,
    TestRef,
    VariantResult,
)
from prompt_tool.db.engine import Connectable
from prompt_tool.db.models import ABAssignment, ABTest, ABTestVariant, OrchestrationSession
from prompt_tool.errors import InvalidInputError, NotFoundError
from prompt_tool.templates import Action

__all__ = ["ab_results", "record_outcome"]


def _check_outcome(success: bool | None, metric: float | None) -> float | None:
    if success is None and metric is None:
        raise InvalidInputError(
            "an outcome needs a success flag, a metric, or both (--success/--failure, --metric)"
        )
    if metric is None:
        return None
    value = float(metric)
    if not math.isfinite(value):
        raise InvalidInputError(f"metric {metric!r} must be a finite number")
    return value


def _test_id(session: Session, test: TestRef | None) -> int | None:
    return None if test is None else load_test(session, test)[0].id


def record_outcome(
    db: Connectable,
    session_id: int,
    *,
    success: bool | None = None,
    metric: float | None = None,
    test: TestRef | None = None,
) -> list[RecordedOutcome]:
    """Record how session ``session_id`` went, in every test it is enrolled in (or ``test``).

    A later call replaces what it gives (a success flag, a metric) and keeps the rest.
    """
    value = _check_outcome(success, metric)
    with unit_of_work(db) as session:
        test_id = _test_id(session, test)
        condition = [ABAssignment.session_id == session_id]
        if test_id is not None:
            condition.append(ABAssignment.ab_test_id == test_id)
        changes: dict[str, object] = {"outcome_at": func.now()}
        if success is not None:
            changes["success"] = success
        if value is not None:
            changes["metric"] = value
        session.execute(
            update(ABAssignment).where(*condition).values(**changes),
            execution_options={"synchronize_session": False},
        )
        rows = session.execute(
            select(ABAssignment, ABTest.name, ABTestVariant.name)
            .join(ABTest, ABTest.id == ABAssignment.ab_test_id)
            .join(ABTestVariant, ABTestVariant.id == ABAssignment.variant_id)
            .where(*condition)
            .order_by(ABAssignment.ab_test_id)
        ).all()
        if not rows:
            exists = session.scalar(
                select(OrchestrationSession.id).where(OrchestrationSession.id == session_id)
            )
            if exists is None:
                raise NotFoundError(f"no orchestration session with id {session_id}")
            where = f"A/B test {test_id}" if test_id is not None else "any A/B test"
            raise NotFoundError(
                f"session {session_id} is not enrolled in {where}; only sessions created "
                "while a test of their template was running have outcomes to record"
            )
        return [
            RecordedOutcome(
                test_id=assignment.ab_test_id,
                test_name=test_name,
                session_id=session_id,
                variant=variant_name,
                success=assignment.success,
                metric=assignment.metric,
                outcome_at=assignment.outcome_at,
            )
            for assignment, test_name, variant_name in rows
        ]


def ab_results(
    db: Connectable,
    test: TestRef,
    *,
    actor: str | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
) -> ABResults:
    """Per variant: sessions, successes, success rate, mean metric; and each variant against
    the control (the first variant) by a two-proportion z-test.

    The counts come from one aggregate query, whatever the number of sessions.
    """
    normal_quantile(confidence)  # bad input fails before any query
    with unit_of_work(db) as session:
        row, prompt = load_test(session, test)
        if actor is not None:
            check_access(session, actor, Action.VIEW, prompt)
        info = infos_of(session, [row])[0]
        successes = func.sum(case((ABAssignment.success.is_(True), 1), else_=0))
        counts = {
            variant_id: (int(sessions), int(outcomes), int(won or 0), int(metrics), mean)
            for variant_id, sessions, outcomes, won, metrics, mean in session.execute(
                select(
                    ABTestVariant.id,
                    func.count(ABAssignment.session_id),
                    func.count(ABAssignment.success),
                    successes,
                    func.count(ABAssignment.metric),
                    func.avg(ABAssignment.metric),
                )
                .outerjoin(
                    ABAssignment,
                    (ABAssignment.variant_id == ABTestVariant.id)
                    & (ABAssignment.ab_test_id == ABTestVariant.ab_test_id),
                )
                .where(ABTestVariant.ab_test_id == row.id)
                .group_by(ABTestVariant.id)
            )
        }
    results = []
    for variant in info.variants:
        sessions, outcomes, won, metrics, mean = counts.get(variant.id, (0, 0, 0, 0, None))
        results.append(
            VariantResult(
                variant_id=variant.id,
                name=variant.name,
                version=variant.version,
                weight=variant.weight,
                sessions=sessions,
                outcomes=outcomes,
                successes=won,
                success_rate=won / outcomes if outcomes else None,
                metrics=metrics,
                mean_metric=float(mean) if mean is not None else None,
            )
        )
    control = results[0] if results else None
    comparisons = tuple(
        Comparison(
            variant=result.name,
            control=control.name,
            test=two_proportion_z_test(
                control.successes,
                control.outcomes,
                result.successes,
                result.outcomes,
                confidence=confidence,
            ),
        )
        for result in results[1:]
        if control is not None
    )
    return ABResults(info, tuple(results), comparisons)
