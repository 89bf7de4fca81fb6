"""Every render limit is a setting: read from the environment, applied, documented in
docs/LIMITS.md, and a bad value is one line."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from prompt_tool.core import RenderLimits, TemplateEngine, TemplateLimitError
from prompt_tool.core.errors import TemplateValidationError
from prompt_tool.errors import ConfigurationError
from prompt_tool.settings import RENDER_LIMIT_FIELDS, Settings

LIMITS_DOC = Path(__file__).resolve().parents[2] / "docs" / "LIMITS.md"
SETTINGS_SOURCE = Path(__file__).resolve().parents[2] / "prompt_tool" / "settings.py"


def test_every_integer_render_limit_is_a_setting() -> None:
    integer_fields = {
        f.name for f in dataclasses.fields(RenderLimits) if f.type in ("int", int)
    } - {"max_output_bytes"}  # PROMPT_TOOL_TEMPLATE_MAX_OUTPUT_BYTES, its own setting
    assert set(RENDER_LIMIT_FIELDS) == integer_fields


def test_a_render_limit_from_the_environment_is_applied() -> None:
    settings = Settings.from_env({"PROMPT_TOOL_TEMPLATE_MAX_RANGE": "5"})
    assert RenderLimits.from_settings(settings).max_range == 5
    engine = TemplateEngine(settings=settings)
    assert engine.render("{{ range(5)|list|length }}", name="t") == "5"
    with pytest.raises(TemplateLimitError):
        engine.render("{{ range(6)|list|length }}", name="t")


@pytest.mark.parametrize("value", ["many", "0", "-3"])
def test_a_bad_render_limit_is_one_line_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({"PROMPT_TOOL_TEMPLATE_MAX_INT_BITS": value})
    assert "PROMPT_TOOL_TEMPLATE_MAX_INT_BITS" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_include_depth_is_a_setting() -> None:
    chain = {"a": "{% include 'b' %}", "b": "{% include 'c' %}", "c": "end"}
    shallow = TemplateEngine(
        settings=Settings.from_env({"PROMPT_TOOL_TEMPLATE_MAX_INCLUDE_DEPTH": "2"})
    )
    with pytest.raises(TemplateValidationError, match="PROMPT_TOOL_TEMPLATE_MAX_INCLUDE_DEPTH"):
        shallow.validate("{% include 'a' %}", name="top", loader=chain.get)
    TemplateEngine(settings=Settings()).validate("{% include 'a' %}", name="top", loader=chain.get)


def test_every_limit_setting_in_the_docs_is_read_from_the_environment() -> None:
    documented = set(re.findall(r"`(PROMPT_TOOL_[A-Z0-9_]+)`", LIMITS_DOC.read_text()))
    source = SETTINGS_SOURCE.read_text()
    read = set(re.findall(r'"(PROMPT_TOOL_[A-Z0-9_]+)"', source)) | {
        f"PROMPT_TOOL_TEMPLATE_{name.upper()}" for name in RENDER_LIMIT_FIELDS
    }
    assert documented and documented <= read, documented - read
    assert {f"PROMPT_TOOL_TEMPLATE_{name.upper()}" for name in RENDER_LIMIT_FIELDS} <= documented
