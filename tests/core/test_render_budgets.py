"""Render budgets are guarantees, not samples: the deadline is read on every loop block,
include, import, macro call and filter, and memory is charged in bytes with nothing kept
alive by the accounting itself."""

from __future__ import annotations

import re
import time
import tracemalloc

import pytest

from prompt_tool.core import RenderLimits, TemplateEngine, TemplateLimitError
from prompt_tool.settings import Settings

QUICK = RenderLimits(timeout_s=0.3)
PEAK_BOUND = 200 * 1024 * 1024
DEADLINE_ERROR = re.escape("longer than the 0.3 s limit")


@pytest.fixture
def engine() -> TemplateEngine:
    return TemplateEngine(settings=Settings())


def fan_out(levels: int, width: int, statement: str) -> dict[str, str]:
    """Templates t0..t{levels}: each pulls in the next ``width`` times, the last is empty."""
    store = {f"t{level}": statement.format(f"t{level + 1}") * width for level in range(levels)}
    store[f"t{levels}"] = "{% set nothing = 1 %}"
    return store


@pytest.mark.parametrize(
    "statement",
    [
        "{{% include '{}' %}}",
        # with context: a module per import (without, one per template per render, cached)
        "{{% import '{}' as m with context %}}",
        "{{% from '{}' import nothing with context %}}",
    ],
    ids=["include", "import", "from-import"],
)
def test_an_include_or_import_fan_out_is_stopped_by_the_deadline(
    engine: TemplateEngine, statement: str
) -> None:
    store = fan_out(levels=10, width=8, statement=statement)  # 8**10 templates pulled in
    with pytest.raises(TemplateLimitError, match=DEADLINE_ERROR):
        engine.render("{% include 't0' %}", name="top", loader=store.get, limits=QUICK)


LOOPS_THAT_DO_LITTLE = [
    "{% for a in range(10000) %}{% for b in range(10000) %}{% endfor %}{% endfor %}",
    # loops under the old 4,096-item threshold, which were never checked per item
    "{% for a in range(4000) %}{% for b in range(4000) %}{% for c in range(4000) %}"
    "{% endfor %}{% endfor %}{% endfor %}",
    # few iterations, each one costly operation that reads no clock (a comparison in C)
    "{% set big = range(10000)|list * 100 %}"
    "{% for a in range(4000) %}{% if big == big %}{% endif %}{% endfor %}",
    "{% for a in range(4000) %}{% for b in (range(4000)|map('abs')) %}"
    "{{ loop.length if false }}{% endfor %}{% endfor %}",
]


@pytest.mark.parametrize("source", LOOPS_THAT_DO_LITTLE)
def test_nested_loops_that_do_little_stop_within_the_deadline(
    engine: TemplateEngine, source: str
) -> None:
    started = time.perf_counter()
    with pytest.raises(TemplateLimitError, match=DEADLINE_ERROR):
        engine.render(source, name="spin", limits=QUICK)
    elapsed = time.perf_counter() - started
    assert elapsed < QUICK.timeout_s * 1.5, f"stopped after {elapsed:.2f} s"


def test_repeated_sorting_of_a_large_list_is_stopped_by_the_deadline(
    engine: TemplateEngine,
) -> None:
    source = "{% for i in range(10000) %}{{ big|sort|first }}{% endfor %}"
    with pytest.raises(TemplateLimitError, match=DEADLINE_ERROR):
        engine.render(source, {"big": list(range(200_000, 0, -1))}, name="sorts", limits=QUICK)


REPEATED_BATCH = "{% for i in range(1000) %}{% set b = s|batch(1)|list %}{% endfor %}"


def test_repeated_batch_of_a_long_string_fails_with_the_memory_limit(
    engine: TemplateEngine,
) -> None:
    with pytest.raises(TemplateLimitError, match="bytes of values in total"):
        engine.render(REPEATED_BATCH, {"s": "x" * 100_000}, name="batches")


def test_repeated_batch_of_a_long_string_stays_under_the_memory_bound(
    engine: TemplateEngine,
) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(TemplateLimitError):
            engine.render(REPEATED_BATCH, {"s": "x" * 100_000}, name="batches")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BOUND, f"peaked at {peak / 2**20:.0f} MiB"


def test_the_size_memo_does_not_keep_a_renders_garbage_alive(engine: TemplateEngine) -> None:
    # With the allocation cap out of the way, only what is alive counts: each list of 20,000
    # one-item lists (~1.8 MB) is garbage once the next replaces it, so the twelve of them
    # must never be alive at once (they were, all of them, held by the size memo: ~23 MB).
    limits = RenderLimits(timeout_s=60, max_allocated=2**40)
    source = "{% for i in range(12) %}{% set b = s|batch(1)|list %}{% endfor %}done"
    tracemalloc.start()
    try:
        result = engine.render(source, {"s": "x" * 20_000}, name="memo", limits=limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result == "done"
    assert peak < 16 * 1024 * 1024, f"peaked at {peak / 2**20:.0f} MiB"


def test_a_one_item_list_is_charged_its_bytes_not_one_item(engine: TemplateEngine) -> None:
    # 20,000 one-item lists: 20,000 items, but about 1.8 MB in memory.
    limits = RenderLimits(max_allocated=1_000_000)
    with pytest.raises(TemplateLimitError, match="more than 1000000 bytes"):
        engine.render("{{ s|batch(1)|list|length }}", {"s": "x" * 20_000}, name="b", limits=limits)


def test_loops_keep_their_length_and_items_under_the_guard(engine: TemplateEngine) -> None:
    source = (
        "{% for x in items %}{{ loop.index }}/{{ loop.length }}{{ x }} {% endfor %}|"
        "{% for x in items|map('upper') %}{{ x }}{{ loop.revindex0 }}{% if loop.last %}!"
        "{% endif %}{% endfor %}|"
        "{% for k, v in pairs|dictsort %}{{ k }}={{ v }};{% endfor %}"
    )
    items = [f"i{n}" for n in range(20)]
    result = engine.render(source, {"items": items, "pairs": {"b": 2, "a": 1}}, name="loops")
    first, second, third = result.split("|")
    assert first == " ".join(f"{n + 1}/20i{n}" for n in range(20)) + " "
    assert second == "".join(f"I{n}{19 - n}" for n in range(20)) + "!"
    assert third == "a=1;b=2;"
