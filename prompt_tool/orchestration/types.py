"""What the orchestrators hand to model clients and back to callers: plain, frozen data."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prompt_tool.orchestration.errors import RunFailedError

__all__ = [
    "PromptInfo",
    "RunResult",
    "RunStatus",
    "SessionDetail",
    "SessionStatus",
    "SessionSummary",
    "StepOutput",
    "StepRecord",
    "StepRequest",
    "StepResult",
    "StepStatus",
]


class SessionStatus(enum.StrEnum):
    """``orchestration_sessions.status`` as the integrated orchestrator moves it."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class RunStatus(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"


class StepStatus(enum.StrEnum):
    """``orchestration_steps.status``."""

    RUNNING = "running"  # the model call is under way (or the process died during it)
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"  # the role has no prompt (a NULL legacy column): nothing was sent


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What an earlier step of the same run answered."""

    role: str
    text: str


@dataclass(frozen=True, slots=True)
class StepRequest:
    """One model call: everything a client needs, and nothing it has to work out itself.

    ``input_text`` is the exact user message (``prompt`` followed by the earlier outputs, see
    :func:`~prompt_tool.orchestration.steps.compose_input`) and is what gets recorded; ``system``
    is the system message every call of the run carries. ``variables`` are the session's (or
    workflow's) variables, already rendered into the prompts; they are passed for clients that
    route or tag calls by them, not to be rendered again.
    """

    position: int
    role: str
    prompt: str
    input_text: str
    system: str | None = None
    previous: tuple[StepOutput, ...] = ()
    variables: Mapping[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict[str, str]]:
        """The call as chat messages, the shape most model APIs take."""
        messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        messages.append({"role": "user", "content": self.input_text})
        return messages


@dataclass(frozen=True, slots=True)
class StepResult:
    """What a model client answers: the text, and which model produced it."""

    text: str
    model: str | None = None


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step as recorded in ``orchestration_steps`` (or in memory for a workflow run)."""

    position: int
    role: str
    status: StepStatus
    input_text: str
    output_text: str | None = None
    model: str | None = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PromptInfo:
    """One role's prompt text and where it came from.

    ``source`` is the read shim's answer for a session (``legacy``, ``template``,
    ``legacy_unmigrated``, ...) or, for a workflow, ``file`` or the scope it resolved in
    (``custom``, ``project``, ``global``). ``location`` is the file of a disk template.
    """

    role: str
    text: str | None
    source: str
    template: str | None = None
    version: int | None = None
    version_id: int | None = None
    location: str | None = None


@dataclass(frozen=True, slots=True)
class RunResult:
    """The outcome of one run, of a session or of a workflow file."""

    name: str
    status: RunStatus
    client: str
    prompts: tuple[PromptInfo, ...]
    steps: tuple[StepRecord, ...]
    project: str | None = None
    session_id: int | None = None
    workflow: str | None = None

    @property
    def failed_step(self) -> StepRecord | None:
        return next((s for s in self.steps if s.status is StepStatus.FAILED), None)

    def raise_for_status(self) -> None:
        """Raise :class:`RunFailedError` (exit code 1) if a step failed."""
        step = self.failed_step
        if step is None:
            return
        what = f"session {self.session_id}" if self.session_id is not None else self.name
        raise RunFailedError(
            f"{what} failed at step {step.position} ({step.role}): {step.error}; "
            "the steps so far are recorded, fix the cause and run it again"
            + (" with --rerun" if self.session_id is not None else "")
        )


@dataclass(frozen=True, slots=True)
class SessionSummary:
    session_id: int
    name: str
    project: str
    status: str
    steps: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class SessionDetail:
    """A session as every reader sees it (prompts through the shim) and its recorded steps."""

    session_id: int
    name: str
    project: str
    status: str
    variant: str
    variables: dict[str, Any]
    prompts: tuple[PromptInfo, ...]
    steps: tuple[StepRecord, ...]
    created_at: datetime
    updated_at: datetime
