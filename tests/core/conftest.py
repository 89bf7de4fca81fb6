"""Fixtures for the template engine's unit tests: engines with default and tight limits.

No database, no environment variables: settings are the defaults, built explicitly.
"""

from __future__ import annotations

import pytest

from prompt_tool.core import RenderLimits, TemplateEngine
from prompt_tool.settings import Settings


@pytest.fixture
def engine() -> TemplateEngine:
    return TemplateEngine(settings=Settings())


@pytest.fixture
def quick_engine() -> TemplateEngine:
    """Same limits, shorter deadline: for templates that can only be stopped by the clock."""
    return TemplateEngine(settings=Settings(), limits=RenderLimits(timeout_s=0.3))
