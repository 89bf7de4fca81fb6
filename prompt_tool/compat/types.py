"""What the read shim returns: each role's text and where it came from."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from prompt_tool.db.models import PromptRole

__all__ = ["PromptSource", "RolePrompt", "SessionPrompts"]


class PromptSource(enum.StrEnum):
    """Where a returned prompt text came from."""

    LEGACY = "legacy"  # flag legacy (or shadow): the legacy column
    TEMPLATE = "template"  # flag templates: the referenced version, rendered
    UNMIGRATED = "legacy_unmigrated"  # flag templates, but no reference yet (not backfilled)
    STALE = "legacy_stale"  # the legacy text changed after the reference was made; it wins
    RENDER_ERROR = "legacy_after_render_error"  # the template failed; the legacy text is served


@dataclass(frozen=True, slots=True)
class RolePrompt:
    role: PromptRole
    text: str | None
    source: PromptSource
    version_id: int | None = None


@dataclass(frozen=True, slots=True)
class SessionPrompts:
    """The three prompts of one session, as every reader must see them."""

    session_id: int
    project: str
    variant: str
    system: RolePrompt
    planner: RolePrompt
    synthesis: RolePrompt

    def by_role(self) -> dict[PromptRole, RolePrompt]:
        return {
            PromptRole.SYSTEM: self.system,
            PromptRole.PLANNER: self.planner,
            PromptRole.SYNTHESIS: self.synthesis,
        }

    def texts(self) -> dict[str, str | None]:
        return {role.value: prompt.text for role, prompt in self.by_role().items()}
