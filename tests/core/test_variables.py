"""Only JSON values reach a template; declared variables are enforced at render."""

from __future__ import annotations

import datetime
import re
from collections import OrderedDict
from decimal import Decimal

import pytest

from prompt_tool.core import (
    TemplateEngine,
    VariableError,
    VariableSpec,
    VariableSpecError,
    parse_variable_specs,
    prepare_variables,
    sanitize_variables,
)


def test_json_values_pass_untouched() -> None:
    values = {
        "s": "x",
        "i": 1,
        "f": 1.5,
        "b": True,
        "n": None,
        "l": [1, ["a", {"k": None}]],
        "t": (1, 2),
        "d": {"nested": {"deeper": [True]}},
    }
    cleaned = sanitize_variables(values)
    assert cleaned == values
    assert cleaned is not values  # a fresh top level: defaults can be added safely
    assert cleaned["l"] is values["l"]


@pytest.mark.parametrize(
    ("variables", "path", "kind"),
    [
        ({"when": datetime.date(2024, 1, 1)}, "when", "date"),
        ({"user": {"tags": ["a", Decimal(1)]}}, "user.tags[1]", "Decimal"),
        ({"user": {"odd key": {"x": object()}}}, "user['odd key'].x", "object"),
        ({"fn": print}, "fn", "builtin_function_or_method"),
        ({"s": {1, 2}}, "s", "set"),
        ({"b": b"bytes"}, "b", "bytes"),
        ({"o": OrderedDict(a=1)}, "o", "OrderedDict"),
    ],
)
def test_non_json_values_are_refused_naming_variable_and_path(
    variables: dict[str, object], path: str, kind: str
) -> None:
    with pytest.raises(VariableError, match=re.escape(f"variable {path} is a '{kind}'")):
        sanitize_variables(variables)


def test_dict_keys_must_be_strings() -> None:
    with pytest.raises(VariableError, match=r"variable user has a key of type 'int'"):
        sanitize_variables({"user": {1: "a"}})


def test_self_referencing_values_are_refused() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(VariableError, match="nested deeper than 100 levels"):
        sanitize_variables({"loop": loop})


def test_variable_names_must_be_strings() -> None:
    with pytest.raises(VariableError, match="names must be strings"):
        sanitize_variables({1: "x"})  # type: ignore[dict-item]


def test_render_refuses_non_json_with_exit_code_2(engine: TemplateEngine) -> None:
    with pytest.raises(VariableError) as caught:
        engine.render("{{ x }}", {"x": object()}, name="t", version=3)
    assert caught.value.exit_code == 2
    assert str(caught.value).startswith("template 't' version 3: variable x is a 'object'")


SPECS = (
    VariableSpec("name", "string"),
    VariableSpec("count", "integer", required=False, default=3),
    VariableSpec("ratio", "number", required=False),
    VariableSpec("tags", "list", required=False, default=["a"]),
    VariableSpec("meta", "object", required=False),
    VariableSpec("flag", "boolean", required=False, default=False),
    VariableSpec("anything", "any", required=False),
)


def test_defaults_are_applied_for_missing_optional_variables() -> None:
    values = prepare_variables({"name": "n"}, SPECS)
    assert values == {"name": "n", "count": 3, "tags": ["a"], "flag": False}


def test_none_is_accepted_for_optional_variables() -> None:
    assert prepare_variables({"name": "n", "ratio": None}, SPECS)["ratio"] is None


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({}, "missing required variable 'name'"),
        ({"name": "n", "extra": 1, "more": 2}, "unknown variables 'extra', 'more'"),
        ({"name": 5}, "variable 'name' must be a string, got a integer"),
        ({"name": "n", "count": True}, "variable 'count' must be a integer, got a boolean"),
        ({"name": "n", "count": 1.0}, "variable 'count' must be a integer, got a number"),
        ({"name": "n", "ratio": "1"}, "variable 'ratio' must be a number, got a string"),
        ({"name": "n", "tags": "a"}, "variable 'tags' must be a list, got a string"),
        ({"name": "n", "meta": []}, "variable 'meta' must be a object, got a list"),
        ({"name": "n", "flag": 0}, "variable 'flag' must be a boolean, got a integer"),
        ({"name": None}, "variable 'name' must be a string, got a null"),
    ],
)
def test_declared_variables_are_enforced(variables: dict[str, object], message: str) -> None:
    with pytest.raises(VariableError, match=message):
        prepare_variables(variables, SPECS)


def test_numbers_accept_ints_and_floats_but_not_booleans() -> None:
    spec = (VariableSpec("x", "number"),)
    assert prepare_variables({"x": 1}, spec) == {"x": 1}
    assert prepare_variables({"x": 1.5}, spec) == {"x": 1.5}
    with pytest.raises(VariableError):
        prepare_variables({"x": False}, spec)


def test_render_applies_declarations(engine: TemplateEngine) -> None:
    declared: list[dict[str, object]] = [
        {"name": "who", "type": "string"},
        {"name": "times", "type": "integer", "required": False, "default": 2},
    ]
    source = "{{ (who ~ ' ') * times }}"
    assert engine.render(source, {"who": "hi"}, name="t", declared_variables=declared) == "hi hi "
    with pytest.raises(VariableError, match="missing required variable 'who'"):
        engine.render(source, {}, name="t", declared_variables=declared)


def test_optional_variable_without_default_is_undefined_in_the_template(
    engine: TemplateEngine,
) -> None:
    declared = [VariableSpec("x", required=False)]
    source = "{% if x is defined %}{{ x }}{% else %}none{% endif %}"
    assert engine.render(source, {}, name="t", declared_variables=declared) == "none"


def test_spec_round_trips_through_json_form() -> None:
    for spec in SPECS:
        assert VariableSpec.from_dict(spec.to_dict()) == spec
    assert VariableSpec.from_dict({"name": "x"}) == VariableSpec("x", "any", required=True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "1x"}, "not a valid identifier"),
        ({"name": "has space"}, "not a valid identifier"),
        ({"name": "for"}, "reserved"),
        ({"name": "loop"}, "reserved"),
        ({"name": "x", "type": "date"}, "unknown type 'date'"),
        ({"name": "x", "required": "yes"}, "'required' must be true or false"),
        ({"name": "x", "default": 1}, "required and also has a default"),
        ({"name": "x", "type": "string", "required": False, "default": 1}, "not a string"),
        ({"name": "x", "required": False, "default": {"a": {1, 2}}}, "x.a is a 'set'"),
        ({"name": "x", "colour": "red"}, "unknown keys colour"),
        ({"type": "string"}, "no 'name'"),
    ],
)
def test_bad_specs_are_refused_with_a_reason(data: dict[str, object], message: str) -> None:
    with pytest.raises(VariableSpecError, match=message):
        VariableSpec.from_dict(data)


def test_parse_variable_specs_accepts_lists_mappings_and_specs() -> None:
    assert parse_variable_specs(None) == ()
    assert parse_variable_specs([{"name": "a"}]) == (VariableSpec("a"),)
    assert parse_variable_specs({"a": {"type": "string"}}) == (VariableSpec("a", "string"),)
    specs = (VariableSpec("a"),)
    assert parse_variable_specs(specs) is specs


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([{"name": "a"}, {"name": "a"}], "declared twice"),
        ({"a": {"name": "b"}}, "names itself 'b'"),
        ({"a": "string"}, "must be an object"),
        ("a,b", "must be a list or an object"),
        ([["name", "a"]], "must be an object"),
    ],
)
def test_parse_variable_specs_refuses_malformed_input(data: object, message: str) -> None:
    with pytest.raises(VariableSpecError, match=message):
        parse_variable_specs(data)  # type: ignore[arg-type]
