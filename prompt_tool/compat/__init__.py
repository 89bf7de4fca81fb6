"""The read shim: session prompts from legacy text or rendered templates, by the project's flag,
and the dual writes that keep the legacy text right whatever the flag says."""

from prompt_tool.compat.reader import SessionReader
from prompt_tool.compat.shadow import LogPublisher, ShadowCounters, ShadowEvent, ShadowPublisher
from prompt_tool.compat.types import PromptSource, RolePrompt, SessionPrompts
from prompt_tool.compat.writes import (
    CreatedSession,
    TemplateChoice,
    create_session,
    set_session_template,
    update_session_variables,
)

__all__ = [
    "CreatedSession",
    "LogPublisher",
    "PromptSource",
    "RolePrompt",
    "SessionPrompts",
    "SessionReader",
    "ShadowCounters",
    "ShadowEvent",
    "ShadowPublisher",
    "TemplateChoice",
    "create_session",
    "read_session_prompts",
    "set_session_template",
    "update_session_variables",
]


def read_session_prompts(reader: SessionReader, session_id: int) -> SessionPrompts:
    """The one function every reader uses for one session (``reader.read_many`` for a batch)."""
    return reader.read(session_id)
