"""The step loop both orchestrators run: one code path from prompt texts to recorded steps.

Where the prompt texts come from is the caller's business (the read shim for a session,
workflow templates on disk or in the database for a workflow file); from here on the two are
the same. What a step's input is:

- ``system``: not a model call. Its text becomes the system message of every later call of the
  run; the step is recorded (``completed``, input = the system text, no output, no model) so
  the record shows what every call was told.
- every other role (``planner``, ``synthesis``): one call of the model client. The recorded
  input is the exact user message: the role's prompt, followed by each earlier step's output in
  a ``<ROLE_output>`` block. So the planner gets its prompt, and synthesis gets its prompt plus
  the planner's output.
- a role without a prompt (a NULL legacy column) is recorded as ``skipped`` with an empty
  input, and sends nothing. Keeping the row keeps positions fixed per role and shows why
  nothing ran.
- a client that raises fails its step (status ``failed``, the error recorded) and ends the run;
  later steps never ran and are not recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from prompt_tool.db.models import PromptRole
from prompt_tool.orchestration.clients import ModelClient
from prompt_tool.orchestration.types import (
    RunStatus,
    StepOutput,
    StepRecord,
    StepRequest,
    StepResult,
    StepStatus,
)

__all__ = [
    "Clock",
    "PlannedStep",
    "StepRecorder",
    "compose_input",
    "run_steps",
    "utc_now",
]

Clock = Callable[[], datetime]
_MAX_ERROR_CHARS = 2000


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class PlannedStep:
    """A step to run: its role and its prompt text (``None``: the role has no prompt)."""

    role: PromptRole
    prompt: str | None


class StepRecorder(Protocol):
    """Told about every step as it happens, so a crash mid-call still leaves a trace.

    ``step_started`` comes before a model call (status ``running``); ``step_finished`` comes
    for every step, including those never started (system and skipped steps).
    """

    def step_started(self, step: StepRecord) -> None: ...

    def step_finished(self, step: StepRecord) -> None: ...


def _line_ended(text: str) -> str:
    return text if text.endswith("\n") else f"{text}\n"


def compose_input(prompt: str, previous: Sequence[StepOutput]) -> str:
    """The user message of a model step: its prompt, then each earlier output, tagged by role.

    The prompt and the outputs appear byte for byte; a blank line separates the parts, and a
    text that already ends its last line gets no second line break.
    """
    text = prompt
    for out in previous:
        block = f"<{out.role}_output>\n{_line_ended(out.text)}</{out.role}_output>"
        text = f"{_line_ended(text)}\n{block}"
    return text


def _one_line(error: BaseException) -> str:
    # The CLI prints errors on one line, and the text is stored; a client's traceback-sized
    # message would be neither readable nor useful there.
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _call(client: ModelClient, request: StepRequest) -> StepResult | str:
    """The client's answer, or the reason the step failed."""
    try:
        result = client.complete(request)
    except Exception as error:  # noqa: BLE001 - any failure of a plug-in client fails the step
        return _one_line(error)
    if not isinstance(result, StepResult) or not isinstance(result.text, str):
        return f"the model client returned {type(result).__name__}, not a StepResult with text"
    return result


def run_steps(
    plan: Sequence[PlannedStep],
    client: ModelClient,
    *,
    variables: Mapping[str, Any] | None = None,
    recorder: StepRecorder | None = None,
    clock: Clock = utc_now,
) -> tuple[RunStatus, tuple[StepRecord, ...]]:
    """Run ``plan`` in order through ``client``; positions count from 1."""
    values = dict(variables or {})
    system: str | None = None
    previous: list[StepOutput] = []
    records: list[StepRecord] = []

    def finish(record: StepRecord) -> None:
        records.append(record)
        if recorder is not None:
            recorder.step_finished(record)

    for position, step in enumerate(plan, start=1):
        role = step.role.value
        now = clock()
        if step.prompt is None:
            finish(
                StepRecord(position, role, StepStatus.SKIPPED, "", started_at=now, finished_at=now)
            )
            continue
        if step.role is PromptRole.SYSTEM:
            system = step.prompt
            finish(
                StepRecord(
                    position,
                    role,
                    StepStatus.COMPLETED,
                    step.prompt,
                    started_at=now,
                    finished_at=now,
                )
            )
            continue
        request = StepRequest(
            position=position,
            role=role,
            prompt=step.prompt,
            input_text=compose_input(step.prompt, previous),
            system=system,
            previous=tuple(previous),
            variables=values,
        )
        started = StepRecord(position, role, StepStatus.RUNNING, request.input_text, started_at=now)
        if recorder is not None:
            recorder.step_started(started)
        answer = _call(client, request)
        if isinstance(answer, str):
            finish(replace(started, status=StepStatus.FAILED, error=answer, finished_at=clock()))
            return RunStatus.FAILED, tuple(records)
        finish(
            replace(
                started,
                status=StepStatus.COMPLETED,
                output_text=answer.text,
                model=answer.model,
                finished_at=clock(),
            )
        )
        previous.append(StepOutput(role, answer.text))
    return RunStatus.COMPLETED, tuple(records)
