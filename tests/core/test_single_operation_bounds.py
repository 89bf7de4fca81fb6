"""One template operation cannot outrun the render budget, and errors name no Python internals.

A single call into C (a division, a conversion, a string search) cannot be interrupted by the
deadline, so each is bounded before it runs: hostile cases fail with the limit error (or run
in linear time) within a small fraction of the budget.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from prompt_tool.core import TemplateEngine, TemplateLimitError, TemplateRenderError, sandbox

# A quarter of the default 2 s budget: every case must finish well inside one render.
FRACTION_OF_BUDGET = 0.5

BIG = int("7" * 4000)  # ~13,300 bits: what a JSON variable can hold
HAYSTACK = "b" * 1_000_000  # at the string-length limit
# Worst case for CPython's reverse search: about 7 s per call if it ran quadratically.
NEEDLE = "b" * 20_000 + "a" + "b" * 20_000


def render_timed(engine: TemplateEngine, source: str, values: dict[str, Any]) -> str:
    started = time.perf_counter()
    try:
        return engine.render(source, values, name="t")
    finally:
        elapsed = time.perf_counter() - started
        assert elapsed < FRACTION_OF_BUDGET, f"{source!r} took {elapsed:.2f} s"


def assert_refused(engine: TemplateEngine, source: str, values: dict[str, Any]) -> str:
    with pytest.raises(TemplateLimitError) as caught:
        render_timed(engine, source, values)
    return str(caught.value)


# -- big integers -----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["{{ n // m }}", "{{ n % m }}", "{{ (n % m) + 1 }}"])
def test_floor_division_and_modulo_of_two_big_integers_are_refused_before_running(
    engine: TemplateEngine, source: str
) -> None:
    message = assert_refused(engine, source, {"n": BIG, "m": BIG - 1})
    assert "bits" in message


def test_division_by_a_small_number_still_works_on_big_integers(engine: TemplateEngine) -> None:
    values = {"n": 10**4000}
    assert render_timed(engine, "{{ n % 7 }} {{ n // 7 % 10 }}", values) == f"{10**4000 % 7} 8"
    assert render_timed(engine, "{{ 2**2000 // 3**100 }}", {}) == str(2**2000 // 3**100)


@pytest.mark.parametrize(
    ("source", "text"),
    [
        ("{{ s|int(base=16) }}", "f" * 1_000_000),
        ("{{ s|int(0, 16) }}", "F" * 5000),
        ("{{ s|int(base=2) }}", "1" * 1_000_000),
        ("{{ s|int(base=32) }}", "v" * 1_000_000),
        ("{{ s|int(base=0) }}", "0x" + "f" * 1_000_000),
        ("{{ s|int(base=0) }}", " -0b" + "1_1" * 300_000 + " "),
        ("{{ s|int }}", "9" * 5000),
        ("{{ (s|int(base=16)) // 3 }}", "f" * 1_000_000),
    ],
)
def test_int_filter_refuses_more_digits_than_max_int_bits_allows(
    engine: TemplateEngine, source: str, text: str
) -> None:
    message = assert_refused(engine, source, {"s": text})
    assert "the int filter" in message and "limit 4096" in message


def test_int_filter_of_a_number_too_large_for_a_float_is_a_limit_error(
    engine: TemplateEngine,
) -> None:
    assert "too large" in assert_refused(engine, "{{ (1e308 * 10)|int }}", {})


def test_int_filter_still_converts_numbers_and_falls_back_on_prose(engine: TemplateEngine) -> None:
    source = (
        "{{ '42'|int }} {{ 'ff'|int(base=16) }} {{ '0x1f'|int(base=0) }} {{ '4.5'|int }} "
        "{{ 'abc'|int }} {{ prose|int(7) }} {{ (hexmax|int(base=16)).bit_length() }} "
        "{{ zeros|int }} {{ '1e999'|int }}"
    )
    values = {"prose": "not a number " * 1000, "hexmax": "f" * 1024, "zeros": "0" * 5000 + "12"}
    assert render_timed(engine, source, values) == "42 255 31 4 0 7 4096 12 0"


@pytest.mark.parametrize(
    "source",
    [
        "{{ 5|round(-10000000) }}",
        "{{ 5|round(-10000000, 'floor') }}",
        "{{ 5.0|round(10000000, 'ceil') }}",
    ],
)
def test_round_filter_refuses_precisions_that_build_huge_numbers(
    engine: TemplateEngine, source: str
) -> None:
    assert "the round filter" in assert_refused(engine, source, {})


def test_round_filter_still_rounds(engine: TemplateEngine) -> None:
    assert render_timed(engine, "{{ 42.55|round(1, 'floor') }} {{ 1234|round(-2) }}", {}) == (
        "42.5 1200"
    )


# -- string searches ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ s.rfind(n) }}",
        "{{ s.rfind(n, 10, -10) }}",
        "{{ s.rindex(n) if n in s else -1 }}",
        "{{ s.rsplit(n)|length }}",
        "{{ s.rsplit(n, 1)|length }}",
        "{{ s.rpartition(n)|length }}",
        "{{ s.find(n) }}",
        "{{ s.count(n) }}",
        "{{ s.split(n)|length }}",
        "{{ s.replace(n, 'x')|length }}",
        "{{ s|replace(n, 'x')|length }}",
        "{{ s.partition(n)|length }}",
        "{{ n in s }}",
        "{{ s.strip(chars)|length }}",
        "{{ s.lstrip(chars)|length }}",
        "{{ s.rstrip(chars)|length }}",
        "{{ s|trim(chars)|length }}",
        "{{ s.strip(spread)|length }}",
    ],
)
def test_string_searches_stay_linear_on_crafted_input(engine: TemplateEngine, source: str) -> None:
    values = {
        "s": HAYSTACK,
        "n": NEEDLE,
        "chars": "a" * 999_999 + "b",
        "spread": "".join(map(chr, range(0x100, 0x100 + 20_000))) + "b",
    }
    render_timed(engine, source, values)


REVERSE_CASES = [
    ("abcabcabc", "abc", ()),
    ("abcabcabc", "abc", (1,)),
    ("abcabcabc", "abc", (0, 8)),
    ("abcabcabc", "abc", (-4,)),
    ("abcabcabc", "abc", (-100, -1)),
    ("abcabcabc", "abc", (20,)),
    ("abcabcabc", "abc", (5, 3)),
    ("aaaa", "aa", ()),
    ("xyz", "q", ()),
    ("", "ab", ()),
]


@pytest.mark.parametrize(("text", "needle", "bounds"), REVERSE_CASES)
def test_linear_reverse_searches_give_the_same_answers_as_python(
    engine: TemplateEngine,
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    needle: str,
    bounds: tuple[int, ...],
) -> None:
    monkeypatch.setattr(sandbox, "_QUADRATIC_WORK", -1)  # every search takes the linear path
    values = {"s": text, "n": needle, "b": list(bounds)}
    assert render_timed(engine, "{{ s.rfind(n, *b) }}", values) == str(text.rfind(needle, *bounds))
    if not bounds:
        assert render_timed(engine, "{{ s.rpartition(n) }}", values) == str(text.rpartition(needle))
        for maxsplit in (-1, 0, 1, 2):
            assert render_timed(engine, f"{{{{ s.rsplit(n, {maxsplit}) }}}}", values) == str(
                text.rsplit(needle, maxsplit)
            )
    if text.rfind(needle, *bounds) < 0:
        with pytest.raises(TemplateRenderError, match="substring not found"):
            engine.render("{{ s.rindex(n, *b) }}", values, name="t")
    else:
        assert render_timed(engine, "{{ s.rindex(n, *b) }}", values) == str(
            text.rindex(needle, *bounds)
        )


def test_linear_strip_gives_the_same_answers_as_python(
    engine: TemplateEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandbox, "_QUADRATIC_WORK", -1)
    values = {"s": "xyxabcxyyx", "c": "yx"}
    source = (
        "{{ s.strip(c) }} {{ s.lstrip(c) }} {{ s.rstrip(c) }} {{ s|trim(c) }} {{ c.strip(c) }}|"
    )
    assert render_timed(engine, source, values) == "abc abcxyyx xyxabc abc |"


# -- case mappings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "text"),
    [
        ("{{ s.upper() }}", "\ufb03" * 400_000),  # 'ﬃ' -> 'FFI'
        ("{{ s.swapcase() }}", "\ufb03" * 400_000),
        ("{{ s.title() }}", "\u0130" * 600_000),
        ("{{ s.capitalize() }}", "\u0130" * 600_000),  # 'İ' lowers to two characters
        ("{{ s.lower() }}", "\u0130" * 600_000),
        ("{{ s.casefold() }}", "\u00df" * 600_000),  # 'ß' -> 'ss'
        ("{{ s|upper }}", "\ufb03" * 400_000),
        ("{{ s|lower }}", "\u0130" * 600_000),
        ("{{ s|title }}", "\u0130" * 600_000),
        ("{{ s|capitalize }}", "\u0130" * 600_000),
    ],
)
def test_case_mappings_that_grow_text_are_held_to_the_string_limit(
    engine: TemplateEngine, source: str, text: str
) -> None:
    message = assert_refused(engine, source, {"s": text})
    assert "limit 1000000" in message
    assert "do_" not in message  # the filter's name, not its Python function's


def test_case_mappings_within_the_limit_still_work(engine: TemplateEngine) -> None:
    assert render_timed(engine, "{{ s.upper() }} {{ s|upper }}", {"s": "\ufb03"}) == "FFI FFI"


# -- error messages ---------------------------------------------------------------------------

INTERNALS = ("prompt_tool.", "jinja2.", "object at 0x", "_Method", "StrictUndefined", "_Iterator")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ x.upper.foo }}", "method 'upper' has no attribute 'foo'"),
        ("{{ x.upper.__self__ }}", "method 'upper'"),
        ("{{ x.upper + 1 }}", "method 'upper' is used as a value; call it"),
        ("{{ 1 - x.upper }}", "method 'upper' is used as a value; call it"),
        ("{{ x.upper|length }}", "'method' has no len()"),
        ("{{ x.upper > 1 }}", "'method' and 'int'"),
        ("{% for i in [1] %}{{ loop.foo.bar }}{% endfor %}", "loop has no attribute 'foo'"),
        ("{{ ([1]|map('abs')).x.y }}", "iterator has no attribute 'x'"),
        ("{{ range.x.y }}", "range has no attribute 'x'"),
        ("{% macro m() %}{% endmacro %}{{ m.x.y }}", "has no attribute 'x'"),
        ("{{ x.replace(a, 'b') }}", "'a' is undefined"),
        ("{{ x.split(a) }}", "'a' is undefined"),
        ("{{ x.center() }}", "center expected at least 1 argument"),
        ("{{ x.replace() }}", "replace expected at least 2 arguments"),
        ("{{ x.rsplit(1, 2, 3) }}", "rsplit"),
        ("{{ x.rfind() }}", "rfind"),
        ("{{ [1, 2]|map('center', a)|list }}", "'a' is undefined"),
        ("{{ d.a.b }}", "'dict' object has no attribute 'a'"),
        ("{{ l[5].b }}", "'list' object has no item 5"),
    ],
)
def test_errors_say_what_the_template_did_wrong_without_python_internals(
    engine: TemplateEngine, source: str, expected: str
) -> None:
    with pytest.raises(TemplateRenderError) as caught:
        render_timed(engine, source, {"x": "abc", "d": {}, "l": []})
    message = str(caught.value)
    assert expected in message
    for internal in INTERNALS:
        assert internal not in message, message


# -- strict undefined inside containers ----------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ (a, b) }}",
        "{{ [a] }}",
        "{{ {'k': a} }}",
        "{{ [1, [2, a]] }}",
        "{{ (a,)|string }}",
        "{% set l = [x, a] %}{{ l|join }}",
        "{% macro m() %}{{ varargs }}{% endmacro %}{{ m(a) }}",
        "{% macro m() %}{{ kwargs }}{% endmacro %}{{ m(k=a) }}",
    ],
)
def test_strict_undefined_applies_inside_containers(engine: TemplateEngine, source: str) -> None:
    with pytest.raises(TemplateRenderError, match="'a' is undefined") as caught:
        render_timed(engine, source, {"x": "abc"})
    assert "Undefined" not in str(caught.value)


def test_guarded_undefined_values_in_containers_still_render(engine: TemplateEngine) -> None:
    source = (
        "{{ [a is defined, a|default(1)] }}"
        "{% macro m(p) %}{{ varargs|length }}{% endmacro %}{{ m(a, 1) }}"
    )
    assert render_timed(engine, source, {}) == "[False, 1]1"


# -- slice ----------------------------------------------------------------------------------------


def test_slice_filter_splits_a_list_into_columns(engine: TemplateEngine) -> None:
    source = "{{ [1, 2, 3, 4]|slice(2)|list }} {{ [1, 2, 3]|slice(2, 0)|list }} {{ [1]|slice(3) }}"
    assert render_timed(engine, source, {}) == "[[1, 2], [3, 4]] [[1, 2], [3, 0]] <iterator>"
    loop = "{% for column in 'abcde'|slice(2) %}{{ column|join }}|{% endfor %}"
    assert render_timed(engine, loop, {}) == "abc|de|"


@pytest.mark.parametrize("source", ["{{ [1, 2]|slice(10**6)|list }}", "{{ [1]|slice(10**9) }}"])
def test_slice_filter_refuses_more_slices_than_range_allows(
    engine: TemplateEngine, source: str
) -> None:
    assert "the slice filter" in assert_refused(engine, source, {})
