"""The orchestrators' errors, under the package's one root (:mod:`prompt_tool.errors`)."""

from __future__ import annotations

from prompt_tool.errors import InvalidInputError, PromptToolError

__all__ = ["ModelClientError", "RunFailedError", "SessionStateError", "WorkflowError"]


class SessionStateError(PromptToolError):
    """The session is not in a state this action allows (already ran, or running now)."""


class WorkflowError(InvalidInputError):
    """A workflow file cannot be used: unreadable, not YAML/JSON, or a field is wrong."""


class ModelClientError(InvalidInputError):
    """The model client named with ``--client`` cannot be found or is not a model client."""


class RunFailedError(PromptToolError):
    """A run ended with a failed step; the steps were recorded (and printed) before this."""

    exit_code = 1
