"""What each schema revision holds, by name, frozen: the migration scripts build from these
names and ``db check`` compares a live database against them.

Only names live here (tables, added columns, indexes, constraints); the column types stay in the
migration scripts, which own the DDL.
"""

from __future__ import annotations

from typing import Final

from prompt_tool.db.legacy import LEGACY_TABLES

__all__ = [
    "BASELINE",
    "EXPAND",
    "EXPAND_CHECKS",
    "EXPAND_COLUMNS",
    "EXPAND_INDEXES",
    "EXPAND_TABLES",
    "LEGACY_TABLES",
    "QUARANTINE",
    "QUARANTINE_TABLE",
    "IndexSpec",
]

BASELINE: Final = "0001"
EXPAND: Final = "0002"
# The backfill quarantine: one table, rows a backfill could not import, with the reason.
QUARANTINE: Final = "0003"
QUARANTINE_TABLE: Final = "migration_quarantine"

# (name, table, columns, unique, partial-index predicate): 0002's indexes on legacy tables.
IndexSpec = tuple[str, str, tuple[str, ...], bool, str | None]
EXPAND_INDEXES: Final[tuple[IndexSpec, ...]] = (
    ("ix_prompts_type_project", "prompts", ("prompt_type", "project_id"), False, None),
    ("ix_prompts_scope_name", "prompts", ("scope", "name"), False, None),
    ("uq_prompts_global_name", "prompts", ("name",), True, "scope = 'global'"),
    ("uq_prompts_project_name", "prompts", ("project_id", "name"), True, "scope = 'project'"),
    (
        "uq_prompts_custom_name",
        "prompts",
        ("project_id", "owner", "name"),
        True,
        "scope = 'custom'",
    ),
    ("ix_prompt_versions_content_hash", "prompt_versions", ("content_hash",), False, None),
)

# The columns 0002 adds beside the legacy ones, by table.
EXPAND_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "prompts": (
        "prompt_type",
        "scope",
        "owner",
        "description",
        "tags",
        "declared_variables",
        "content_hash",
    ),
    "prompt_versions": ("content_hash",),
    "ab_tests": ("target_role",),
}

# (name, table): CHECK constraints 0002 adds to legacy tables (PostgreSQL only; SQLite cannot
# add one without rebuilding the table).
EXPAND_CHECKS: Final[tuple[tuple[str, str], ...]] = (("ck_prompts_scope", "prompts"),)

# The tables 0002 creates, children before parents (the order they are dropped in).
EXPAND_TABLES: Final[tuple[str, ...]] = (
    "migration_batches",
    "migration_runs",
    "orchestration_steps",
    "feature_flag_events",
    "feature_flag_states",
    "ab_assignments",
    "session_prompt_refs",
    "template_permissions",
    "template_events",
    "template_labels",
)

assert not set(EXPAND_TABLES) & set(LEGACY_TABLES)
assert QUARANTINE_TABLE not in (*EXPAND_TABLES, *LEGACY_TABLES)
