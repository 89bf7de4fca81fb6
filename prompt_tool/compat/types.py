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
    """One role's text, where it came from and, when the session references a template version
    for the role (whichever text was served), that version: its id, template name and number."""

    role: PromptRole
    text: str | None
    source: PromptSource
    version_id: int | None = None
    template: str | None = None
    version: int | None = None


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


# The read shim builds three RolePrompts and a SessionPrompts per session, thousands per batch.
# A frozen dataclass's __init__ sets each field through the generic object.__setattr__, which
# made building them a third of a warm templates read's Python time; these two build the same
# objects (same class, every field set, no __post_init__ to skip) through each slot's own
# setter, at half the cost. Anything added to the classes' construction must be added here.
_new = object.__new__
_set_role, _set_text, _set_source, _set_version_id, _set_template, _set_version = (
    RolePrompt.__dict__[name].__set__
    for name in ("role", "text", "source", "version_id", "template", "version")
)
_set_session_id, _set_project, _set_variant, _set_system, _set_planner, _set_synthesis = (
    SessionPrompts.__dict__[name].__set__
    for name in ("session_id", "project", "variant", "system", "planner", "synthesis")
)


def new_role_prompt(
    role: PromptRole,
    text: str | None,
    source: PromptSource,
    version_id: int | None = None,
    template: str | None = None,
    version: int | None = None,
) -> RolePrompt:
    """``RolePrompt(role, text, source, version_id, template, version)``, built faster (see
    above)."""
    prompt: RolePrompt = _new(RolePrompt)
    _set_role(prompt, role)
    _set_text(prompt, text)
    _set_source(prompt, source)
    _set_version_id(prompt, version_id)
    _set_template(prompt, template)
    _set_version(prompt, version)
    return prompt


def new_session_prompts(
    session_id: int,
    project: str,
    variant: str,
    system: RolePrompt,
    planner: RolePrompt,
    synthesis: RolePrompt,
) -> SessionPrompts:
    """``SessionPrompts(session_id, project, variant, system, planner, synthesis)``, built
    faster (see above)."""
    prompts: SessionPrompts = _new(SessionPrompts)
    _set_session_id(prompts, session_id)
    _set_project(prompts, project)
    _set_variant(prompts, variant)
    _set_system(prompts, system)
    _set_planner(prompts, planner)
    _set_synthesis(prompts, synthesis)
    return prompts
