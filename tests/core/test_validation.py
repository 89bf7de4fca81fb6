"""Validation before storage: size, syntax with line, references, cycles, declared variables."""

from __future__ import annotations

import pytest

from prompt_tool.core import (
    TemplateEngine,
    TemplateInfo,
    TemplateNotFound,
    TemplateValidationError,
    VariableSpec,
    VariableSpecError,
    content_hash,
)
from prompt_tool.settings import Settings


def test_valid_template_reports_what_it_uses(engine: TemplateEngine) -> None:
    source = (
        "{% import 'macros' as m %}{% set local = 1 %}{% include 'footer' %}"
        "{% for item in items %}{{ loop.index }} {{ item }} {{ m.f(user.name) }}{% endfor %}"
        "{{ range(3)|list }}{{ local }}"
    )
    store = {"macros": "{% macro f(x) %}{{ x }}{% endmacro %}", "footer": "-- {{ sig }}"}
    info = engine.validate(source, name="page", version=2, loader=store.get)
    assert isinstance(info, TemplateInfo)
    assert info.name == "page"
    assert info.version == 2
    assert info.content_hash == content_hash(source)
    assert info.size_bytes == len(source.encode())
    assert info.undeclared_variables == {"items", "user"}
    assert info.referenced_templates == ("macros", "footer")
    assert info.dependencies == ("macros", "footer")
    assert info.declared_variables is None


def test_syntax_error_names_template_version_and_line(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateValidationError) as caught:
        engine.validate("fine\nfine\nfine\n{{ x + }}\nfine", name="greeting", version=4)
    error = caught.value
    assert error.template == "greeting"
    assert error.version == 4
    assert error.lineno == 4
    assert str(error).startswith("template 'greeting' version 4, line 4: ")
    assert "\n" not in str(error)
    assert error.exit_code == 1


def test_source_size_is_limited_by_settings_and_configurable() -> None:
    small = TemplateEngine(settings=Settings(template_max_source_bytes=10))
    small.validate("0123456789", name="ok")
    with pytest.raises(TemplateValidationError, match="11 bytes, over the limit of 10"):
        small.validate("0123456789A", name="big")
    # UTF-8 bytes, not characters
    with pytest.raises(TemplateValidationError, match="over the limit"):
        small.validate("é" * 6, name="big")
    assert TemplateEngine(settings=Settings(), max_source_bytes=11).validate(
        "0123456789A", name="ok"
    )


def test_default_source_limit_is_64_kib(engine: TemplateEngine) -> None:
    engine.validate("x" * 64 * 1024, name="ok")
    with pytest.raises(TemplateValidationError, match="over the limit of 65536"):
        engine.validate("x" * (64 * 1024 + 1), name="big")


def test_lone_surrogates_are_refused(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateValidationError, match="not valid UTF-8"):
        engine.validate("bad \ud800 text", name="t")


def test_non_text_source_is_refused(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateValidationError, match="must be text"):
        engine.validate(b"bytes", name="t")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "source",
    [
        "{% include name %}",
        "{% include 'a' ~ suffix %}",
        "{% import name as m %}",
        "{% from name import f %}",
        "{% extends name %}",
        "{% include ['a', name] %}",
    ],
)
def test_dynamic_template_names_are_refused(engine: TemplateEngine, source: str) -> None:
    with pytest.raises(TemplateValidationError, match="constant template name"):
        engine.validate(source, name="t", loader={"a": ""}.get)


def test_constant_name_lists_are_allowed(engine: TemplateEngine) -> None:
    info = engine.validate(
        "{% include ['a', 'b'] ignore missing %}", name="t", loader={"a": "A"}.get
    )
    assert info.referenced_templates == ("a", "b")
    assert info.dependencies == ("a",)


def test_missing_reference_is_template_not_found(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateNotFound) as caught:
        engine.validate("x\n{% include 'nope' %}", name="t", loader=lambda name: None)
    assert caught.value.lineno == 2
    assert "'nope', which does not exist" in str(caught.value)
    assert caught.value.exit_code == 2


def test_missing_reference_deep_down_names_the_chain(engine: TemplateEngine) -> None:
    store = {"a": "{% include 'b' %}", "b": "\n\n{% import 'c' as c %}"}
    with pytest.raises(TemplateNotFound, match=r"included template 'b' \(line 3\) .*'c'"):
        engine.validate("{% include 'a' %}", name="t", loader=store.get)


def test_references_need_a_loader(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateNotFound, match="no template loader"):
        engine.validate("{% include 'a' %}", name="t")


@pytest.mark.parametrize(
    ("store", "cycle"),
    [
        ({"b": "{% include 'a' %}"}, "a -> b -> a"),
        ({"b": "{% include 'c' %}", "c": "{% extends 'a' %}"}, "a -> b -> c -> a"),
        ({"b": "{% include 'c' %}", "c": "{% include 'b' %}"}, "b -> c -> b"),
    ],
)
def test_include_cycles_are_detected(
    engine: TemplateEngine, store: dict[str, str], cycle: str
) -> None:
    with pytest.raises(TemplateValidationError, match=f"include cycle: {cycle}"):
        engine.validate("\n{% include 'b' %}", name="a", loader=store.get)


def test_a_template_cannot_include_itself(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateValidationError, match="include cycle: a -> a"):
        engine.validate("{% include 'a' %}", name="a", loader={"a": "old version"}.get)


def test_shared_dependencies_are_not_cycles(engine: TemplateEngine) -> None:
    store = {"b": "{% include 'd' %}", "c": "{% include 'd' %}", "d": "D"}
    info = engine.validate("{% include 'b' %}{% include 'c' %}", name="a", loader=store.get)
    assert info.dependencies == ("b", "d", "c")


def test_syntax_error_in_dependency_names_it(engine: TemplateEngine) -> None:
    store = {"b": "ok\n{% if %}"}
    with pytest.raises(
        TemplateValidationError, match="included template 'b' has an error at line 2"
    ):
        engine.validate("{% include 'b' %}", name="a", loader=store.get)


def test_used_but_undeclared_variable_is_an_error_naming_it(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateValidationError) as caught:
        engine.validate(
            "Hi {{ name }}\n{{ topic }} {{ zeta }}",
            name="t",
            declared_variables=[{"name": "name", "type": "string"}],
        )
    assert caught.value.lineno == 2
    assert "variable 'topic' is used but not declared (also 'zeta')" in str(caught.value)


def test_declared_variables_are_accepted_in_every_form(engine: TemplateEngine) -> None:
    source = "{{ a }}{{ b }}"
    forms: list[object] = [
        [{"name": "a"}, {"name": "b", "type": "integer", "required": False, "default": 1}],
        {"a": {}, "b": {"type": "integer"}},
        (VariableSpec("a"), VariableSpec("b", "integer")),
        [VariableSpec("a"), {"name": "b"}],
    ]
    for form in forms:
        info = engine.validate(source, name="t", declared_variables=form)  # type: ignore[arg-type]
        assert info.declared_variables is not None
        assert [spec.name for spec in info.declared_variables] == ["a", "b"]


def test_bad_declarations_are_bad_input(engine: TemplateEngine) -> None:
    with pytest.raises(VariableSpecError) as caught:
        engine.validate("x", name="t", version=1, declared_variables=[{"name": "1bad"}])
    assert caught.value.exit_code == 2
    assert str(caught.value).startswith("template 't' version 1: variable name '1bad'")


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("{% autoescape true %}x{% endautoescape %}", "autoescape"),
        ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "nests too deeply"),
        ("{{ x" + "|upper" * 9000 + " }}", "nests too deeply"),
        ("{{ " + "9" * 5000 + " }}", "cannot be parsed|digits"),
        ("{% for a in x %}" * 25 + "{% endfor %}" * 25, "cannot be compiled|nested"),
    ],
)
def test_unusable_sources_are_validation_errors_not_crashes(
    engine: TemplateEngine, source: str, problem: str
) -> None:
    with pytest.raises(TemplateValidationError, match=problem):
        engine.validate(source, name="t")


def test_validation_warms_the_compiled_cache(engine: TemplateEngine) -> None:
    source = "Hello {{ who }}"
    engine.validate(source, name="t")
    before = engine.cache_stats()
    assert engine.render(source, {"who": "x"}, name="t") == "Hello x"
    after = engine.cache_stats()
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 0)


def test_module_level_validate_and_render_use_the_default_engine() -> None:
    from prompt_tool.core import default_engine, render, validate

    assert validate("{{ a }}", name="t").undeclared_variables == {"a"}
    assert render("{{ a }}", {"a": 1}, name="t") == "1"
    assert default_engine() is default_engine()
