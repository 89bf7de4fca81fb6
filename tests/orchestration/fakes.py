"""Model clients for the tests: offline, deterministic, and able to fail on cue."""

from __future__ import annotations

from collections.abc import Callable

from prompt_tool.orchestration import StepRequest, StepResult


class ScriptedClient:
    """Answers ``answer from <role>``, keeps every request, and raises on the roles in
    ``fail_on`` (``error`` is what it raises)."""

    def __init__(
        self,
        *,
        fail_on: tuple[str, ...] = (),
        error: BaseException | None = None,
        during_call: Callable[[StepRequest], None] | None = None,
    ) -> None:
        self.fail_on = fail_on
        self.error = error if error is not None else RuntimeError("the model is overloaded")
        self.during_call = during_call
        self.requests: list[StepRequest] = []

    def complete(self, step: StepRequest) -> StepResult:
        self.requests.append(step)
        if self.during_call is not None:
            self.during_call(step)
        if step.role in self.fail_on:
            raise self.error
        return StepResult(text=f"answer from {step.role}", model="scripted-1")
