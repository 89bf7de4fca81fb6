"""Hostile templates fail fast, at validation and at render, instead of eating CPU or memory."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import pytest

from prompt_tool.core import (
    RenderLimits,
    TemplateEngine,
    TemplateError,
    TemplateLimitError,
    TemplateRenderError,
)
from prompt_tool.settings import Settings

MAX_SECONDS = 2.0
# The default allocation meter (16M characters/items) lets a render hold up to ~16-64 MB.
MAX_PEAK_BYTES = 64 * 1024 * 1024


@dataclass
class Cost:
    seconds: float = 0.0
    peak_bytes: int = 0


@contextmanager
def measured() -> Iterator[Cost]:
    cost = Cost()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = time.perf_counter() - started
        cost.peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def assert_cheap(action: Callable[[], object], *, seconds: float = MAX_SECONDS) -> None:
    """``action`` is fast and small. Timed and traced in separate runs: tracing every
    allocation slows allocation-heavy code several times over."""

    def run() -> None:
        with suppress(TemplateError):
            action()

    started = time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    assert elapsed < seconds, f"took {elapsed:.2f} s"
    with measured() as cost:
        run()
    assert cost.peak_bytes < MAX_PEAK_BYTES, f"peaked at {cost.peak_bytes / 2**20:.0f} MiB"


# Expressions Jinja would constant-fold at compile time, in every position folding happens:
# output, set, if, for, filter arguments, macro defaults.
FOLDABLE_BOMBS = [
    "{{ 'a' * 10**10 }}",
    "{{ 9**(9**9) }}",
    "{{ 2**100000000 }}",
    "{{ ('a'*1000)*1000*1000 }}",
    "{{ [1] * 10**9 }}",
    "{{ 'x'|center(1000000000) }}",
    "{{ 'x'|indent(1000000000) }}",
    "{{ '%999999999s'|format(1) }}",
    "{{ '%999999999s' % 1 }}",
    "{{ 'x' ~ ('y' * 999999999) }}",
    "{% set x = 'a' * 10**10 %}",
    "{% if 'a' * 10**10 %}{% endif %}",
    "{% for c in 'a' * 10**10 %}{% endfor %}",
    "{% macro m(x='a' * 10**10) %}{% endmacro %}",
    "{{ ('a' * 10**10)|length }}",
    "{{ range(10**9)|list }}",
    "{{ 'ab'|replace('', 'x' * 1000000) }}",
    "{{ (['x' * 1000000] * 1000)|join }}",
    # Filters in output are folded by Jinja's code generator even without the optimizer: 40
    # bounded-but-large constants would be 40 MB inside compile().
    "{{ 'x'|center(999999) }}" * 40,
]


@pytest.mark.parametrize("source", FOLDABLE_BOMBS)
def test_constant_folding_cannot_blow_up_validation(engine: TemplateEngine, source: str) -> None:
    with measured() as cost:
        engine.validate(source, name="bomb")
    assert cost.seconds < 0.5
    assert cost.peak_bytes < 8 * 1024 * 1024


@pytest.mark.parametrize("source", FOLDABLE_BOMBS)
def test_constant_expression_bombs_fail_fast_at_render(engine: TemplateEngine, source: str) -> None:
    def render() -> None:
        try:
            engine.render(source, name="bomb")
        except TemplateLimitError:
            return
        except TemplateRenderError as error:  # e.g. a macro default that is never evaluated
            pytest.fail(f"unexpected error: {error}")

    assert_cheap(render)


RENDER_BOMBS = [
    # strings and lists
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'|indent(10**9) }}",
    "{{ 'x'|indent('y' * 999999) * 2 }}",
    "{{ 'x x'|wordwrap(1, wrapstring='y' * 999999) }}",
    "{{ '%.999999999f'|format(1.0) }}",
    "{{ '%*s'|format(999999999, 'x') }}",
    "{{ '%(a)999999999s'|format(a=1) }}",
    "{{ ('%999999s' * 1000)|format(*range(1000)) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '{0:{1}}'.format(1, 999999999) }}",
    "{{ ('{:999999}' * 1000).format(*range(1000)) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ 'x'.rjust(10**9) }}",
    "{{ 'x'.zfill(10**9) }}",
    "{{ 'x'.center(10**9) }}",
    "{{ ('\t' * 1000).expandtabs(10**6) }}",
    "{{ ('a' * 100000).replace('', 'x' * 1000) }}",
    "{{ ('a' * 100000)|replace('a', 'x' * 1000) }}",
    "{{ (['x' * 100000] * 1000)|join }}",
    "{{ ''.join(['x' * 100000] * 1000) }}",
    "{{ ('x' * 900000) + ('y' * 900000) }}",
    "{{ ([1] * 900000) + ([2] * 900000) }}",
    "{{ ('x' * 900000) ~ ('y' * 900000) }}",
    "{{ 10**1000 * 10**1000 * 10**1000 * 10**1000 * 10**1000 }}",
    "{{ 2**5000 }}",
    "{{ ('\"' * 500000)|tojson|tojson }}",
    "{{ (('a' * 100000)|list|string)|list|string }}",
    "{{ data|tojson(indent=10**9) }}",
    "{{ range(10000)|batch(10**9, 'x')|list }}",
    "{{ [1, 2]|slice(10**9)|list }}",
    "{{ [[1] * 1000] * 1000|sum(start=[]) }}",
    # output
    "{% for i in range(10000) %}{{ 'x' * 1000 }}{% endfor %}",
    "{% set s = 'x' * 1000000 %}{% for i in range(10000) %}{{ s }}{% endfor %}",
    "{{ '\u20ac' * 400000 }}",
    # buffers inside macros, blocks and call blocks
    "{% macro m() %}{% for i in range(10000) %}{% for j in range(10000) %}xxxxxxxxxx"
    "{% endfor %}{% endfor %}{% endmacro %}{{ m() }}",
    "{% set s %}{% for i in range(10000) %}{% for j in range(10000) %}xxxxxxxxxx{% endfor %}"
    "{% endfor %}{% endset %}",
    "{% macro m() %}{{ caller() }}{% endmacro %}{% call m() %}{% for i in range(10000) %}"
    "{% for j in range(10000) %}xxxxxxxxxx{% endfor %}{% endfor %}{% endcall %}",
    "{% block b %}{% for i in range(10000) %}{{ 'x' * 1000 }}{% endfor %}{% endblock %}"
    "{% macro m() %}{{ self.b() }}{% endmacro %}{{ m() }}",
    # shared references: small in memory, huge to print, compare, hash or serialise
    "{% set x = range(10000)|list * 10 %}{{ [x] * 300 == [x] * 300 }}",
    "{% set x = range(1000)|list %}{{ ([x] * 10000)|string }}",
    "{% set x = range(1000)|list %}{% set y = [x, x, x, x, x, x, x, x, x, x] %}"
    "{% set z = [y, y, y, y, y, y, y, y, y, y] %}{% set w = [z, z, z, z, z, z, z, z, z, z] %}"
    "{% set v = [w, w, w, w, w] %}{{ v == v }}",
    "{% set x = range(10000)|list %}{% set d = {'a': x, 'b': x, 'c': x, 'd': x} %}"
    "{% set e = {'a': d, 'b': d, 'c': d, 'd': d} %}{% set f = {'a': e, 'b': e, 'c': e} %}"
    "{% set g = {'a': f, 'b': f, 'c': f, 'd': f} %}{% set h = {'a': g, 'b': g, 'c': g} %}"
    "{{ h|tojson }}",
    "{% macro m(x, n) %}{% if n %}{{ m([x, x], n - 1) }}{% else %}{{ x == x }}{% endif %}"
    "{% endmacro %}{{ m([1], 64) }}",
    "{% macro m(n) %}{% if n %}{{ m(n - 1, *(varargs + varargs)) }}{% endif %}{% endmacro %}"
    "{{ m(64, [1]) }}",
    "{{ ([1] * 999999)|batch(999999, [range(1000)|list])|list|length }}",
    # many bounded results kept alive at once
    "{% set a = 'x' * 999999 %}" + "".join(f"{{% set v{i} = a|upper %}}" for i in range(40)),
    "{% set s = 'x' * 999999 %}{% set l = [" + ", ".join(f"s[{i}:]" for i in range(40)) + "] %}",
    "{{ (range(10000)|list * 100)|map('center', 255)|list|length }}",
    "{{ ('xy' * 499999)|wordwrap(1) }}",
    # recursion
    "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}",
    "{% macro m(s, n) %}{% if n %}{{ m(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}"
    "{% endmacro %}{{ m('x', 64) }}",
    "{% macro m(s) %}{{ m(s * 2) }}{% endmacro %}{{ m('x') }}",
    "{% for x in items recursive %}{{ loop(items) }}{% endfor %}",
]


@pytest.mark.parametrize("source", RENDER_BOMBS)
def test_render_bombs_fail_fast_with_a_limit_error(engine: TemplateEngine, source: str) -> None:
    def render() -> None:
        with pytest.raises(TemplateLimitError):
            engine.render(source, {"data": {"a": [1]}, "items": [1]}, name="bomb")

    assert_cheap(render)


CLOCK_BOMBS = [
    "{% for i in range(10**6) %}{% for j in range(10**6) %}{% endfor %}{% endfor %}",
    "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    # pre-bound iterables: no call inside the loops, so only the loop guard sees the clock
    "{% set r = range(10000) %}{% for i in r %}{% for j in r %}{% for k in r %}{% endfor %}"
    "{% endfor %}{% endfor %}",
    "{% for a in s %}{% for b in s %}{% for c in s %}{% endfor %}{% endfor %}{% endfor %}",
    "{% for a in s|list %}{% for b in s|list %}{% endfor %}{% endfor %}",
    "{% macro m(n) %}{% if n %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}{% endmacro %}{{ m(40) }}",
    "{% for i in range(10000) %}{% for j in range(10000) %}{% set x = i * j %}{% endfor %}"
    "{% endfor %}",
    # one filter call, a Python callback per item from inside C
    "{{ (range(10000)|list * 100)|sort(attribute='real')|length }}",
    "{{ (range(10000)|list * 100)|select('odd')|list|length }}",
    "{{ (range(10000)|list * 100)|map('abs')|list|length }}",
]


@pytest.mark.parametrize("source", CLOCK_BOMBS)
def test_loops_that_produce_no_output_still_hit_the_deadline(
    quick_engine: TemplateEngine, source: str
) -> None:
    started = time.perf_counter()
    with pytest.raises(TemplateLimitError, match=r"longer than|range\(\)"):
        quick_engine.render(source, {"s": "x" * 100_000}, name="spin")
    assert time.perf_counter() - started < 1.5


def test_include_cycle_at_render_time_fails_fast(engine: TemplateEngine) -> None:
    # Validation refuses cycles, but a loader can still serve one (e.g. a later version).
    store = {"a": "A{% include 'b' %}", "b": "B{% include 'a' %}"}
    started = time.perf_counter()
    with pytest.raises(TemplateLimitError, match="nest too deeply"):
        engine.render("{% include 'a' %}", name="top", loader=store.get)
    assert time.perf_counter() - started < MAX_SECONDS


def test_output_cap_counts_utf8_bytes(engine: TemplateEngine) -> None:
    limits = RenderLimits(max_output_bytes=10)
    assert engine.render("{{ 'é' * 5 }}", name="t", limits=limits) == "é" * 5
    with pytest.raises(TemplateLimitError, match="output is over the limit of 10 bytes"):
        engine.render("{{ 'é' * 6 }}", name="t", limits=limits)


def test_limits_can_be_set_per_render(engine: TemplateEngine) -> None:
    assert engine.render("{{ range(50)|length }}", name="t") == "50"
    with pytest.raises(TemplateLimitError, match="limit of 10"):
        engine.render("{{ range(50)|length }}", name="t", limits=RenderLimits(max_range=10))


def test_limits_default_from_settings() -> None:
    settings = Settings(template_max_output_bytes=123, template_render_timeout_s=0.5)
    engine = TemplateEngine(settings=settings)
    assert engine.limits.max_output_bytes == 123
    assert engine.limits.timeout_s == 0.5
    assert engine.limits.max_range == 10_000


def test_render_limits_refuse_nonsense_values() -> None:
    with pytest.raises(ValueError, match="max_range"):
        RenderLimits(max_range=0)
    with pytest.raises(ValueError, match="timeout_s"):
        RenderLimits(timeout_s=0)


def test_reasonable_templates_stay_well_inside_the_limits(engine: TemplateEngine) -> None:
    source = (
        "{% macro row(d) %}- {{ d.title }}: {{ d.body|truncate(30) }}{% endmacro %}"
        "{% for d in docs %}{{ row(d) }}\n{% endfor %}{{ ('x' * 1000)|length }}"
        "{{ ('ab' * 100)|center(300)|length }}{{ '%10s'|format('r') }}{{ 2**64 }}"
    )
    docs = [{"title": f"t{i}", "body": "lorem ipsum " * 20} for i in range(500)]
    output = engine.render(source, {"docs": docs}, name="ok")
    assert output.count("\n") == 500
    assert output.endswith("1000300         r18446744073709551616")
