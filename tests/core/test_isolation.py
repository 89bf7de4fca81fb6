"""The isolated renderer (PROMPT_TOOL_RENDER_ISOLATION=process): worker processes under hard
CPU and address-space limits, stopped and replaced when a render overruns."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from prompt_tool.core import RenderLimits, TemplateEngine
from prompt_tool.core.errors import TemplateLimitError, TemplateNotFound, TemplateRenderError
from prompt_tool.core.isolation import IsolatedRenderer
from prompt_tool.errors import ConfigurationError
from prompt_tool.settings import Settings

BUSY = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def isolated() -> Iterator[TemplateEngine]:
    engine = TemplateEngine(settings=Settings(render_isolation="process"))
    yield engine
    assert engine.isolation is not None
    engine.isolation.close()


@pytest.fixture
def hasty() -> Iterator[IsolatedRenderer]:
    """A pool whose parent deadline falls before the sandbox's own clock check: it stands in
    for an operation that runs in one C call, which no in-process check can interrupt."""
    renderer = IsolatedRenderer(workers=1, deadline_margin_s=-1.8)
    yield renderer
    renderer.close()


def _render(renderer: IsolatedRenderer, source: str, **kwargs: object) -> str:
    return renderer.render(
        source,
        {},
        name="t",
        version=None,
        limits=RenderLimits(timeout_s=2.0),
        loader=None,
        **kwargs,  # type: ignore[arg-type]
    )


def test_the_setting_selects_the_isolated_renderer_and_defaults_to_in_process() -> None:
    assert TemplateEngine(settings=Settings()).isolation is None
    assert Settings.from_env({}).render_isolation == "in-process"
    assert Settings.from_env({"PROMPT_TOOL_RENDER_ISOLATION": "process"}).render_isolation == (
        "process"
    )
    with pytest.raises(ConfigurationError, match="PROMPT_TOOL_RENDER_ISOLATION"):
        Settings.from_env({"PROMPT_TOOL_RENDER_ISOLATION": "thread"})


@pytest.mark.parametrize(
    ("source", "variables", "includes"),
    [
        ("Hello {{ name }}!", {"name": "w\ud800rld"}, {}),
        ("{% for x in items %}{{ loop.index }}={{ x|upper }} {% endfor %}", {"items": ["a"]}, {}),
        (
            "{% include 'inc' %}/{% from 'mac' import m %}{{ m(n) }}",
            {"n": 10**30},
            {
                "inc": "included {{ n }}",
                "mac": "{% macro m(v) %}<{{ v * 2 }}>{% endmacro %}",
            },
        ),
    ],
)
def test_isolated_render_gives_the_same_text_as_in_process(
    isolated: TemplateEngine,
    engine: TemplateEngine,
    source: str,
    variables: dict[str, object],
    includes: dict[str, str],
) -> None:
    expected = engine.render(source, variables, name="t", loader=includes.get)
    assert isolated.render(source, variables, name="t", loader=includes.get) == expected


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("{{ 1 / 0 }}", TemplateRenderError),
        ("{% include 'missing' %}", TemplateNotFound),
        ("{{ 'a' * 10**7 }}", TemplateLimitError),
    ],
)
def test_isolated_render_raises_the_same_error_as_in_process(
    isolated: TemplateEngine, engine: TemplateEngine, source: str, error: type[Exception]
) -> None:
    with pytest.raises(error) as in_process:
        engine.render(source, {}, name="t", version=3, loader={}.get)
    with pytest.raises(error) as isolated_error:
        isolated.render(source, {}, name="t", version=3, loader={}.get)
    assert type(isolated_error.value) is type(in_process.value)
    assert str(isolated_error.value) == str(in_process.value)


def test_a_render_past_its_deadline_is_stopped_and_the_pool_works_afterwards(
    hasty: IsolatedRenderer,
) -> None:
    _render(hasty, "warm")
    (pid,) = hasty.idle_pids()
    with pytest.raises(TemplateLimitError, match="ran past its deadline") as caught:
        _render(hasty, BUSY)
    assert "\n" not in str(caught.value)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the overrunning worker is gone (killed and reaped)
    assert _render(hasty, "{{ 6 * 7 }}") == "42"
    assert hasty.idle_pids() != [pid]


def test_the_pool_survives_three_overruns_in_a_row(hasty: IsolatedRenderer) -> None:
    for _ in range(3):
        with pytest.raises(TemplateLimitError, match="ran past its deadline"):
            _render(hasty, BUSY)
    assert hasty.replaced == 3
    assert _render(hasty, "still {{ 'here' }}") == "still here"


def test_a_memory_bomb_hits_the_address_space_limit_and_fails_in_one_line() -> None:
    renderer = IsolatedRenderer(workers=1, memory_bytes=256 * 1024 * 1024)
    try:
        generous = RenderLimits(max_string_length=10**9, max_allocated=10**10)
        with pytest.raises(TemplateLimitError, match="memory") as caught:
            renderer.render(
                "{{ 'a' * 400000000 }}", {}, name="t", version=None, limits=generous, loader=None
            )
        assert "\n" not in str(caught.value)
        assert _render(renderer, "ok") == "ok"
    finally:
        renderer.close()


def test_a_worker_killed_mid_render_is_replaced_and_the_render_fails_in_one_line() -> None:
    renderer = IsolatedRenderer(workers=1)
    try:
        _render(renderer, "warm")
        (pid,) = renderer.idle_pids()

        def killing_loader(name: str) -> str:
            os.kill(pid, signal.SIGKILL)
            return "never rendered"

        with pytest.raises(TemplateLimitError, match="stopped by the operating system") as caught:
            renderer.render(
                "{% include 'x' %}",
                {},
                name="t",
                version=None,
                limits=RenderLimits(),
                loader=killing_loader,
            )
        assert "SIGKILL" in str(caught.value)
        assert "\n" not in str(caught.value)
        assert _render(renderer, "{{ 'back' }}") == "back"
        assert renderer.replaced == 1
    finally:
        renderer.close()


def test_a_worker_that_died_while_idle_is_replaced_before_it_is_used() -> None:
    renderer = IsolatedRenderer(workers=1)
    try:
        _render(renderer, "warm")
        (pid,) = renderer.idle_pids()
        os.kill(pid, signal.SIGKILL)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # dead, left for the pool to reap
        assert _render(renderer, "{{ 1 + 1 }}") == "2"
        assert renderer.replaced == 1
    finally:
        renderer.close()


def test_one_operation_past_its_cpu_time_is_killed_by_the_kernel_and_the_pool_goes_on() -> None:
    """A single C-level operation (a power of a few million digits) that no in-process check
    can interrupt: the worker's RLIMIT_CPU stops it (SIGXCPU) long before the parent's own
    deadline, which is set out of the way here."""
    renderer = IsolatedRenderer(workers=1, deadline_margin_s=120.0)
    try:
        _render(renderer, "warm")
        lenient = RenderLimits(timeout_s=0.2, max_int_bits=10**9, max_allocated=10**9)
        with pytest.raises(TemplateLimitError, match="SIGXCPU") as caught:
            renderer.render(
                "{{ (7 ** 30000000) % 10 }}",
                {},
                name="t",
                version=None,
                limits=lenient,
                loader=None,
            )
        assert "\n" not in str(caught.value)
        assert renderer.replaced == 1
        assert _render(renderer, "{{ 'on' }}") == "on"
    finally:
        renderer.close()
