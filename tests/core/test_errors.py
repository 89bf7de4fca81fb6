"""One error tree under PromptToolError; one-line messages that name where and say what to do."""

from __future__ import annotations

import pytest

import prompt_tool.core as core
from prompt_tool.core import (
    PermissionDenied,
    TemplateError,
    TemplateLimitError,
    TemplateNotFound,
    TemplateRenderError,
    TemplateValidationError,
    VariableError,
    VariableSpecError,
)
from prompt_tool.errors import NotFoundError, PromptToolError


@pytest.mark.parametrize(
    ("error_class", "parent", "exit_code"),
    [
        (TemplateError, PromptToolError, 1),
        (TemplateValidationError, TemplateError, 1),
        (TemplateRenderError, TemplateError, 1),
        (TemplateLimitError, TemplateRenderError, 1),
        (VariableError, TemplateRenderError, 2),
        (VariableSpecError, TemplateValidationError, 2),
        (TemplateNotFound, TemplateError, 2),
        (TemplateNotFound, NotFoundError, 2),
        (PermissionDenied, TemplateError, 2),
    ],
)
def test_error_tree_and_exit_codes(
    error_class: type[TemplateError], parent: type[Exception], exit_code: int
) -> None:
    assert issubclass(error_class, parent)
    assert error_class("x").exit_code == exit_code


def test_message_names_template_version_and_line_then_what_to_do() -> None:
    error = TemplateRenderError(
        "it broke.\nbadly", template="greeting", version=3, lineno=7, hint="fix it"
    )
    assert str(error) == "template 'greeting' version 3, line 7: it broke. badly; fix it"


def test_message_without_location_is_just_what_and_what_to_do() -> None:
    assert str(TemplateLimitError("too big")).startswith("too big; ")


def test_located_fills_in_only_what_is_missing() -> None:
    error = TemplateLimitError("too big", lineno=2)
    located = error.located(template="t", version=1, lineno=9)
    assert (located.template, located.version, located.lineno) == ("t", 1, 2)
    assert type(located) is TemplateLimitError
    assert located.hint == error.hint


def test_public_api_is_declared() -> None:
    for name in core.__all__:
        assert hasattr(core, name), name
    assert {"TemplateEngine", "render", "validate", "literal_template", "RenderLimits"} <= set(
        core.__all__
    )
