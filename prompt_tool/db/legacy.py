"""The legacy schema's tables and columns (revision 0001), frozen.

Operators' data and scripts depend on these names. The expand step may add columns beside them;
these never change, and every tool that promises "the legacy data is intact" checks these.
"""

from __future__ import annotations

__all__ = ["LEGACY_COLUMNS", "LEGACY_TABLES", "SESSION_PROMPT_COLUMNS"]

LEGACY_COLUMNS: dict[str, tuple[str, ...]] = {
    "projects": ("id", "slug", "name", "created_at"),
    "prompts": (
        "id",
        "project_id",
        "name",
        "content",
        "category",
        "is_template",
        "created_at",
        "updated_at",
    ),
    "prompt_versions": (
        "id",
        "prompt_id",
        "version",
        "content",
        "created_by",
        "change_note",
        "created_at",
    ),
    "orchestration_sessions": (
        "id",
        "project_id",
        "name",
        "status",
        "system_prompt",
        "planner_prompt",
        "synthesis_prompt",
        "variables",
        "created_at",
        "updated_at",
    ),
    "ab_tests": ("id", "project_id", "prompt_id", "name", "status", "created_at"),
    "ab_test_variants": ("id", "ab_test_id", "prompt_version_id", "name", "weight"),
}
LEGACY_TABLES: tuple[str, ...] = tuple(LEGACY_COLUMNS)

# The exact final text the orchestrator sent to the model, per role.
SESSION_PROMPT_COLUMNS: tuple[str, ...] = ("system_prompt", "planner_prompt", "synthesis_prompt")
