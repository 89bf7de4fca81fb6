"""The legacy schema: what existing deployments run today.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from prompt_tool.db.online_ddl import refuse_unless_asked

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite only auto-assigns INTEGER PRIMARY KEY (the rowid alias), not BIGINT.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
NOW = sa.text("CURRENT_TIMESTAMP")


def _id() -> sa.Column[int]:
    return sa.Column("id", BIG_ID, sa.Identity(), nullable=False)


def _timestamp(name: str) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False, server_default=NOW)


def upgrade() -> None:
    op.create_table(
        "projects",
        _id(),
        sa.Column("slug", sa.String(100), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_projects"),
        sa.UniqueConstraint("slug", name="uq_projects_slug"),
    )
    op.create_table(
        "prompts",
        _id(),
        sa.Column("project_id", BIG_ID, nullable=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("category", sa.String(50), nullable=True),
        sa.Column("is_template", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_prompts"),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name="fk_prompts_project_id_projects"
        ),
    )
    op.create_table(
        "prompt_versions",
        _id(),
        sa.Column("prompt_id", BIG_ID, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(100), nullable=True),
        sa.Column("change_note", sa.Text(), nullable=True),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_prompt_versions"),
        sa.ForeignKeyConstraint(
            ["prompt_id"],
            ["prompts.id"],
            name="fk_prompt_versions_prompt_id_prompts",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("prompt_id", "version", name="uq_prompt_versions_prompt_id_version"),
    )
    op.create_table(
        "orchestration_sessions",
        _id(),
        sa.Column("project_id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False, server_default="pending"),
        sa.Column("system_prompt", sa.Text(), nullable=True),
        sa.Column("planner_prompt", sa.Text(), nullable=True),
        sa.Column("synthesis_prompt", sa.Text(), nullable=True),
        sa.Column("variables", sa.JSON(), nullable=True),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_orchestration_sessions"),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name="fk_orchestration_sessions_project_id_projects"
        ),
    )
    op.create_index(
        "ix_orchestration_sessions_project_id", "orchestration_sessions", ["project_id"]
    )
    op.create_table(
        "ab_tests",
        _id(),
        sa.Column("project_id", BIG_ID, nullable=False),
        sa.Column("prompt_id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False, server_default="draft"),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_ab_tests"),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name="fk_ab_tests_project_id_projects"
        ),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name="fk_ab_tests_prompt_id_prompts"
        ),
    )
    op.create_table(
        "ab_test_variants",
        _id(),
        sa.Column("ab_test_id", BIG_ID, nullable=False),
        sa.Column("prompt_version_id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(50), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False, server_default="1"),
        sa.PrimaryKeyConstraint("id", name="pk_ab_test_variants"),
        sa.ForeignKeyConstraint(
            ["ab_test_id"],
            ["ab_tests.id"],
            name="fk_ab_test_variants_ab_test_id_ab_tests",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["prompt_version_id"],
            ["prompt_versions.id"],
            name="fk_ab_test_variants_prompt_version_id_prompt_versions",
        ),
    )


# Going below 0001 drops the deployment's own tables, with every session and prompt in them.
DROP_LEGACY_TABLES = "i-understand-this-drops-legacy-tables"


def downgrade() -> None:
    refuse_unless_asked(
        DROP_LEGACY_TABLES,
        "refused: going below 0001 drops the legacy tables (projects, prompts, every "
        "orchestration session) and everything in them; 0001 is where the rollback ends. If "
        "you really mean it: `orch-migrate db downgrade base "
        f"--{DROP_LEGACY_TABLES}` (alembic: -x {DROP_LEGACY_TABLES})",
    )
    op.drop_table("ab_test_variants")
    op.drop_table("ab_tests")
    op.drop_index("ix_orchestration_sessions_project_id", table_name="orchestration_sessions")
    op.drop_table("orchestration_sessions")
    op.drop_table("prompt_versions")
    op.drop_table("prompts")
    op.drop_table("projects")
