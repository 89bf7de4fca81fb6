"""The step loop both orchestrators share: what each step is sent, recorded and told. No DB."""

from __future__ import annotations

from datetime import UTC, datetime

from prompt_tool.db.models import PromptRole
from prompt_tool.orchestration import (
    PlannedStep,
    RunStatus,
    StepOutput,
    StepRecord,
    StepRequest,
    StepStatus,
    compose_input,
    run_steps,
)

from .fakes import ScriptedClient

PLAN = [
    PlannedStep(PromptRole.SYSTEM, "You are careful.\n"),
    PlannedStep(PromptRole.PLANNER, "Plan the work.\n"),
    PlannedStep(PromptRole.SYNTHESIS, "Write the answer."),
]


def test_planner_is_sent_its_prompt_and_synthesis_its_prompt_plus_the_planner_output() -> None:
    client = ScriptedClient()
    status, steps = run_steps(PLAN, client, variables={"topic": "tax"})

    assert status is RunStatus.COMPLETED
    planner, synthesis = client.requests
    assert planner.input_text == "Plan the work.\n"
    assert synthesis.input_text == (
        "Write the answer.\n\n<planner_output>\nanswer from planner\n</planner_output>"
    )
    assert synthesis.previous == (StepOutput("planner", "answer from planner"),)
    assert [s.input_text for s in steps[1:]] == [planner.input_text, synthesis.input_text]
    assert [s.output_text for s in steps] == [None, "answer from planner", "answer from synthesis"]
    assert {r.variables["topic"] for r in client.requests} == {"tax"}


def test_the_system_prompt_is_the_system_message_of_every_call_not_a_call_of_its_own() -> None:
    client = ScriptedClient()
    _, steps = run_steps(PLAN, client)

    assert [r.role for r in client.requests] == ["planner", "synthesis"]
    assert {r.system for r in client.requests} == {"You are careful.\n"}
    assert client.requests[0].messages() == [
        {"role": "system", "content": "You are careful.\n"},
        {"role": "user", "content": "Plan the work.\n"},
    ]
    system = steps[0]
    assert (system.position, system.role, system.status) == (1, "system", StepStatus.COMPLETED)
    assert (system.input_text, system.output_text, system.model) == (
        "You are careful.\n",
        None,
        None,
    )


def test_a_role_without_a_prompt_is_recorded_as_skipped_and_sends_nothing() -> None:
    client = ScriptedClient()
    plan = [PlannedStep(PromptRole.SYSTEM, None), *PLAN[1:]]
    status, steps = run_steps(plan, client)

    assert status is RunStatus.COMPLETED
    assert (steps[0].status, steps[0].input_text) == (StepStatus.SKIPPED, "")
    assert [r.system for r in client.requests] == [None, None]
    assert client.requests[0].messages() == [{"role": "user", "content": "Plan the work.\n"}]


def test_a_raising_client_fails_its_step_with_the_error_and_nothing_after_it_runs() -> None:
    client = ScriptedClient(fail_on=("planner",), error=TimeoutError("no answer in 30 s\nretry"))
    status, steps = run_steps(PLAN, client)

    assert status is RunStatus.FAILED
    assert [(s.role, s.status) for s in steps] == [
        ("system", StepStatus.COMPLETED),
        ("planner", StepStatus.FAILED),
    ]
    assert steps[1].error == "TimeoutError: no answer in 30 s retry"
    assert steps[1].input_text == "Plan the work.\n"
    assert steps[1].output_text is None
    assert [r.role for r in client.requests] == ["planner"]


def test_a_client_answering_something_other_than_a_step_result_fails_the_step() -> None:
    class Sloppy:
        def complete(self, step: StepRequest) -> str:
            return "plain text"

    status, steps = run_steps(PLAN[1:], Sloppy())  # type: ignore[arg-type]
    assert status is RunStatus.FAILED
    assert steps[0].error == "the model client returned str, not a StepResult with text"


def test_the_recorder_hears_a_step_start_before_its_call_and_finish_after() -> None:
    events: list[tuple[str, int, StepStatus]] = []

    class Recorder:
        def step_started(self, step: StepRecord) -> None:
            events.append(("started", step.position, step.status))

        def step_finished(self, step: StepRecord) -> None:
            events.append(("finished", step.position, step.status))

    client = ScriptedClient(during_call=lambda step: events.append(("call", step.position, "")))  # type: ignore[arg-type]
    run_steps(PLAN[:2], client, recorder=Recorder())
    assert events == [
        ("finished", 1, StepStatus.COMPLETED),
        ("started", 2, StepStatus.RUNNING),
        ("call", 2, ""),
        ("finished", 2, StepStatus.COMPLETED),
    ]


def test_steps_are_timed_with_the_given_clock() -> None:
    ticks = iter(datetime(2025, 1, 1, 0, 0, second, tzinfo=UTC) for second in range(10))
    _, steps = run_steps(PLAN[1:2], ScriptedClient(), clock=lambda: next(ticks))
    assert (steps[0].started_at, steps[0].finished_at) == (
        datetime(2025, 1, 1, tzinfo=UTC),
        datetime(2025, 1, 1, 0, 0, 1, tzinfo=UTC),
    )


def test_composed_input_keeps_prompt_and_outputs_byte_for_byte() -> None:
    previous = [StepOutput("planner", "a\r\nb"), StepOutput("critic", "c\n")]
    assert compose_input("p", []) == "p"
    assert compose_input("p", previous) == (
        "p\n\n<planner_output>\na\r\nb\n</planner_output>\n\n<critic_output>\nc\n</critic_output>"
    )
