"""Legacy A/B tests of orchestration prompts: what ``orch-migrate status`` reports.

Before templates, orchestration prompts were plain prompts with category ``orchestration``, and
their A/B tests rows of ``ab_tests`` on them. ``prompt-tool ab`` does not run those (they test
prompt versions no session references); an operator recreates each one on the template the
prompt became.
"""

from __future__ import annotations

from sqlalchemy import func, inspect, select

from prompt_tool.ab_testing.types import LegacyABTest
from prompt_tool.db.engine import Connectable, connect
from prompt_tool.db.models import ABTest, ABTestVariant, Project, Prompt, PromptType

__all__ = ["ORCHESTRATION_CATEGORY", "legacy_orchestration_ab_tests"]

ORCHESTRATION_CATEGORY = "orchestration"


def legacy_orchestration_ab_tests(db: Connectable) -> list[LegacyABTest]:
    """Every A/B test of a legacy orchestration prompt, by project and id, in one query.

    Works at revision 0001 too (before the expand step every prompt is a legacy one).
    """
    variants = func.count(ABTestVariant.id)
    query = (
        select(
            ABTest.id,
            ABTest.name,
            ABTest.status,
            Project.slug,
            Prompt.id,
            Prompt.name,
            variants,
        )
        .join(Prompt, Prompt.id == ABTest.prompt_id)
        .join(Project, Project.id == ABTest.project_id)
        .outerjoin(ABTestVariant, ABTestVariant.ab_test_id == ABTest.id)
        .where(Prompt.category == ORCHESTRATION_CATEGORY)
        .group_by(ABTest.id, ABTest.name, ABTest.status, Project.slug, Prompt.id, Prompt.name)
        .order_by(Project.slug, ABTest.id)
    )
    with connect(db) as connection:
        columns = {column["name"] for column in inspect(connection).get_columns("prompts")}
        if "prompt_type" in columns:
            # A template filed under category "orchestration" is not a legacy prompt.
            query = query.where(Prompt.prompt_type == PromptType.PROMPT.value)
        return [
            LegacyABTest(
                id=test_id,
                name=name,
                status=status,
                project=slug,
                prompt_id=prompt_id,
                prompt_name=prompt_name,
                variants=int(count),
            )
            for test_id, name, status, slug, prompt_id, prompt_name, count in connection.execute(
                query
            )
        ]
