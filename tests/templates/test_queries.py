"""Template queries cost the same number of statements for 10 or 1,000 templates, and the
lookups use the expand step's indexes."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, insert, text
from statements import statements_run

from prompt_tool.db.engine import make_session_factory, session_scope
from prompt_tool.db.models import Prompt, PromptType, PromptVersion, Scope, TemplateLabel
from prompt_tool.db.projects import get_project
from prompt_tool.templates import TemplateManager


def _bulk_templates(engine: Engine, count: int, prefix: str) -> None:
    with session_scope(make_session_factory(engine)) as session:
        project_id = get_project(session, "acme").id
    with engine.begin() as connection:
        for number in range(count):
            prompt_id = connection.execute(
                insert(Prompt)
                .values(
                    name=f"{prefix}-{number}",
                    content="text",
                    prompt_type=PromptType.ORCHESTRATION_TEMPLATE.value,
                    scope=Scope.PROJECT.value,
                    project_id=project_id,
                    is_template=True,
                )
                .returning(Prompt.id)
            ).scalar_one()
            version_id = connection.execute(
                insert(PromptVersion)
                .values(prompt_id=prompt_id, version=1, content="text", content_hash="h")
                .returning(PromptVersion.id)
            ).scalar_one()
            connection.execute(
                insert(TemplateLabel),
                [
                    {"prompt_id": prompt_id, "label": label, "prompt_version_id": version_id}
                    for label in ("latest", "production")
                ],
            )


def test_listing_costs_the_same_statements_for_10_and_1000_templates(
    manager: TemplateManager, db_engine: Engine
) -> None:
    _bulk_templates(db_engine, 10, "small")
    manager.list_templates(
        project="acme"
    )  # warm the slug -> id map, which never needs a query again
    with statements_run(db_engine) as small:
        assert len(manager.list_templates(project="acme", search="small")) == 10
    _bulk_templates(db_engine, 990, "big")
    with statements_run(db_engine) as large:
        listed = manager.list_templates(project="acme")
    assert len(listed) == 1000
    assert all(t.labels == {"latest": 1, "production": 1} for t in listed)
    assert len(large) == len(small)


@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgresql"], indirect=True)
def test_lookups_use_the_indexes(manager: TemplateManager, db_engine: Engine) -> None:
    _bulk_templates(db_engine, 200, "t")
    with db_engine.connect() as connection:
        connection.execute(text("ANALYZE prompts"))
        connection.execute(text("SET enable_seqscan = off"))

        def plan(sql: str) -> str:
            rows = connection.execute(text(f"EXPLAIN {sql}")).scalars().all()
            return "\n".join(rows)

        by_type_and_project = plan(
            "SELECT id FROM prompts WHERE prompt_type = 'orchestration_template' AND project_id = 1"
        )
        by_scope_and_name = plan("SELECT id FROM prompts WHERE scope = 'project' AND name = 't-5'")
    assert "ix_prompts_type_project" in by_type_and_project
    assert "ix_prompts_scope_name" in by_scope_and_name or "uq_prompts_project_name" in (
        by_scope_and_name
    )
