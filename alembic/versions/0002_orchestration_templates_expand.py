"""Expand: orchestration templates, session prompt references, flags, migration runs.

Only adds. On the existing tables: nullable columns or a constant default (no table rewrite on
PostgreSQL 11+), indexes built CONCURRENTLY, a CHECK added NOT VALID and validated in its own
transaction. The legacy columns are never touched.

downgrade() is the exact inverse for the legacy tables: it removes what this revision added and
every row the new system wrote into the legacy tables (templates, their versions, A/B tests of
templates; see prompt_tool.migrate.retract). What a backfill re-creates goes first, in short
batches; what people made goes only in the last transaction, with the schema, and only once it
is in an archive (-x archive=DIR) or knowingly discarded (-x discard=user-templates); otherwise
the downgrade is refused before it changes anything.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from prompt_tool.db.online_ddl import (
    add_check_not_valid,
    add_column,
    batches_outside_transaction,
    concurrent_ddl,
    create_index_concurrently,
    drop_check,
    drop_column,
    drop_index_in_transaction,
    lock_in_order,
    migration_argument,
    refusals_for_alembic,
    single_transaction,
    validate_constraint,
)
from prompt_tool.db.revisions import EXPAND_INDEXES, EXPAND_TABLES, LEGACY_TABLES
from prompt_tool.errors import InvalidInputError
from prompt_tool.migrate.retract import (
    ARCHIVE_OPTION,
    DISCARD_OPTION,
    Retraction,
    count_kept_rows,
    remove_derived_rows,
    remove_kept_rows,
    remove_template_rows,
    require_archive_or_discard,
    require_no_work_since,
    require_nothing_new,
    write_archive,
)

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
NOW = sa.text("CURRENT_TIMESTAMP")


def _prompt_columns() -> tuple[sa.Column[object], ...]:
    return (
        sa.Column("prompt_type", sa.String(30), nullable=False, server_default="prompt"),
        sa.Column("scope", sa.String(20), nullable=True),
        sa.Column("owner", sa.String(100), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=True),
        sa.Column("declared_variables", sa.JSON(), nullable=True),
        sa.Column("content_hash", sa.String(64), nullable=True),
    )


# A scope says where a template lives; legacy prompts have none (NULL).
SCOPE_CHECK = (
    "scope IS NULL"
    " OR (scope = 'global' AND project_id IS NULL AND owner IS NULL)"
    " OR (scope = 'project' AND project_id IS NOT NULL AND owner IS NULL)"
    " OR (scope = 'custom' AND project_id IS NOT NULL AND owner IS NOT NULL)"
)


def _id() -> sa.Column[int]:
    return sa.Column("id", BIG_ID, sa.Identity(), nullable=False)


def _timestamp(name: str) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False, server_default=NOW)


def _fk(
    column: str, target: str, table: str, ondelete: str | None = None
) -> sa.ForeignKeyConstraint:
    referred_table = target.split(".", maxsplit=1)[0]
    return sa.ForeignKeyConstraint(
        [column], [target], name=f"fk_{table}_{column}_{referred_table}", ondelete=ondelete
    )


def _table(name: str, *items: sa.schema.SchemaItem) -> None:
    op.create_table(name, *items, if_not_exists=True)


def _index(name: str, table: str, columns: list[str]) -> None:
    # On a table created in this very migration: empty, so no CONCURRENTLY needed.
    op.create_index(name, table, columns, if_not_exists=True)


def _partial_unique(name: str, table: str, columns: list[str], where: str) -> None:
    # On a table created in this very migration: empty, so no CONCURRENTLY needed.
    op.create_index(
        name,
        table,
        columns,
        unique=True,
        if_not_exists=True,
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
    )


def _create_new_tables() -> None:
    _table(
        "template_labels",
        sa.Column("prompt_id", BIG_ID, nullable=False),
        sa.Column("label", sa.String(50), nullable=False),
        sa.Column("prompt_version_id", BIG_ID, nullable=False),
        sa.Column("moved_by", sa.String(100), nullable=True),
        _timestamp("moved_at"),
        sa.PrimaryKeyConstraint("prompt_id", "label", name="pk_template_labels"),
        _fk("prompt_id", "prompts.id", "template_labels", "CASCADE"),
        _fk("prompt_version_id", "prompt_versions.id", "template_labels"),
    )
    _index("ix_template_labels_prompt_version_id", "template_labels", ["prompt_version_id"])
    _table(
        "template_events",
        _id(),
        sa.Column("prompt_id", BIG_ID, nullable=False),
        sa.Column("action", sa.String(30), nullable=False),
        sa.Column("label", sa.String(50), nullable=True),
        sa.Column("from_version_id", BIG_ID, nullable=True),
        sa.Column("to_version_id", BIG_ID, nullable=True),
        sa.Column("actor", sa.String(100), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_template_events"),
        _fk("prompt_id", "prompts.id", "template_events", "CASCADE"),
        _fk("from_version_id", "prompt_versions.id", "template_events"),
        _fk("to_version_id", "prompt_versions.id", "template_events"),
    )
    _index("ix_template_events_prompt_id_id", "template_events", ["prompt_id", "id"])
    _table(
        "template_permissions",
        _id(),
        sa.Column("project_id", BIG_ID, nullable=True),
        sa.Column("user_name", sa.String(100), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("granted_by", sa.String(100), nullable=True),
        _timestamp("granted_at"),
        sa.PrimaryKeyConstraint("id", name="pk_template_permissions"),
        _fk("project_id", "projects.id", "template_permissions", "CASCADE"),
    )
    _partial_unique(
        "uq_template_permissions_global_user",
        "template_permissions",
        ["user_name"],
        "project_id IS NULL",
    )
    _partial_unique(
        "uq_template_permissions_project_user",
        "template_permissions",
        ["project_id", "user_name"],
        "project_id IS NOT NULL",
    )
    _table(
        "session_prompt_refs",
        sa.Column("session_id", BIG_ID, nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("prompt_version_id", BIG_ID, nullable=False),
        sa.Column("variables", sa.JSON(), nullable=True),
        sa.Column("legacy_hash", sa.String(64), nullable=True),
        sa.Column("source", sa.String(20), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("session_id", "role", name="pk_session_prompt_refs"),
        _fk("session_id", "orchestration_sessions.id", "session_prompt_refs", "CASCADE"),
        _fk("prompt_version_id", "prompt_versions.id", "session_prompt_refs"),
    )
    _index("ix_session_prompt_refs_prompt_version_id", "session_prompt_refs", ["prompt_version_id"])
    _table(
        "ab_assignments",
        sa.Column("ab_test_id", BIG_ID, nullable=False),
        sa.Column("session_id", BIG_ID, nullable=False),
        sa.Column("variant_id", BIG_ID, nullable=False),
        sa.Column("unit_key", sa.String(200), nullable=False),
        sa.Column("success", sa.Boolean(), nullable=True),
        sa.Column("metric", sa.Float(), nullable=True),
        sa.Column("outcome_at", sa.DateTime(timezone=True), nullable=True),
        _timestamp("assigned_at"),
        sa.PrimaryKeyConstraint("ab_test_id", "session_id", name="pk_ab_assignments"),
        _fk("ab_test_id", "ab_tests.id", "ab_assignments", "CASCADE"),
        _fk("session_id", "orchestration_sessions.id", "ab_assignments", "CASCADE"),
        _fk("variant_id", "ab_test_variants.id", "ab_assignments", "CASCADE"),
    )
    _index("ix_ab_assignments_session_id", "ab_assignments", ["session_id"])
    _index("ix_ab_assignments_variant_id", "ab_assignments", ["variant_id"])
    _table(
        "feature_flag_states",
        _id(),
        sa.Column("flag_key", sa.String(100), nullable=False),
        sa.Column("project_id", BIG_ID, nullable=True),
        sa.Column("variant", sa.String(20), nullable=False),
        sa.Column("shadow_sample_rate", sa.Float(), nullable=True),
        sa.Column("updated_by", sa.String(100), nullable=True),
        _timestamp("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_feature_flag_states"),
        _fk("project_id", "projects.id", "feature_flag_states", "CASCADE"),
    )
    _partial_unique(
        "uq_feature_flag_states_default", "feature_flag_states", ["flag_key"], "project_id IS NULL"
    )
    _partial_unique(
        "uq_feature_flag_states_project",
        "feature_flag_states",
        ["flag_key", "project_id"],
        "project_id IS NOT NULL",
    )
    _table(
        "feature_flag_events",
        _id(),
        sa.Column("flag_key", sa.String(100), nullable=False),
        sa.Column("project_id", BIG_ID, nullable=True),
        sa.Column("old_variant", sa.String(20), nullable=True),
        sa.Column("new_variant", sa.String(20), nullable=True),
        sa.Column("actor", sa.String(100), nullable=True),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_feature_flag_events"),
        _fk("project_id", "projects.id", "feature_flag_events", "CASCADE"),
    )
    _index("ix_feature_flag_events_flag_key_id", "feature_flag_events", ["flag_key", "id"])
    _table(
        "orchestration_steps",
        _id(),
        sa.Column("session_id", BIG_ID, nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("input_text", sa.Text(), nullable=False),
        sa.Column("output_text", sa.Text(), nullable=True),
        sa.Column("model", sa.String(100), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        _timestamp("started_at"),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_orchestration_steps"),
        _fk("session_id", "orchestration_sessions.id", "orchestration_steps", "CASCADE"),
        sa.UniqueConstraint(
            "session_id", "position", name="uq_orchestration_steps_session_id_position"
        ),
    )
    _table(
        "migration_runs",
        _id(),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("project_id", BIG_ID, nullable=True),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.Column("key_upper_bound", sa.BigInteger(), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_by", sa.String(100), nullable=True),
        _timestamp("started_at"),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_migration_runs"),
        _fk("project_id", "projects.id", "migration_runs", "CASCADE"),
    )
    _index("ix_migration_runs_kind_project_id_id", "migration_runs", ["kind", "project_id", "id"])
    _table(
        "migration_batches",
        _id(),
        sa.Column("run_id", BIG_ID, nullable=False),
        sa.Column("key_lo", sa.BigInteger(), nullable=False),
        sa.Column("key_hi", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("rows_seen", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("counts", sa.JSON(), nullable=True),
        sa.Column("checksum", sa.String(64), nullable=True),
        sa.Column("claimed_by", sa.String(100), nullable=True),
        _timestamp("started_at"),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_migration_batches"),
        _fk("run_id", "migration_runs.id", "migration_batches", "CASCADE"),
        sa.UniqueConstraint("run_id", "key_lo", name="uq_migration_batches_run_id_key_lo"),
    )


def upgrade() -> None:
    # Every statement tolerates its own leftovers (IF NOT EXISTS): the concurrent part below
    # commits in the middle of this revision, so a failure there leaves the first part applied
    # while alembic_version still says 0001, and the operator simply runs the upgrade again.
    for column in _prompt_columns():
        add_column("prompts", column)
    add_column("prompt_versions", sa.Column("content_hash", sa.String(64), nullable=True))
    add_column("ab_tests", sa.Column("target_role", sa.String(20), nullable=True))
    add_check_not_valid("ck_prompts_scope", "prompts", SCOPE_CHECK)
    _create_new_tables()

    with concurrent_ddl():
        validate_constraint("ck_prompts_scope", "prompts")
        for name, table, columns, unique, where in EXPAND_INDEXES:
            create_index_concurrently(name, table, columns, unique=unique, where=where)


def _take_back_rows() -> Retraction:
    """Archive (or discard, as told) what people made, then remove the derivable rows in
    batches; refused before anything changes when people's work would go unasked."""
    retraction = Retraction()
    with refusals_for_alembic():
        archive = migration_argument(ARCHIVE_OPTION)
        discard = migration_argument(DISCARD_OPTION)
        require_archive_or_discard(count_kept_rows(op.get_bind()), archive, discard)
        if archive is not None:
            if single_transaction():
                raise InvalidInputError(
                    "an archive cannot be taken inside one rolled-back transaction (its rows "
                    "are not committed); discard instead, nothing is kept anyway"
                )
            retraction.archive = archive
            retraction.archived = write_archive(op.get_bind(), archive)
        retraction.discarded = discard is not None
    with batches_outside_transaction() as transaction:
        remove_derived_rows(op.get_bind(), transaction, retraction)
    with refusals_for_alembic():
        require_nothing_new(op.get_bind(), retraction)
    remove_kept_rows(op.get_bind(), retraction)
    return retraction


def downgrade() -> None:
    # Everything from here on is one transaction (the rows of people's work, the tables, the
    # indexes, the columns, the revision): complete, or rolled back whole.
    retraction = None if op.get_context().as_sql else _take_back_rows()
    if retraction is not None:
        retraction.exclusive_started = time.perf_counter()
        config = op.get_context().config
        if config is not None:
            config.attributes["retraction"] = retraction
    # Children before parents, as writers lock them: the new tables, then the legacy ones.
    lock_in_order([*EXPAND_TABLES, *reversed(LEGACY_TABLES)])
    # Nobody else can write now. What a person did after the last transaction began is refused;
    # the template rows of the legacy tables go once the new tables, whose rows point at them,
    # are dropped.
    if retraction is not None:
        with refusals_for_alembic():
            require_no_work_since(op.get_bind(), retraction)
    for table in EXPAND_TABLES:
        op.drop_table(table, if_exists=True)
    if retraction is not None:
        remove_template_rows(op.get_bind(), retraction)
    for name, table, *_ in reversed(EXPAND_INDEXES):
        drop_index_in_transaction(name, table)
    drop_check("ck_prompts_scope", "prompts")
    drop_column("ab_tests", "target_role")
    drop_column("prompt_versions", "content_hash")
    for column in reversed(_prompt_columns()):
        drop_column("prompts", column.name)
