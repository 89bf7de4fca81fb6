"""The template engine: sandboxed Jinja2, validation, resource limits and a compiled cache.

It knows nothing of the database: it takes template source text and variables and returns
text. Everything above it (the template manager, compat readers, the CLI) goes through
:class:`TemplateEngine` (or the module-level :func:`render` / :func:`validate` on the default
engine).
"""

from prompt_tool.core.cache import CompiledCache, CompiledCacheStats, content_hash
from prompt_tool.core.engine import (
    TemplateEngine,
    TemplateInfo,
    TemplateLoader,
    default_engine,
    render,
    validate,
)
from prompt_tool.core.errors import (
    PermissionDenied,
    TemplateError,
    TemplateLimitError,
    TemplateNotFound,
    TemplateRenderError,
    TemplateValidationError,
    VariableError,
    VariableSpecError,
)
from prompt_tool.core.limits import RenderLimits
from prompt_tool.core.literal import literal_template, literal_text
from prompt_tool.core.sandbox import PromptTemplate
from prompt_tool.core.variables import (
    JSONValue,
    VariableSpec,
    VariableType,
    parse_variable_specs,
    prepare_variables,
    sanitize_variables,
)

__all__ = [
    "CompiledCache",
    "CompiledCacheStats",
    "JSONValue",
    "PermissionDenied",
    "PromptTemplate",
    "RenderLimits",
    "TemplateEngine",
    "TemplateError",
    "TemplateInfo",
    "TemplateLimitError",
    "TemplateLoader",
    "TemplateNotFound",
    "TemplateRenderError",
    "TemplateValidationError",
    "VariableError",
    "VariableSpec",
    "VariableSpecError",
    "VariableType",
    "content_hash",
    "default_engine",
    "literal_template",
    "literal_text",
    "parse_variable_specs",
    "prepare_variables",
    "render",
    "sanitize_variables",
    "validate",
]
