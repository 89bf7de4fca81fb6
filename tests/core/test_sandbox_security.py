"""Rendering never executes arbitrary Python or reveals interpreter internals."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from prompt_tool.core import TemplateEngine, TemplateError, TemplateRenderError

PAYLOADS = [
    line
    for line in (Path(__file__).parent / "ssti_payloads.txt").read_text("utf-8").splitlines()
    if line.strip() and not line.startswith("#")
]

# Anything an attacker learns from: a type, a module, a function object, an address, a path
# into os/subprocess, or the dunder names of an attribute walk.
REVEALING = (
    "<class",
    "class '",
    "subprocess",
    "function",
    "module",
    "os.",
    "__",
    "<built-in",
    "0x",
    "object at",
    "globals",
    "builtins",
    "Popen",
    "uid=",
)

VARIABLES = {"x": "abc", "user": {"name": "n"}, "items": [1, 2]}


def test_payload_corpus_is_substantial() -> None:
    assert len(PAYLOADS) >= 40
    assert len(set(PAYLOADS)) == len(PAYLOADS), "duplicate payloads"


@pytest.mark.parametrize("payload", PAYLOADS)
def test_ssti_payload_fails_cleanly_or_renders_harmlessly(
    engine: TemplateEngine, payload: str
) -> None:
    started = time.perf_counter()
    try:
        output = engine.render(payload, VARIABLES, name="ssti")
    except TemplateError as error:
        message = str(error)
        assert "\n" not in message
        assert "0x" not in message and "subprocess" not in message
    else:
        for marker in REVEALING:
            assert marker not in output, f"{payload!r} rendered {output!r}"
    assert time.perf_counter() - started < 1.0


def test_variables_and_data_survive_every_payload(engine: TemplateEngine) -> None:
    # Immutable sandbox: no payload may have changed the caller's data.
    variables = {"x": "abc", "user": {"name": "n"}, "items": [1, 2]}
    for payload in PAYLOADS:
        with contextlib.suppress(TemplateError):
            engine.render(payload, variables, name="ssti")
    assert variables == {"x": "abc", "user": {"name": "n"}, "items": [1, 2]}


def test_attribute_walk_to_dunder_is_refused_with_clear_error(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateRenderError, match=r"unsafe operation refused.*__class__"):
        engine.render("{{ ''.__class__.__mro__ }}", name="walk")


def test_str_format_cannot_reach_attributes(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateRenderError, match="__class__"):
        engine.render("{{ '{0.__class__}'.format(x) }}", {"x": 1}, name="fmt")


def test_default_globals_are_removed_except_capped_range(engine: TemplateEngine) -> None:
    for name in ("cycler", "joiner", "lipsum", "namespace", "dict"):
        with pytest.raises(TemplateRenderError, match=f"'{name}' is undefined"):
            engine.render(f"{{{{ {name} }}}}", name="globals")
    assert engine.render("{{ range(3)|list }}", name="globals") == "[0, 1, 2]"
    assert set(engine.environment.globals) == {"range"}


def test_methods_print_without_revealing_anything(engine: TemplateEngine) -> None:
    assert engine.render("{{ x.upper }}", {"x": "a"}, name="m") == "<method upper>"
    assert engine.render("{{ range }}", name="m") == "<range>"


def test_plain_data_methods_still_work(engine: TemplateEngine) -> None:
    source = (
        "{{ x.upper() }} {{ x.split(',')|join('+') }} {{ user.get('name') }} "
        "{{ user.items()|list }} {{ items.index(2) }} {{ '{:>4}|{}'.format(1, x) }} "
        "{{ '%05.1f'|format(3.14159) }} {{ 'a-b'.replace('-', '+') }}"
    )
    output = engine.render(
        source, {"x": "a,b", "user": {"name": "n"}, "items": [1, 2]}, name="methods"
    )
    assert output == "A,B a+b n [('name', 'n')] 1    1|a,b 003.1 a+b"


def test_mutating_methods_are_refused(engine: TemplateEngine) -> None:
    for source in ("{{ items.append(3) }}", "{{ user.update({'a': 1}) }}", "{{ user.pop('a') }}"):
        with pytest.raises(TemplateRenderError):
            engine.render(source, {"items": [1], "user": {"a": 1}}, name="mutate")


def test_only_known_callables_can_be_called(engine: TemplateEngine) -> None:
    # A value that is callable but not one of ours (here: a filter's generator method, if it
    # ever leaked) is refused by the call hook itself.
    with pytest.raises(TemplateRenderError):
        engine.render("{{ (items|map('string')).send(None) }}", {"items": [1]}, name="call")


def test_removed_filters_are_unavailable(engine: TemplateEngine) -> None:
    for name in ("random", "safe", "escape", "e", "forceescape", "urlize", "xmlattr"):
        with pytest.raises(TemplateError, match=name):
            engine.render(f"{{{{ x|{name} }}}}", {"x": "a"}, name="filters")


def test_autoescape_is_off_and_html_passes_through(engine: TemplateEngine) -> None:
    assert engine.render("{{ x }}", {"x": "<b>&amp;</b>"}, name="html") == "<b>&amp;</b>"


def test_tojson_returns_plain_text(engine: TemplateEngine) -> None:
    output = engine.render("{{ data|tojson }}", {"data": {"b": [1, "x"], "a": None}}, name="j")
    assert output == '{"a": null, "b": [1, "x"]}'
    assert type(output) is str


def test_raw_blocks_and_comments_are_never_evaluated(engine: TemplateEngine) -> None:
    source = "{% raw %}{{ ''.__class__ }}{% endraw %}{# {{ ''.__class__ }} #}"
    assert engine.render(source, name="raw") == "{{ ''.__class__ }}"


def test_blocks_and_lazy_filters_print_without_addresses(engine: TemplateEngine) -> None:
    source = (
        "{% block b %}B{% endblock %}|{{ self.b }}|{{ self.b() }}|{{ items|map('string') }}|"
        "{{ items|reverse }}|{{ items|map('string')|join(',') }}"
    )
    output = engine.render(source, {"items": [1, 2]}, name="blocks")
    assert output == "B|<block 'b'>|B|<iterator>|<iterator>|1,2"


def test_methods_can_be_called_inside_loops_blocks_and_macros(engine: TemplateEngine) -> None:
    source = (
        "{% for i in items %}{{ i.upper() }}{{ loop.cycle('-', '+') }}{% endfor %}"
        "{% block b %}{{ x.title() }}{% endblock %}"
        "{% macro m() %}{{ x.replace('a', 'o') }}{% endmacro %}{{ m() }}"
    )
    output = engine.render(source, {"items": ["a", "b"], "x": "abc"}, name="calls")
    assert output == "A-B+Abcobc"
