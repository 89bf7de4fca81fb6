"""The template engine: validate a source before it is stored, render it with variables.

The engine knows nothing of the database. Templates that include, import or extend others
name them; the caller (the template manager) passes a *loader*, a callable mapping a name to
the source of the version to use, or ``None`` if there is no such template.

Caching: compiled templates are cached by their source text only. Included templates are
resolved through the loader on every render (once per name per render) and compiled through
the same cache, so a cached template plus the loader always
renders the included text the loader returns now, never a stale copy.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from jinja2 import nodes
from jinja2.exceptions import TemplateSyntaxError

from prompt_tool.core.cache import CompiledCache, CompiledCacheStats, content_hash
from prompt_tool.core.errors import (
    TemplateError,
    TemplateLimitError,
    TemplateNotFound,
    TemplateValidationError,
)
from prompt_tool.core.isolation import IsolatedRenderer
from prompt_tool.core.limits import RenderLimits
from prompt_tool.core.literal import literal_text
from prompt_tool.core.sandbox import (
    PromptEnvironment,
    PromptTemplate,
    find_undeclared_variables,
    render_bounded,
    template_references,
)
from prompt_tool.core.variables import (
    DeclaredVariables,
    VariableSpec,
    parse_variable_specs,
    prepare_variables,
)
from prompt_tool.settings import Settings, get_settings

__all__ = [
    "MAX_DEPENDENCIES",
    "MAX_INCLUDE_DEPTH",
    "TemplateEngine",
    "TemplateInfo",
    "TemplateLoader",
    "default_engine",
    "render",
    "validate",
]

#: Deepest chain of include/import/extends that validation follows (the default of
#: ``PROMPT_TOOL_TEMPLATE_MAX_INCLUDE_DEPTH``).
MAX_INCLUDE_DEPTH: Final = 32
#: Most distinct templates one template may pull in, directly or not (the default of
#: ``PROMPT_TOOL_TEMPLATE_MAX_INCLUDES``).
MAX_DEPENDENCIES: Final = 256


class TemplateLoader(Protocol):
    """Resolves a template name to its source, or ``None`` when no such template exists."""

    def __call__(self, name: str, /) -> str | None: ...


@dataclass(frozen=True, slots=True)
class TemplateInfo:
    """What validation learned about a template; plain data for the manager and the CLI."""

    name: str
    version: int | str | None
    content_hash: str
    size_bytes: int
    #: The declarations the template was checked against, or ``None`` if it declares none.
    declared_variables: tuple[VariableSpec, ...] | None
    #: Variables the template reads without setting them (what callers must or may pass).
    undeclared_variables: frozenset[str]
    #: Templates named directly by include/import/extends, in order of appearance.
    referenced_templates: tuple[str, ...]
    #: Every template pulled in, directly or through others, in discovery order.
    dependencies: tuple[str, ...]


class TemplateEngine:
    """Sandboxed environment + limits + compiled cache; the one way templates are used."""

    def __init__(
        self,
        *,
        settings: Settings | None = None,
        limits: RenderLimits | None = None,
        cache_size: int = 2048,
        max_source_bytes: int | None = None,
    ) -> None:
        settings = settings if settings is not None else get_settings()
        self.limits = limits if limits is not None else RenderLimits.from_settings(settings)
        self.max_source_bytes = (
            max_source_bytes if max_source_bytes is not None else settings.template_max_source_bytes
        )
        self.max_include_depth = settings.template_max_include_depth
        self.max_dependencies = settings.template_max_dependencies
        #: The worker pool when PROMPT_TOOL_RENDER_ISOLATION=process (started on first render),
        #: else ``None``: the default path renders in this process and pays one check for it.
        self.isolation: IsolatedRenderer | None = None
        if settings.render_isolation == "process":
            self.isolation = IsolatedRenderer(
                workers=settings.render_isolation_workers,
                memory_bytes=settings.render_isolation_memory_bytes,
                engine_settings={
                    "template_max_source_bytes": self.max_source_bytes,
                    "template_max_stored_source_bytes": settings.template_max_stored_source_bytes,
                    "template_max_include_depth": self.max_include_depth,
                    "template_max_dependencies": self.max_dependencies,
                },
            )
        self.cache: CompiledCache[PromptTemplate] = CompiledCache(cache_size)
        self.environment = PromptEnvironment(
            limits=self.limits,
            cache=self.cache,
            max_source_bytes=self.max_source_bytes,
            max_stored_source_bytes=settings.template_max_stored_source_bytes,
        )

    def cache_stats(self) -> CompiledCacheStats:
        return self.cache.stats()

    # -- compile ---------------------------------------------------------------------------

    def compile(
        self,
        source: str,
        *,
        name: str | None = None,
        version: int | str | None = None,
    ) -> PromptTemplate:
        """The compiled template for ``source`` (cached by its text).

        The returned template's ``render`` is sandboxed and bounded too, but cannot resolve
        includes: use :meth:`render` with a loader for that.
        """
        _require_text(source, name, version)
        try:
            return self.environment.compile_cached(source, name=name)
        except TemplateError as exc:
            raise exc.located(template=name, version=version) from exc.__cause__
        except TemplateSyntaxError as exc:
            raise TemplateValidationError(
                exc.message or "syntax error", template=name, version=version, lineno=exc.lineno
            ) from exc
        except Exception as exc:  # e.g. Python refusing the generated code
            raise TemplateValidationError(
                f"the template cannot be compiled: {_why(exc)}",
                template=name,
                version=version,
                hint="simplify the template (fewer nested blocks, shorter numbers)",
            ) from exc

    # -- validate --------------------------------------------------------------------------

    def validate(
        self,
        source: str,
        *,
        name: str,
        version: int | str | None = None,
        declared_variables: DeclaredVariables | None = None,
        loader: TemplateLoader | None = None,
    ) -> TemplateInfo:
        """Check a template before it is stored; raise a :class:`TemplateError` if it is bad.

        Checks: size, syntax (with line), constant names in include/import/extends, that every
        referenced template exists (through ``loader``) and none of them leads back to this
        one, that it compiles, and, when ``declared_variables`` is given, that it reads no
        variable it does not declare.
        """
        _require_text(source, name, version)
        specs = self._specs(declared_variables, name, version)
        try:
            size = self.environment.check_source_size(source)
        except TemplateError as exc:
            raise exc.located(template=name, version=version) from None
        tree = self._parse(source, name, version)
        if source not in self.cache:
            try:
                self.cache.put(source, self.environment.compile_tree(tree, name))
            except Exception as exc:  # e.g. Python refusing the generated code
                raise TemplateValidationError(
                    f"the template cannot be compiled: {_why(exc)}",
                    template=name,
                    version=version,
                    hint="simplify the template (fewer nested blocks, shorter numbers)",
                ) from exc

        undeclared = (
            frozenset(find_undeclared_variables(tree, self.environment))
            - self.environment.globals.keys()
        )
        if specs is not None:
            declared = {spec.name for spec in specs}
            unknown = sorted(undeclared - declared)
            if unknown:
                raise TemplateValidationError(
                    f"variable {unknown[0]!r} is used but not declared"
                    + (f" (also {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else ""),
                    template=name,
                    version=version,
                    lineno=_first_use(tree, unknown[0]),
                    hint="declare it in the template's variables or stop using it",
                )

        references = template_references(tree)
        direct = tuple(dict.fromkeys(ref for ref, _, _ in references))
        dependencies = self._check_references(name, version, references, loader)
        return TemplateInfo(
            name=name,
            version=version,
            content_hash=content_hash(source),
            size_bytes=size,
            declared_variables=specs,
            undeclared_variables=undeclared,
            referenced_templates=direct,
            dependencies=dependencies,
        )

    def _specs(
        self, declared: DeclaredVariables | None, name: str | None, version: int | str | None
    ) -> tuple[VariableSpec, ...] | None:
        if declared is None:
            return None
        try:
            return parse_variable_specs(declared)
        except TemplateError as exc:
            raise exc.located(template=name, version=version) from None

    def _parse(self, source: str, name: str, version: int | str | None) -> nodes.Template:
        try:
            return self.environment.parse(source, name)
        except TemplateSyntaxError as exc:
            raise TemplateValidationError(
                exc.message or "syntax error", template=name, version=version, lineno=exc.lineno
            ) from None
        except Exception as exc:  # deep nesting, over-long numbers, ...
            raise TemplateValidationError(
                f"the template cannot be parsed: {_why(exc)}",
                template=name,
                version=version,
            ) from exc

    def _check_references(
        self,
        name: str,
        version: int | str | None,
        references: list[tuple[str, int, bool]],
        loader: TemplateLoader | None,
    ) -> tuple[str, ...]:
        """Follow include/import/extends depth-first: all must exist, none may cycle back.

        Classic three-colour DFS: a reference to a template still on the path is a cycle; one
        to a template fully explored is not. The template being validated is the root of the
        path under its own name, so ``B`` including ``name`` is caught before it is stored.
        """
        order: list[str] = []
        done: set[str] = set()

        def fail(detail: str, lineno: int, hint: str | None = None) -> TemplateValidationError:
            return TemplateValidationError(
                detail, template=name, version=version, lineno=lineno, hint=hint
            )

        def visit(path: list[str], refs: list[tuple[str, int, bool]], top_line: int | None) -> None:
            for ref, line, optional in refs:
                line_in_top = top_line if top_line is not None else line
                via = f"included template {path[-1]!r} (line {line}) " if len(path) > 1 else ""
                if ref in path:
                    cycle = " -> ".join([*path[path.index(ref) :], ref])
                    raise fail(
                        f"include cycle: {cycle}",
                        line_in_top,
                        hint="break the cycle; a template cannot include itself",
                    )
                if ref in done:
                    continue
                if loader is None:
                    raise TemplateNotFound(
                        f"{via}references {ref!r} but no template loader was given",
                        template=name,
                        version=version,
                        lineno=line_in_top,
                        hint="validate through the template manager so names can be resolved",
                    )
                source = loader(ref)
                if source is None:
                    if optional:
                        continue
                    raise TemplateNotFound(
                        f"{via}references template {ref!r}, which does not exist",
                        template=name,
                        version=version,
                        lineno=line_in_top,
                    )
                if len(path) >= self.max_include_depth:
                    raise fail(
                        f"includes nest deeper than {self.max_include_depth} levels "
                        "(PROMPT_TOOL_TEMPLATE_MAX_INCLUDE_DEPTH)",
                        line_in_top,
                    )
                order.append(ref)
                if len(order) > self.max_dependencies:
                    raise fail(
                        f"the template pulls in more than {self.max_dependencies} other templates "
                        "(PROMPT_TOOL_TEMPLATE_MAX_INCLUDES)",
                        line_in_top,
                    )
                child = self._parse_dependency(source, ref, name, version, line_in_top)
                visit([*path, ref], template_references(child), line_in_top)
                done.add(ref)

        visit([name], references, None)
        return tuple(order)

    def _parse_dependency(
        self, source: str, ref: str, name: str, version: int | str | None, lineno: int
    ) -> nodes.Template:
        try:
            self.environment.check_source_size(source)
            return self.environment.parse(source, ref)
        except TemplateError as exc:
            raise TemplateValidationError(
                f"included template {ref!r}: {exc.detail}",
                template=name,
                version=version,
                lineno=lineno,
                hint=exc.hint,
            ) from None
        except TemplateSyntaxError as exc:
            raise TemplateValidationError(
                f"included template {ref!r} has an error at line {exc.lineno}: {exc.message}",
                template=name,
                version=version,
                lineno=lineno,
                hint=f"fix {ref!r} first",
            ) from None
        except Exception as exc:  # deep nesting, over-long numbers, ...
            raise TemplateValidationError(
                f"included template {ref!r} cannot be parsed: {_why(exc)}",
                template=name,
                version=version,
                lineno=lineno,
                hint=f"fix {ref!r} first",
            ) from exc

    # -- render ----------------------------------------------------------------------------

    def render(
        self,
        source: str,
        variables: Mapping[str, object] | None = None,
        *,
        name: str,
        version: int | str | None = None,
        declared_variables: DeclaredVariables | None = None,
        loader: TemplateLoader | None = None,
        limits: RenderLimits | None = None,
    ) -> str:
        """Render ``source`` with ``variables`` (JSON values only) and return the text.

        With ``declared_variables`` the variables are checked against them (unknown, missing,
        wrong type) and defaults are filled in. ``limits`` overrides the engine's limits for
        this render.
        """
        specs = self._specs(declared_variables, name, version)
        try:
            values = prepare_variables(variables, specs)
        except TemplateError as exc:
            raise exc.located(template=name, version=version) from None
        effective = limits if limits is not None else self.limits
        if self.isolation is not None:
            return self.isolation.render(
                source, values, name=name, version=version, limits=effective, loader=loader
            )
        template = self.cache.find(source)
        if template is None:
            # Not compiled yet. No tag, expression or comment opens anywhere: Jinja would hand
            # the text back unchanged (no line statements, newlines kept). Or the source is what
            # literal_template made of a text (an imported legacy text with braces): it renders
            # to that text whatever the variables. Either way, don't compile: imported texts may
            # be megabytes of `{{` (16 MB may be stored), and verify and the read shim render
            # every one. A literal source is never compiled, so it always comes this way.
            text = source if _MARKUP.search(source) is None else literal_text(source)
            if text is not None:
                return _literal_output(text, effective, name, version)
            template = self.compile(source, name=name, version=version)
        return render_bounded(template, values, effective, loader, name=name, version=version)


def _literal_output(text: str, limits: RenderLimits, name: str, version: int | str | None) -> str:
    # At most 3 UTF-8 bytes a character (4 for astral ones, which count 1 in len()).
    fits = len(text) * 4 <= limits.max_output_bytes
    if not fits and len(text.encode("utf-8", "surrogatepass")) > limits.max_output_bytes:
        raise TemplateLimitError(
            f"the output is over the limit of {limits.max_output_bytes} bytes",
            template=name,
            version=version,
        )
    return text


_MARKUP = re.compile(r"\{[{%#]")


def _require_text(source: object, name: str | None, version: int | str | None) -> None:
    if type(source) is not str:
        raise TemplateValidationError(
            f"the template source must be text, got {type(source).__name__}",
            template=name,
            version=version,
            hint="pass the template source as a str",
        )


def _why(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "it nests too deeply (brackets, filters or attribute chains)"
    return f"{type(exc).__name__}: {exc}"


def _first_use(tree: nodes.Template, variable: str) -> int | None:
    for node in tree.find_all(nodes.Name):
        if node.name == variable and node.ctx == "load":
            return node.lineno
    return None


_default_engine: TemplateEngine | None = None
_default_lock = threading.Lock()


def default_engine() -> TemplateEngine:
    """The process-wide engine, built from :func:`~prompt_tool.settings.get_settings` once."""
    global _default_engine  # noqa: PLW0603 - a lazily built process singleton
    if _default_engine is None:
        with _default_lock:
            if _default_engine is None:
                _default_engine = TemplateEngine()
    return _default_engine


def validate(
    source: str,
    *,
    name: str,
    version: int | str | None = None,
    declared_variables: DeclaredVariables | None = None,
    loader: TemplateLoader | None = None,
) -> TemplateInfo:
    """:meth:`TemplateEngine.validate` on the default engine."""
    return default_engine().validate(
        source, name=name, version=version, declared_variables=declared_variables, loader=loader
    )


def render(
    source: str,
    variables: Mapping[str, object] | None = None,
    *,
    name: str,
    version: int | str | None = None,
    declared_variables: DeclaredVariables | None = None,
    loader: TemplateLoader | None = None,
    limits: RenderLimits | None = None,
) -> str:
    """:meth:`TemplateEngine.render` on the default engine."""
    return default_engine().render(
        source,
        variables,
        name=name,
        version=version,
        declared_variables=declared_variables,
        loader=loader,
        limits=limits,
    )
