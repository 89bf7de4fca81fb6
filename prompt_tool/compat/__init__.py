"""The read shim: session prompts from legacy text or rendered templates, by the project's flag,
and the dual writes that keep the legacy text right whatever the flag says.

Every reader of session prompts reads through :class:`SessionReader`: ``read`` for one session,
``read_many`` for a batch (a constant number of statements), either on the caller's connection
when it reads more of the same sessions. Each role comes back with its text, where the text came
from and the template version the session references (id, template name, number), so no reader
looks anything up again. The reader is an object, not a free function, because it holds what
makes a warm read cheap (the version cache, the flag service, the shadow publisher): a function
taking a reader would be a second name for the same call, and one building a reader per call
would read cold every time.
"""

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
    "set_session_template",
    "update_session_variables",
]
