"""Backfill quarantine: the (session, role) rows whose legacy text cannot be imported.

One new table, ``migration_quarantine``: each row a session role a backfill could not link (its
text over the template size limit, or not a template that renders back to it), with the reason.
Such a role keeps reading its legacy text; ``orch-migrate status`` and ``verify`` list them per
project and ``orch-migrate backfill --retry-quarantined`` tries them again. Only adds: nothing
existing is altered, and the table is created empty, so its index needs no CONCURRENTLY. Its
foreign keys take a brief SHARE ROW EXCLUSIVE lock on the tables they point at, bounded by
lock_timeout like every statement of a migration.

downgrade() drops the table: the exact inverse (the rows are this database's own ledger, nothing
a person made; the backfill that left them rebuilds them).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from prompt_tool.db.online_ddl import lock_in_order
from prompt_tool.db.revisions import QUARANTINE_TABLE

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
NOW = sa.text("CURRENT_TIMESTAMP")


def _fk(column: str, target: str, ondelete: str) -> sa.ForeignKeyConstraint:
    referred_table = target.split(".", maxsplit=1)[0]
    return sa.ForeignKeyConstraint(
        [column],
        [target],
        name=f"fk_{QUARANTINE_TABLE}_{column}_{referred_table}",
        ondelete=ondelete,
    )


def upgrade() -> None:
    # IF NOT EXISTS: a re-run after an interruption tolerates its own leftovers, as 0002 does.
    op.create_table(
        QUARANTINE_TABLE,
        sa.Column("id", BIG_ID, sa.Identity(), nullable=False),
        sa.Column("run_id", BIG_ID, nullable=True),
        sa.Column("session_id", BIG_ID, nullable=False),
        sa.Column("project_id", BIG_ID, nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("legacy_hash", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("id", name=f"pk_{QUARANTINE_TABLE}"),
        # A run row is deleted only with its project (runs are never deleted otherwise): the
        # quarantine outlives it, naming no run.
        _fk("run_id", "migration_runs.id", "SET NULL"),
        _fk("session_id", "orchestration_sessions.id", "CASCADE"),
        _fk("project_id", "projects.id", "CASCADE"),
        sa.UniqueConstraint("session_id", "role", name=f"uq_{QUARANTINE_TABLE}_session_id_role"),
        if_not_exists=True,
    )
    # On the table just created: empty, so no CONCURRENTLY needed.
    op.create_index(
        f"ix_{QUARANTINE_TABLE}_project_id", QUARANTINE_TABLE, ["project_id"], if_not_exists=True
    )


def downgrade() -> None:
    # The DROP locks this table, then each table its foreign keys point at, one statement at a
    # time: against the application's writers (an INSERT locks its table, then the parent its
    # foreign key checks) that order waits in a cycle until lock_timeout. One LOCK, children
    # before parents as writers take them, does not.
    if op.get_context().as_sql or sa.inspect(op.get_bind()).has_table(QUARANTINE_TABLE):
        lock_in_order([QUARANTINE_TABLE, "migration_runs", "orchestration_sessions", "projects"])
    op.drop_table(QUARANTINE_TABLE, if_exists=True)
