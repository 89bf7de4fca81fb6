"""``literal_template`` turns any text into a template that renders back to exactly that text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prompt_tool.core import TemplateEngine, TemplateLimitError, literal_template, literal_text
from prompt_tool.settings import Settings

ENGINE = TemplateEngine(settings=Settings())

# Tokens chosen to collide with every piece of Jinja syntax: delimiters, whitespace control,
# raw/endraw, quotes, line endings, and multi-byte text.
_TOKENS = st.sampled_from(
    [
        "{", "}", "%", "#", "-", "+", "\r", "\n", "\r\n", " ", "raw", "endraw", "{%", "%}",
        "{{", "}}", "{#", "#}", "{% raw %}", "{% endraw %}", "{%- raw -%}", "'", '"', "\\",
        "x", "é", "中", "😀", "\u2028", "\x00", "\t",
    ]
)  # fmt: skip
_TEXTS = st.lists(_TOKENS, max_size=40).map("".join)


@settings(max_examples=400, deadline=None)
@given(text=_TEXTS)
def test_literal_template_renders_back_byte_for_byte(text: str) -> None:
    source = literal_template(text)
    assert ENGINE.render(source, name="literal").encode("utf-8") == text.encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_literal_template_round_trips_arbitrary_unicode(text: str) -> None:
    assert ENGINE.render(literal_template(text), name="literal") == text


@settings(max_examples=200, deadline=None)
@given(text=_TEXTS.filter(lambda t: "{{" not in t and "{%" not in t and "{#" not in t))
def test_text_without_delimiters_is_returned_unchanged(text: str) -> None:
    assert literal_template(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "{% raw %}{{ x }}{% endraw %}",
        "{% endraw %}",
        "{{{{ deep }}}}",
        "{%- if x -%}\r\n{#- c -#}",
        "{{ ''.__class__ }}",
        "ends with {",
        "{{'{'}}",
    ],
)
def test_jinja_looking_text_is_escaped_and_validates_without_variables(text: str) -> None:
    source = literal_template(text)
    info = ENGINE.validate(source, name="literal")
    assert info.undeclared_variables == frozenset()
    assert info.referenced_templates == ()
    assert ENGINE.render(source, name="literal") == text


def test_escaping_is_compact() -> None:
    # Only braces that open a tag are escaped: in "{{ b" just the first one.
    assert literal_template("a {{ b }} c") == "a {{'{'}}{ b }} c"
    assert literal_template("{%") == "{{'{'}}%"
    assert literal_template("{{{#") == "{{'{{{'}}#"


@settings(max_examples=400, deadline=None)
@given(text=_TEXTS)
def test_literal_text_gives_back_the_text_a_literal_template_was_made_of(text: str) -> None:
    assert literal_text(literal_template(text)) == text


@pytest.mark.parametrize(
    "source", ["{{ user }}", "{% if x %}y{% endif %}", "{{'{'}}", "{{'{{'}}x", "{# c #}"]
)
def test_a_source_literal_template_cannot_have_made_has_no_literal_text(source: str) -> None:
    assert literal_text(source) is None


def test_a_large_imported_text_full_of_braces_renders_back_without_being_compiled() -> None:
    """An imported legacy text of 210 KB full of `{{` (a stored source may be 16 MB): rendered
    by unescaping, never compiled, whatever the variables."""
    text = ("{{ user }} said {% if %} {# not a comment #} {{{ x }}}\r\n" * 4000)[:210_000]
    engine = TemplateEngine(settings=Settings())
    before = engine.cache_stats()
    assert engine.render(literal_template(text), {"user": "ignored"}, name="imported") == text
    after = engine.cache_stats()
    assert (after.hits, after.misses, after.size) == (before.hits, before.misses, before.size)


def test_a_literal_text_over_the_output_limit_is_refused_in_bytes() -> None:
    text = "é{{" * 300_000  # 900,000 characters, 1,500,000 bytes in UTF-8
    engine = TemplateEngine(settings=Settings())
    with pytest.raises(TemplateLimitError, match="over the limit of 1048576 bytes"):
        engine.render(literal_template(text), {}, name="imported")
