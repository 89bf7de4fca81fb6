"""The template engine's errors: one subtree of :class:`~prompt_tool.errors.PromptToolError`.

Every error carries where it happened (template name, version, line) as attributes and renders
as a single line ``template 'greeting' version 3, line 4: <what went wrong>; <what to do>`` so
the CLI can print ``str(error)`` as is.
"""

from __future__ import annotations

from typing import Self

from prompt_tool.errors import NotFoundError, PromptToolError

__all__ = [
    "PermissionDenied",
    "TemplateError",
    "TemplateLimitError",
    "TemplateNotFound",
    "TemplateRenderError",
    "TemplateValidationError",
    "VariableError",
    "VariableSpecError",
]


def _one_line(text: str) -> str:
    # Jinja and Python messages sometimes span lines (and end in a full stop before our "; what
    # to do"); the CLI contract is one line per error.
    text = " ".join(text.split())
    return text[:-1] if text.endswith(".") and not text.endswith("..") else text


class TemplateError(PromptToolError):
    """Root of every template error: validation, rendering, lookup and permission."""

    exit_code = 1
    default_hint = "fix the template and try again"

    def __init__(
        self,
        detail: str,
        *,
        template: str | None = None,
        version: int | str | None = None,
        lineno: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.detail = _one_line(detail)
        self.template = template
        self.version = version
        self.lineno = lineno
        self.hint = _one_line(hint) if hint is not None else self.default_hint
        super().__init__(self._message())

    def _message(self) -> str:
        where: list[str] = []
        if self.template is not None:
            where.append(f"template {self.template!r}")
        if self.version is not None:
            where.append(f"version {self.version}")
        location = " ".join(where)
        if self.lineno is not None:
            location = f"{location}, line {self.lineno}" if location else f"line {self.lineno}"
        text = f"{location}: {self.detail}" if location else self.detail
        return f"{text}; {self.hint}" if self.hint else text

    def located(
        self,
        *,
        template: str | None = None,
        version: int | str | None = None,
        lineno: int | None = None,
    ) -> Self:
        """A copy with the location filled in where this error did not know it.

        Limit checks deep inside the sandbox know what was exceeded but not which template or
        line was running; the engine adds that on the way out.
        """
        clone = type(self)(
            self.detail,
            template=self.template if self.template is not None else template,
            version=self.version if self.version is not None else version,
            lineno=self.lineno if self.lineno is not None else lineno,
            hint=self.hint,
        )
        clone.__cause__ = self.__cause__
        return clone


class TemplateValidationError(TemplateError):
    """The template cannot be stored: syntax error, too large, bad include, undeclared variable."""

    default_hint = "fix the template source and save it again"


class TemplateRenderError(TemplateError):
    """The template failed while rendering (undefined value, unsafe operation, bad operand)."""

    default_hint = "fix the template or the variables passed to it"


class TemplateLimitError(TemplateRenderError):
    """Rendering exceeded a resource limit (time, output size, string/list/number size, depth)."""

    default_hint = "make the template do less work or raise the limit in RenderLimits"


class VariableError(TemplateRenderError):
    """The variables passed to a render are missing, unknown, of the wrong type or not JSON."""

    exit_code = 2
    default_hint = "pass JSON values that match the template's declared variables"


class VariableSpecError(TemplateValidationError):
    """A variable declaration is malformed (bad name, unknown type, default of the wrong type)."""

    exit_code = 2
    default_hint = "fix the variable declarations and try again"


class TemplateNotFound(TemplateError, NotFoundError):  # noqa: N818 - the name known from Jinja
    """A template (or a template it includes, imports or extends) does not exist.

    A template error (one line naming where, exit code 2) and, like every "does not exist" of
    the package, a :class:`~prompt_tool.errors.NotFoundError`.
    """

    exit_code = 2
    default_hint = "create the template first or fix its name"


class PermissionDenied(TemplateError):  # noqa: N818 - reads as the outcome it reports
    """The caller may not read or change this template (raised by the template manager)."""

    exit_code = 2
    default_hint = "ask an owner of the template's scope for access"
