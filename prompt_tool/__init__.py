"""prompt-tool: LLM prompts in a database, moving from legacy text to orchestration templates.

The public entry points live in the subpackages, each named for what it owns: ``db`` (models,
engine, schema history), ``core`` (the template engine), ``templates`` (the manager),
``flags``, ``compat``, ``migrate``, ``orchestration``, ``ab_testing``; ``cli`` wraps them.
"""

from importlib.metadata import PackageNotFoundError, version

from prompt_tool.errors import PromptToolError

try:
    __version__ = version("prompt-tool")
except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0.0.0+unknown"

__all__ = ["PromptToolError", "__version__"]
