"""Rendering reproduces text byte for byte and resolves includes through the caller's loader."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prompt_tool.core import (
    PromptTemplate,
    TemplateEngine,
    TemplateLimitError,
    TemplateNotFound,
    TemplateRenderError,
    TemplateValidationError,
)
from prompt_tool.settings import Settings

PLAIN_TEXTS = [
    "",
    "hello",
    "hello\n",
    "hello\n\n\n",
    "line one\r\nline two\r\n",
    "old mac\rline\r",
    "mixed\r\nline\nendings\r",
    "\n\r\n\r",
    "unicode: é ü 中文 😀 \u2028 \x00 \t",
    "lone braces { } }} %} #} { % { #",
    "a {x} b {x}} c",
    "ends with a brace {",
    "  leading and trailing whitespace  \n  ",
]


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_plain_text_renders_to_itself_byte_for_byte(engine: TemplateEngine, text: str) -> None:
    output = engine.render(text, name="plain")
    assert output.encode("utf-8") == text.encode("utf-8")


_NO_DELIMITERS = st.text(
    alphabet=st.sampled_from(list("ab {}%#-+\r\n\t é中😀\u2028")), max_size=60
).filter(lambda text: "{{" not in text and "{%" not in text and "{#" not in text)


@settings(max_examples=200, deadline=None)
@given(text=_NO_DELIMITERS)
def test_any_text_without_delimiters_renders_to_itself(text: str) -> None:
    assert ENGINE.render(text, name="plain") == text


ENGINE = TemplateEngine(settings=Settings())

# (template piece, what it renders to): text with every kind of line ending, and tags that
# span lines, so the lexer's line counting is exercised around restored newlines.
_PIECES = st.one_of(
    st.lists(st.sampled_from(["a", " ", "\n", "\r\n", "\r", "é", "}", "%", "#"]), max_size=8)
    .map("".join)
    .map(lambda text: (text, text)),
    st.sampled_from(
        [
            ("{{ 'x' }}", "x"),
            ("{{\r\n'x'\r\n}}", "x"),
            ("{# comment\r\nacross\rlines\n #}", ""),
            ("{% if true %}y{% endif %}", "y"),
            ("{%\r\nif true\r\n%}z\r\n{%\rendif\n%}", "z\r\n"),
            ("{% raw %}\r\n{{ raw }}\r{% endraw %}", "\r\n{{ raw }}\r"),
            ("{{ 'a\r\nb\rc\nd' }}", "a\r\nb\rc\nd"),
            ("{% set v = 1 %}", ""),
            ("{% for i in [1, 2] %}\r\n{{ i }}{% endfor %}", "\r\n1\r\n2"),
        ]
    ),
)


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(_PIECES, max_size=12))
def test_line_endings_survive_around_tags_comments_and_raw_blocks(
    pieces: list[tuple[str, str]],
) -> None:
    source = "".join(piece for piece, _ in pieces)
    expected = "".join(output for _, output in pieces)
    assert ENGINE.render(source, name="crlf") == expected


def test_crlf_template_with_variables_keeps_its_line_endings(engine: TemplateEngine) -> None:
    source = "Dear {{ name }},\r\n\r\n{% if vip %}Thanks!\r\n{% endif %}Bye\r\n"
    assert engine.render(source, {"name": "Ann", "vip": True}, name="t") == (
        "Dear Ann,\r\n\r\nThanks!\r\nBye\r\n"
    )


def test_variable_values_are_inserted_verbatim(engine: TemplateEngine) -> None:
    value = "a\r\nb {{ not a tag }} <html> & 'quotes'"
    assert engine.render("[{{ v }}]", {"v": value}, name="t") == f"[{value}]"


def test_undefined_variable_is_a_clear_error_with_line(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateRenderError) as caught:
        engine.render("one\ntwo {{ missing }}\n", name="greeting", version=7)
    message = str(caught.value)
    assert message.startswith("template 'greeting' version 7, line 2: 'missing' is undefined")
    assert "\n" not in message
    assert caught.value.lineno == 2


def test_errors_inside_python_operations_name_the_line(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateRenderError, match=r"line 3: ZeroDivisionError"):
        engine.render("a\nb\n{{ 1 / 0 }}", name="t")


STORE = {
    "greet": "Hello {{ name }}!",
    "macros": "{% macro shout(x) %}{{ x|upper }}!{% endmacro %}",
    "base": "<{% block body %}default{% endblock %}>",
    "mid": "{% extends 'base' %}{% block body %}mid {{ super() }}{% endblock %}",
    "chain": "{% import 'macros' as m %}{% macro twice(x) %}{{ m.shout(x) * 2 }}{% endmacro %}",
    "broken": "line one\n{{ nope }}",
}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{% include 'greet' %}", "Hello Ann!"),
        ("{% import 'macros' as m %}{{ m.shout('hi') }}", "HI!"),
        ("{% from 'macros' import shout %}{{ shout('a') }}", "A!"),
        ("{% extends 'base' %}{% block body %}top {{ super() }}{% endblock %}", "<top default>"),
        (
            "{% extends 'mid' %}{% block body %}top {{ super() }} {{ super.super() }}"
            "{% endblock %}",
            "<top mid default default>",
        ),
        ("{% import 'chain' as c %}{{ c.twice('q') }}", "Q!Q!"),
        ("{% include 'missing' ignore missing %}ok", "ok"),
        ("{% include ['missing', 'greet'] %}", "Hello Ann!"),
    ],
)
def test_include_import_and_extend_resolve_through_the_loader(
    engine: TemplateEngine, source: str, expected: str
) -> None:
    assert engine.render(source, {"name": "Ann"}, name="top", loader=STORE.get) == expected


def test_cached_template_plus_loader_always_renders_current_includes(
    engine: TemplateEngine,
) -> None:
    source = "[{% include 'part' %}]"
    assert engine.render(source, name="top", loader={"part": "v1"}.get) == "[v1]"
    assert engine.render(source, name="top", loader={"part": "v2"}.get) == "[v2]"
    assert engine.cache_stats().hits >= 1  # the top-level template was not recompiled


def test_imported_modules_are_not_shared_between_renders(engine: TemplateEngine) -> None:
    # Jinja caches an imported template's module on the template object; ours must follow the
    # loader of each render, including imports made by the imported template itself.
    source = "{% import 'outer' as o %}{{ o.go() }}"
    outer = "{% import 'inner' as i %}{% macro go() %}{{ i.value() }}{% endmacro %}"
    first = {"outer": outer, "inner": "{% macro value() %}1{% endmacro %}"}
    second = {"outer": outer, "inner": "{% macro value() %}2{% endmacro %}"}
    assert engine.render(source, name="top", loader=first.get) == "1"
    assert engine.render(source, name="top", loader=second.get) == "2"


def test_missing_include_is_template_not_found_naming_it(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateNotFound, match="included template 'nope' does not exist"):
        engine.render("{% include 'nope' %}", name="top", loader=STORE.get)


def test_include_without_a_loader_is_template_not_found(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateNotFound, match="'greet'"):
        engine.render("{% include 'greet' %}", name="top")


def test_error_in_included_template_names_it_and_both_lines(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateRenderError) as caught:
        engine.render("x\n{% include 'broken' %}", name="top", loader=STORE.get)
    assert str(caught.value).startswith(
        "template 'top', line 2: in included template 'broken', line 2: 'nope' is undefined"
    )


def test_compiled_templates_render_sandboxed_and_bounded(engine: TemplateEngine) -> None:
    template = engine.compile("{{ x|upper }}")
    assert isinstance(template, PromptTemplate)
    assert template.render(x="a") == "A"
    assert list(template.generate(x="b")) == ["B"]
    with pytest.raises(TemplateLimitError):
        engine.compile("{{ 'a' * 10**10 }}").render()
    with pytest.raises(TemplateRenderError):
        template.render(x=object())


def test_rendering_is_deterministic(engine: TemplateEngine) -> None:
    source = "{% for k, v in d|dictsort %}{{ k }}={{ v }};{% endfor %}{{ d|tojson }}"
    outputs = {engine.render(source, {"d": {"b": 1, "a": 2}}, name="t") for _ in range(5)}
    assert outputs == {'a=2;b=1;{"a": 2, "b": 1}'}


def test_concurrent_renders_keep_their_own_loaders_and_budgets(engine: TemplateEngine) -> None:
    source = "{% include 'who' %}:{{ n }}"
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for _ in range(50):
                results[n] = engine.render(
                    source, {"n": n}, name="top", loader={"who": f"t{n}"}.get
                )
        except BaseException as error:  # surfaced below, in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == {n: f"t{n}:{n}" for n in range(8)}


def test_equal_texts_share_one_compiled_entry_and_a_changed_text_gets_its_own(
    engine: TemplateEngine,
) -> None:
    source = "Hi {{ who }}"
    same_text_other_object = "".join(["Hi ", "{{ who }}"])
    assert engine.render(source, {"who": "a"}, name="t") == "Hi a"
    assert engine.render(same_text_other_object, {"who": "b"}, name="t") == "Hi b"
    assert engine.cache_stats().size == 1
    assert engine.render("Hi {{ who }}!", {"who": "c"}, name="t") == "Hi c!"
    assert engine.cache_stats().size == 2


def test_syntax_error_at_render_is_a_validation_error_with_line(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateValidationError, match=r"^template 't', line 2: "):
        engine.render("ok\n{{ x + }}\n", name="t")
