"""The sandboxed Jinja2 environment every template is compiled and rendered in.

Layers of defence, from the outside in:

* **Nothing is evaluated at compile time.** Jinja folds constant expressions while compiling
  (``{{ 'a' * 10**10 }}`` would run inside ``parse``/``compile``). The optimizer is off
  (``optimized=False``); every arithmetic operator is listed in ``intercepted_binops``, which
  makes ``BinExpr.as_const`` give up; and the code generator refuses to fold ``{{ ... }}``
  output (``_output_child_to_const``), the one place that folds even without the optimizer.
  Hostile sources therefore cost only their parse time, which the source-size limit bounds.
* **Only plain data is reachable.** Attributes are allow-listed per type (``str``, ``list``,
  ``dict``, ...); methods are handed out as proxies whose ``repr`` says nothing; only known
  callables may be called; ``dict``, ``cycler``, ``joiner``, ``lipsum`` and ``namespace`` are
  gone; ``str.format`` and ``%`` go through a sandboxed, width-checked formatter.
* **Every operation that can grow data is bounded** (``*``, ``**``, ``+``, ``~``, ``%``,
  ``range``, padding/joining/replacing filters and methods), and a per-render budget watches
  the clock, the call depth, the output size and the text buffered inside macros and blocks.
* **No single operation outruns the budget.** A call into C cannot be interrupted, so each one
  whose cost grows with its operands is checked before it runs: ``//`` and ``%`` of two big
  integers, ``int`` of a long digit string (any base), ``round`` to a huge precision; the
  reverse searches (``rfind``, ``rindex``, ``rsplit``, ``rpartition``) and ``strip(chars)``,
  quadratic in CPython on crafted input, switch to a linear method past a fixed amount of work;
  case mappings that grow text (``'ﬃ'.upper()``) are held to the string limit.
* **Errors name no internals.** Undefined values, unsafe attributes and Python's own messages
  describe the template's values (``method 'upper'``, ``loop``), never a module, class or
  address; strict undefined also applies inside list, tuple and dict literals.
* **Text is reproduced byte for byte.** The lexer keeps ``\\r\\n`` and ``\\r`` line endings
  where Jinja would normalise them, and ``keep_trailing_newline`` is on.
"""

from __future__ import annotations

import functools
import re
import textwrap
import time
import types
from collections.abc import (
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from typing import Any, Final, cast

from jinja2 import StrictUndefined, meta, nodes, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.environment import Template, TemplateModule
from jinja2.exceptions import (
    SecurityError,
    TemplateRuntimeError,
    TemplateSyntaxError,
    UndefinedError,
)
from jinja2.exceptions import TemplateNotFound as JinjaTemplateNotFound
from jinja2.filters import (
    FILTERS,
    do_batch,
    do_center,
    do_format,
    do_indent,
    do_int,
    do_round,
    do_sum,
    do_tojson,
    do_trim,
    make_attrgetter,
    sync_do_slice,
)
from jinja2.lexer import TOKEN_DATA, TOKEN_STRING, Lexer, newline_re
from jinja2.loaders import BaseLoader
from jinja2.nodes import EvalContext
from jinja2.runtime import (
    BlockReference,
    Context,
    LoopContext,
    Macro,
    TemplateReference,
    Undefined,
)
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import missing

from prompt_tool.core.cache import CompiledCache
from prompt_tool.core.errors import (
    TemplateError,
    TemplateLimitError,
    TemplateNotFound,
    TemplateRenderError,
    TemplateValidationError,
)
from prompt_tool.core.limits import (
    CURRENT_BUDGET,
    LOOP_CHECK_EVERY,
    Budget,
    RenderLimits,
    account_text,
    charge,
    charge_value,
    check_format_spec,
    check_int_bits,
    check_int_text,
    check_percent_format,
    check_sequence_length,
    check_string_length,
    check_value_size,
    limit_error,
    value_cost,
    value_size,
)
from prompt_tool.core.variables import sanitize_variables

__all__ = [
    "LOOP_GUARD_FILTER",
    "PromptEnvironment",
    "PromptTemplate",
    "find_undeclared_variables",
    "render_bounded",
]

# Output chunks between two readings of the deadline by render_bounded, and characters.
_BATCH: Final = 16
_CHARS_PER_CHECK: Final = 1 << 16
_SHORT_LOOP_TYPES: Final = frozenset({list, tuple})

#: Filter wrapped around every ``{% for %}`` iterable so loops watch the clock.
LOOP_GUARD_FILTER: Final = "_loop_guard"

#: Filters removed and why:
#: * ``random``: rendering must be deterministic (verification compares rendered bytes).
#: * ``safe``, ``escape``/``e``, ``forceescape``, ``urlize``, ``xmlattr``: HTML helpers that
#:   produce ``Markup``; prompts are plain text (autoescape is off) and ``Markup`` changes how
#:   ``%``, ``format`` and ``join`` behave, which would need a second set of bounds.
#:   ``urlize`` also has a history of catastrophic regex backtracking.
REMOVED_FILTERS: Final = frozenset(
    {"random", "safe", "escape", "e", "forceescape", "urlize", "xmlattr"}
)

#: Filters that return a number, a lazy iterator or one of the values passed in: they build
#: nothing, so they skip the post-check (and the allocation meter) entirely.
_NON_GROWING_FILTERS: Final = frozenset(
    {"abs", "attr", "count", "d", "default", "filesizeformat", "first", "float", "int", "items",
     "last", "length", "map", "max", "min", "reject", "rejectattr", "round", "select",
     "selectattr", "unique", "wordcount"}
)  # fmt: skip

#: Filters whose cost does not depend on their input: applied directly they are bounded by the
#: template's size (or run in a loop body, which the loop guard watches), applied per item by
#: ``map`` they go through ``call_filter``, which reads the clock. They skip the deadline
#: wrapper every other filter has (a few hundred nanoseconds per call on ``default``).
_CONSTANT_TIME_FILTERS: Final = frozenset({"abs", "attr", "d", "default", "float"})

#: Filters that may return a lazy iterator (a generator or ``reversed`` object).
_LAZY_FILTERS: Final = frozenset(
    {"map", "select", "reject", "selectattr", "rejectattr", "batch", "slice", "unique", "items",
     "reverse"}
)  # fmt: skip
_EAGER_TYPES: Final = frozenset({str, list, tuple, dict, int, float, bool, type(None)})

_ALL_BINOPS: Final = frozenset({"+", "-", "*", "/", "//", "%", "**"})
_DIVISIONS: Final = frozenset({"//", "%"})

_STR_ATTRIBUTES: Final = frozenset(
    {
        "capitalize", "casefold", "center", "count", "endswith", "expandtabs", "find",
        "format", "format_map", "index", "isalnum", "isalpha", "isascii", "isdecimal",
        "isdigit", "isidentifier", "islower", "isnumeric", "isprintable", "isspace",
        "istitle", "isupper", "join", "ljust", "lower", "lstrip", "partition",
        "removeprefix", "removesuffix", "replace", "rfind", "rindex", "rjust", "rpartition",
        "rsplit", "rstrip", "split", "splitlines", "startswith", "strip", "swapcase", "title",
        "upper", "zfill",
    }
)  # fmt: skip
_INT_ATTRIBUTES: Final = frozenset(
    {"real", "imag", "numerator", "denominator", "bit_length", "bit_count", "conjugate"}
)
#: What templates may read on each plain-data type. Anything not listed (``encode``,
#: ``translate``, ``to_bytes``, ``fromkeys``, every dunder) is refused. Types not listed at all
#: get nothing, except Jinja's own runtime objects (see ``_RUNTIME_TYPES``).
_ALLOWED_ATTRIBUTES: Final[dict[type, frozenset[str]]] = {
    str: _STR_ATTRIBUTES,
    list: frozenset({"count", "index", "copy"}),
    tuple: frozenset({"count", "index"}),
    dict: frozenset({"get", "items", "keys", "values", "copy"}),
    int: _INT_ATTRIBUTES,
    bool: _INT_ATTRIBUTES,
    float: frozenset({"real", "imag", "is_integer", "conjugate", "as_integer_ratio"}),
    range: frozenset({"start", "stop", "step", "count", "index"}),
    type(None): frozenset(),
}
_DICT_ATTRIBUTE_NAMES: Final = frozenset(dir(dict))
_LOOP_VALUES: Final = frozenset(
    {"index", "index0", "revindex", "revindex0", "first", "last", "length", "depth", "depth0",
     "previtem", "nextitem"}
)  # fmt: skip
_ROUTINE_TYPES: Final = (
    types.BuiltinFunctionType,
    types.FunctionType,
    types.MethodType,
    types.MethodWrapperType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.ClassMethodDescriptorType,
    functools.partial,
)


#: Jinja's own runtime objects (``loop``, macros, ``self``, imported modules; blocks come
#: wrapped in ``_Block``): the sandbox's default rules apply to them, minus type objects.
_RUNTIME_TYPES: Final = (LoopContext, Macro, TemplateModule, TemplateReference)


class _Method:
    """A callable handed to templates instead of a bound method or builtin.

    Its ``repr`` names only the method, so printing it (``{{ x.upper }}``, ``'%s'|format``,
    ``~``) reveals no class, module or address, and its only attributes are private (refused
    by the sandbox).
    """

    __slots__ = ("_fn", "_name")

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self._fn = fn
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<method {self._name}>"

    __str__ = __repr__


class _Range:
    """The ``range`` global: Python's ``range`` capped at ``RenderLimits.max_range`` items."""

    __slots__ = ("_env",)

    def __init__(self, env: PromptEnvironment) -> None:
        self._env = env

    def __call__(self, *args: int) -> range:
        result = range(*args)
        limit = self._env.current_limits().max_range
        try:
            size = len(result)
        except OverflowError:  # longer than sys.maxsize
            size = limit + 1
        if size > limit:
            raise limit_error(f"range() of {size} items is over the limit of {limit}")
        return result

    def __repr__(self) -> str:
        return "<range>"

    __str__ = __repr__


class _Iterator:
    """What the lazy filters (``map``, ``select``, ``batch``, ...) hand to templates.

    Python's generators print as ``<generator object sync_do_map at 0x7f...>``: a function
    name and an address. This wrapper iterates the same way and prints as ``<iterator>``.
    """

    __slots__ = ("_iterator",)

    def __init__(self, iterator: Iterator[Any]) -> None:
        self._iterator = iterator

    def __iter__(self) -> Iterator[Any]:
        return self._iterator

    def __next__(self) -> Any:
        return next(self._iterator)

    def __repr__(self) -> str:
        return "<iterator>"

    __str__ = __repr__


class _Block:
    """A block as templates see it (``super``, ``self.name``), in place of BlockReference.

    BlockReference prints as ``<jinja2.runtime.BlockReference object at 0x...>`` and renders
    by joining the block's output with no meter. This proxy prints its name only, renders
    through a metered buffer, and still offers ``super`` for multi-level inheritance.
    """

    __slots__ = ("_ref",)

    def __init__(self, ref: BlockReference) -> None:
        self._ref = ref

    @property
    def super(self) -> Any:
        parent = self._ref.super
        return _Block(parent) if isinstance(parent, BlockReference) else parent

    def __call__(self) -> str:
        ref = self._ref
        # BlockReference keeps the render function stack privately; the attributes have been
        # the same since Jinja 2.x.
        context: Context = ref._context
        render = ref._stack[ref._depth]
        buffer = cast(PromptEnvironment, context.environment).output_buffer()
        buffer.extend(render(context))
        return "".join(buffer)

    def __repr__(self) -> str:
        return f"<block {self._ref.name!r}>"

    __str__ = __repr__


def _block_safe(value: Any) -> Any:
    return _Block(value) if type(value) is BlockReference else value


class _PromptContext(Context):
    """Jinja's context, except that ``super`` inside a block is a :class:`_Block`."""

    def super(self, name: str, current: Callable[[Context], Iterator[str]]) -> Any:
        return _block_safe(Context.super(self, name, current))


_CALLABLE_TYPES: Final = (_Method, _Range, _Block, Macro, LoopContext, Undefined)
_ALLOWED_ATTRIBUTES[_Block] = frozenset({"super"})

#: What templates call the sandbox's and Jinja's own runtime types in error messages, in place
#: of ``prompt_tool.core.sandbox._Method object`` and the like.
_PLAIN_TYPE_NAMES: Final[dict[str, str]] = {
    "_Method": "method",
    "_Iterator": "iterator",
    "_Range": "range",
    "_Block": "block",
    "_PromptUndefined": "undefined value",
    "StrictUndefined": "undefined value",
    "Undefined": "undefined value",
    "LoopContext": "loop",
    "Macro": "macro",
    "TemplateModule": "imported template",
    "TemplateReference": "self",
    "BlockReference": "block",
    "Markup": "str",
}


def _describe(obj: Any) -> str:
    """How an error message names ``obj``: ``'dict' object``, ``method 'upper'``, ``loop``."""
    if type(obj) is _Method:
        return f"method {obj._name!r}"
    name = type(obj).__name__
    plain = _PLAIN_TYPE_NAMES.get(name)
    return plain if plain is not None else f"{name!r} object"


class _PromptUndefined(StrictUndefined):
    """Jinja's strict undefined, with messages that name no Python module or class."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        if self._undefined_hint:
            return self._undefined_hint
        name = _shown(self._undefined_name)
        if self._undefined_obj is missing:
            return f"{name} is undefined"
        what = _describe(self._undefined_obj)
        if not isinstance(self._undefined_name, str):
            return f"{what} has no item {name}"
        return f"{what} has no attribute {name}"


def _shown(key: Any) -> str:
    # A key can be any value the template built (``d[s]`` with a megabyte string).
    text = repr(key)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _fail_on_undefined(*groups: Iterable[Any]) -> None:
    """Raise the undefined-variable error of the first undefined value in ``groups``."""
    for group in groups:
        for value in group:
            if isinstance(value, Undefined):
                value._fail_with_undefined_error()


def _fail_on_method_value(*values: Any) -> None:
    """Explain a TypeError caused by using a method as a value (``x.upper + 1``)."""
    for value in values:
        if type(value) is _Method:
            raise TemplateRenderError(
                f"method {value._name!r} is used as a value; call it with "
                f"parentheses: {value._name}()"
            )


# ``prompt_tool.core.sandbox._Method``, ``jinja2.runtime.LoopContext``: a dotted path into the
# project or a library, as Python's own messages print it.
_DOTTED_INTERNAL = re.compile(r"\b(?:prompt_tool|jinja2|markupsafe)(?:\.\w+)*\.(\w+)")
_ADDRESS = re.compile(r"<([\w. ]+?)(?: object)? at 0x[0-9a-fA-F]+>|\s*at 0x[0-9a-fA-F]+")
_QUOTED_INTERNAL = re.compile(r"'(" + "|".join(map(re.escape, _PLAIN_TYPE_NAMES)) + r")'")


def _plain_text(message: str) -> str:
    """``message`` with internal module paths, class names and addresses put in plain words."""

    def name(match: re.Match[str]) -> str:
        return _PLAIN_TYPE_NAMES.get(match.group(1), match.group(1).lstrip("_"))

    message = _ADDRESS.sub(lambda m: f"<{name(m)}>" if m.group(1) else "", message)
    message = _DOTTED_INTERNAL.sub(name, message)
    return _QUOTED_INTERNAL.sub(lambda m: repr(name(m)), message)


class _OutputBuffer(list[str]):
    """The list macros, ``{% set %}`` blocks and call/filter blocks write into, with a meter.

    Jinja collects such output in a plain list and joins it when the block ends; without a
    meter a loop inside a macro could pile up gigabytes of references before anything is
    yielded to the render loop that counts output.
    """

    # No clock reads here: loops read it through the loop guard and calls through ``call``,
    # and every write happens inside one of those or is bounded by the template's size.
    __slots__ = ("_budget",)
    _budget: Budget

    def append(self, item: str) -> None:
        budget = self._budget
        budget.buffered += len(item)
        if budget.buffered > budget.buffer_cap:
            raise budget.buffer_overflow()
        list.append(self, item)

    def extend(self, items: Iterable[str]) -> None:
        if type(items) is tuple:
            # What ``{{ a }} text {{ b }}`` compiles to: a short tuple, cheap to measure first.
            budget = self._budget
            budget.buffered += sum(map(len, items))
            if budget.buffered > budget.buffer_cap:
                raise budget.buffer_overflow()
            list.extend(self, items)
        else:
            # A block or include streaming its output: count as it comes, never materialise.
            for item in items:
                self.append(item)


_TEXT_TOKENS: Final = frozenset({TOKEN_DATA, TOKEN_STRING})


class _NewlinePreservingLexer(Lexer):
    """Jinja's lexer, minus its newline normalisation.

    ``Lexer.tokeniter`` rewrites every ``\\r\\n`` and ``\\r`` to ``\\n`` before lexing and
    ``wrap`` then rewrites them to ``newline_sequence``; a prompt stored with CRLF line endings
    would come back changed. Token line numbers count newlines, so the *k*-th newline inside a
    data or string token that starts on line *L* is the source's newline number *L - 1 + k*;
    the original separator is put back from that index.
    """

    def _normalize_newlines(self, value: str) -> str:
        return value

    def tokeniter(
        self,
        source: str,
        name: str | None,
        filename: str | None = None,
        state: str | None = None,
    ) -> Iterator[tuple[int, str, str]]:
        separators: list[str] = newline_re.findall(source)
        stream = super().tokeniter(source, name, filename, state)
        if all(separator == "\n" for separator in separators):
            yield from stream
            return
        for lineno, token, value in stream:
            if token in _TEXT_TOKENS and "\n" in value:
                pieces = value.split("\n")
                first = lineno - 1
                restored = pieces[0] + "".join(
                    separators[first + index] + piece for index, piece in enumerate(pieces[1:])
                )
                yield lineno, token, restored
            else:
                yield lineno, token, value


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator with metered buffers, checked literals and ``~``, no folding."""

    def _output_child_to_const(self, node: nodes.Expr, frame: Frame, finalize: Any) -> str:
        # ``visit_Output`` evaluates ``{{ ... }}`` at compile time whenever ``as_const``
        # succeeds, filters included (``{{ 'x'|center(999999) }}`` a few thousand times would
        # build gigabytes inside ``compile``). Only literal template text is a constant here;
        # every expression runs at render time, under the render budget.
        if not isinstance(node, nodes.TemplateData):
            raise nodes.Impossible()
        return super()._output_child_to_const(node, frame, finalize)

    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")

    def _visit_built(self, visit: Callable[[Any, Frame], None], node: Any, frame: Frame) -> None:
        # A literal whose items are all constants is bounded by the source; one holding names
        # or expressions can repeat a large value (``[x, x, x]``, or ``m([x, x])`` recursing),
        # so its deep size is checked as it is built.
        if all(isinstance(item, nodes.Const) for item in node.items):
            visit(node, frame)
            return
        self.write("environment.built_value(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:  # noqa: N802 - Jinja's visitor
        self._visit_built(super().visit_List, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:  # noqa: N802 - Jinja's visitor
        if node.ctx != "load":  # an assignment target such as ``{% set a, b = ... %}``
            super().visit_Tuple(node, frame)
            return
        self._visit_built(super().visit_Tuple, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:  # noqa: N802 - Jinja's visitor
        if all(isinstance(pair.value, nodes.Const) for pair in node.items):
            super().visit_Dict(node, frame)
            return
        self.write("environment.built_value(")
        super().visit_Dict(node, frame)
        self.write(")")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:  # noqa: N802 - Jinja's visitor
        # ``~`` is not an interceptable operator; without this, recursion on ``s ~ s`` doubles
        # a string per call with no check at all.
        self.write("environment.concat_values((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _TrackingCodeGenerator(meta.TrackingCodeGenerator, _BoundedCodeGenerator):
    """``jinja2.meta``'s introspection, on top of the non-folding code generator.

    ``meta.find_undeclared_variables`` runs a full code generation pass with Jinja's stock
    generator, which folds ``{{ ... }}`` output: validating ``{{ 'x'|center(999999) }}`` a
    few dozen times would allocate gigabytes. Same analysis, no folding.
    """


def find_undeclared_variables(tree: nodes.Template, environment: PromptEnvironment) -> set[str]:
    """Names the template reads from its context (Jinja's ``meta`` function, without folding)."""
    generator = _TrackingCodeGenerator(environment)
    generator.visit(tree)
    return generator.undeclared_identifiers


class PromptTemplate(Template):
    """A compiled template whose ``render`` is always sandboxed, bounded and sanitised."""

    def render(self, *args: Any, **kwargs: Any) -> str:
        environment = cast(PromptEnvironment, self.environment)
        values = sanitize_variables(dict(*args, **kwargs))
        return render_bounded(self, values, environment.limits, None, name=self.name)

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[str]:
        # Streaming would bypass the output meter; hand out the bounded result in one piece.
        yield self.render(*args, **kwargs)

    def make_module(
        self,
        vars: dict[str, Any] | None = None,
        shared: bool = False,
        locals: Mapping[str, Any] | None = None,
    ) -> TemplateModule:
        context = self.new_context(vars, shared, locals)
        budget = CURRENT_BUDGET.get()
        if budget is None:
            return TemplateModule(self, context)
        body = _OutputBuffer()
        body._budget = budget
        body.extend(self.root_render_func(context))
        return TemplateModule(self, context, body)

    def _get_default_module(self, ctx: Context | None = None) -> TemplateModule:
        # Jinja caches an imported template's module on the Template object. Ours are shared
        # by every render (they live in the compiled cache), and a module's own imports are
        # resolved through the render's loader, so the module is cached per render instead.
        if ctx is not None:
            keys = ctx.globals_keys - self.globals.keys()
            if keys:
                return self.make_module({key: ctx.parent[key] for key in keys})
        budget = CURRENT_BUDGET.get()
        if budget is None:
            return self.make_module()
        if budget.modules is None:
            budget.modules = {}
        module = budget.modules.get(id(self))
        if module is None:
            module = budget.modules[id(self)] = self.make_module()
        return cast(TemplateModule, module)


class _StoredTemplateLoader(BaseLoader):
    """Resolves ``include``/``import``/``extends`` through the loader of the running render.

    The environment is shared by all renders while each render brings its own loader (the
    template manager's view of one scope), so the loader is looked up in the render budget.
    Sources are compiled through the content-hash cache, so a cached top-level template plus
    the loader always yields the current included text without recompiling it.
    """

    has_source_access = False

    def load(
        self,
        environment: Any,
        name: str,
        globals: MutableMapping[str, Any] | None = None,
    ) -> Template:
        env = cast(PromptEnvironment, environment)
        budget = CURRENT_BUDGET.get()
        if budget is None or budget.resolve is None:
            raise JinjaTemplateNotFound(name, f"no template loader to resolve {name!r}")
        # Every include, import and extends comes through here: a fan-out of includes (each
        # including several more) stops on time even when none of them writes anything.
        budget.check_deadline()
        if budget.loaded is None:
            budget.loaded = {}
        template = budget.loaded.get(name)
        if template is None:
            source = budget.resolve(name)
            if source is None:
                raise JinjaTemplateNotFound(name)
            template = env.compile_cached(source, name=name)
            budget.loaded[name] = template
        return template


def _template_names(node: nodes.Node) -> list[str] | None:
    target = getattr(node, "template", None)
    if isinstance(target, nodes.Const) and isinstance(target.value, str):
        return [target.value]
    if isinstance(target, nodes.List | nodes.Tuple) and all(
        isinstance(item, nodes.Const) and isinstance(item.value, str) for item in target.items
    ):
        return [cast(nodes.Const, item).value for item in target.items]
    return None


_REFERENCE_NODES: Final = (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)


def template_references(tree: nodes.Template) -> list[tuple[str, int, bool]]:
    """``(name, line, optional)`` for each template ``tree`` includes, imports or extends."""
    found: list[tuple[str, int, bool]] = []
    for node in tree.find_all(_REFERENCE_NODES):
        names = _template_names(node) or []
        optional = isinstance(node, nodes.Include) and node.ignore_missing
        found.extend((name, node.lineno, optional) for name in names)
    return found


class PromptEnvironment(ImmutableSandboxedEnvironment):
    """``ImmutableSandboxedEnvironment`` hardened for untrusted prompt templates.

    One instance serves many renders concurrently: everything per-render (deadline, depth,
    loader, counters) lives in the budget context variable, never on the environment.
    """

    intercepted_binops = _ALL_BINOPS
    code_generator_class = _BoundedCodeGenerator
    template_class = PromptTemplate
    context_class = _PromptContext

    def __init__(
        self,
        *,
        limits: RenderLimits | None = None,
        cache: CompiledCache[PromptTemplate] | None = None,
        max_source_bytes: int = 64 * 1024,
        max_stored_source_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        super().__init__(
            undefined=_PromptUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=False,
            lstrip_blocks=False,
            optimized=False,
            # Jinja's own name-keyed cache would hand out one scope's template to another;
            # compiled templates are cached by source text in ``cache`` instead.
            cache_size=0,
            auto_reload=False,
            loader=_StoredTemplateLoader(),
        )
        self.limits = limits if limits is not None else RenderLimits()
        # Not ``self.cache``: that is Jinja's own (disabled) name-keyed cache.
        self.compiled_cache: CompiledCache[PromptTemplate] = (
            cache if cache is not None else CompiledCache()
        )
        self.max_source_bytes = max_source_bytes
        # Versions already stored passed validation, or are literal imports of legacy text
        # (which may be any size); compiling them is linear, so only a hard ceiling applies.
        self.max_stored_source_bytes = max(max_source_bytes, max_stored_source_bytes)
        self._lexer = _NewlinePreservingLexer(self)
        # ``dict`` hands out a type object (``{{ dict }}`` prints "<class 'dict'>", the usual
        # first step of an attribute walk) and literals do the same job; ``cycler``,
        # ``joiner`` and ``namespace`` are stateful helpers with mutable internals;
        # ``lipsum`` generates random text. Only a capped ``range`` stays.
        self.globals.clear()
        self.globals["range"] = _Range(self)
        self.filters = self._build_filters()
        self.filters[LOOP_GUARD_FILTER] = self._loop_guard

    # -- compilation -----------------------------------------------------------------------

    @property
    def lexer(self) -> Lexer:
        return self._lexer

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for node in tree.find_all(_REFERENCE_NODES):
            if _template_names(node) is None:
                raise TemplateSyntaxError(
                    "include, import and extends need a constant template name "
                    "(a quoted string), not an expression",
                    node.lineno,
                    name,
                    filename,
                )
        for node in tree.find_all((nodes.EvalContextModifier, nodes.ScopedEvalContextModifier)):
            raise TemplateSyntaxError(
                "the autoescape tag is not supported: prompts are plain text",
                node.lineno,
                name,
                filename,
            )
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(
                loop.iter, LOOP_GUARD_FILTER, [], [], None, None, lineno=loop.iter.lineno
            )
        tree.set_environment(self)
        return tree

    def check_source_size(self, source: str, limit: int | None = None) -> int:
        """UTF-8 size of ``source``; raises if it is over the limit or not encodable."""
        limit = self.max_source_bytes if limit is None else limit
        try:
            size = len(source.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise TemplateValidationError(
                f"the source contains a character that is not valid UTF-8 (position {exc.start})",
                hint="remove lone surrogate characters from the text",
            ) from None
        if size > limit:
            raise TemplateValidationError(
                f"the source is {size} bytes, over the limit of {limit}",
                hint="split it into smaller templates or raise template_max_source_bytes",
            )
        return size

    def compile_tree(self, tree: nodes.Template, name: str | None) -> PromptTemplate:
        code = self.compile(tree, name)
        # A plain dict rather than Jinja's ChainMap: every render copies the globals into its
        # context, and iterating a ChainMap costs more than the rest of a small render. The
        # globals never change after construction, so a snapshot loses nothing.
        template = PromptTemplate.from_code(self, code, dict(self.globals), None)
        return cast(PromptTemplate, template)

    def compile_uncached(self, source: str, name: str | None) -> PromptTemplate:
        # New sources meet max_source_bytes in validation, before they are stored.
        self.check_source_size(source, self.max_stored_source_bytes)
        return self.compile_tree(self.parse(source, name), name)

    def compile_cached(self, source: str, *, name: str | None = None) -> PromptTemplate:
        """The compiled template for ``source``, from the cache when possible."""
        template = self.compiled_cache.get(source)
        if template is None:
            template = self.compiled_cache.put(source, self.compile_uncached(source, name))
        return template

    # -- per-render state --------------------------------------------------------------------

    def current_limits(self) -> RenderLimits:
        budget = CURRENT_BUDGET.get()
        return self.limits if budget is None else budget.limits

    def output_buffer(self) -> list[str]:
        budget = CURRENT_BUDGET.get()
        if budget is None:
            return []
        buffer = _OutputBuffer()
        buffer._budget = budget
        return buffer

    def concat_values(self, values: tuple[Any, ...]) -> str:
        parts = [value if type(value) is str else str(value) for value in values]
        size = sum(map(len, parts))
        check_string_length(size, self.current_limits(), "'~'")
        result = "".join(parts)
        charge_value(result)
        return result

    def built_value(self, value: Any) -> Any:
        """Check the deep size of a list/tuple/dict literal the template just built.

        Strict undefined applies inside literals too: ``{{ (a, b) }}`` fails as ``{{ a }}``
        does instead of printing ``(Undefined, Undefined)``. Nested literals are checked when
        they are built, so the top level is enough (and its length is bounded by the source).
        """
        _fail_on_undefined(value.values() if type(value) is dict else value)
        limits = self.current_limits()
        check_value_size(value_size(value, limits.max_value_size), limits, "a literal")
        return value

    @staticmethod
    def _loop_guard(iterable: Any) -> Any:
        budget = CURRENT_BUDGET.get()
        if budget is None:
            return iterable
        # The clock is read here and then every LOOP_CHECK_EVERY items (see _Guarded), however
        # small the loop: nested loops whose bodies do little, or whose bodies each run one
        # costly operation, stop on time. A list or tuple no longer than that is handed out as
        # it is: the reading here already bounds what its bodies can overrun, and most loops in
        # prompts are that short.
        budget.check_deadline()
        if type(iterable) in _SHORT_LOOP_TYPES and len(iterable) <= LOOP_CHECK_EVERY:
            return iterable
        return budget.guarded(iterable)

    # -- operators -------------------------------------------------------------------------

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            self._check_multiply(left, right)
        elif operator == "**":
            self._check_power(left, right)
        elif operator == "+":
            self._check_add(left, right)
        elif operator == "%" and isinstance(left, str):
            limits = self.current_limits()
            check_percent_format(left, limits)
            result = left % right
            check_string_length(len(result), limits, "'%' formatting")
            charge_value(result)
            return result
        elif operator in _DIVISIONS and type(left) is int and type(right) is int:
            self._check_divide(operator, left, right)
        try:
            result = self.binop_table[operator](left, right)
        except TypeError:
            _fail_on_method_value(left, right)
            raise
        if type(result) in (str, list, tuple):
            charge_value(result)  # items shared with the operands are not new
        return result

    def _check_divide(self, operator: str, left: int, right: int) -> None:
        # Long division costs about the product of the operands' lengths; the result is never
        # longer than the dividend. Dividing by a small number stays linear and allowed.
        limit = self.current_limits().max_int_bits
        left_bits, right_bits = left.bit_length(), right.bit_length()
        if left_bits * right_bits > limit * limit:
            raise limit_error(
                f"'{operator}' of numbers of {left_bits} and {right_bits} bits would take too "
                f"long (limit {limit} bits)"
            )

    def _check_multiply(self, left: Any, right: Any) -> None:
        limits = self.current_limits()
        for sequence, count in ((left, right), (right, left)):
            if isinstance(sequence, str | list | tuple) and isinstance(count, int):
                times = max(count, 0)
                if isinstance(sequence, str):
                    check_string_length(len(sequence) * times, limits, "'*'")
                else:
                    check_sequence_length(len(sequence) * times, limits, "'*'")
                    deep = value_size(sequence, limits.max_value_size)
                    check_value_size((deep - 1) * times + 1, limits, "'*'")
                return
        if isinstance(left, int) and isinstance(right, int):
            check_int_bits(abs(left).bit_length() + abs(right).bit_length(), limits, "'*'")

    def _check_power(self, base: Any, exponent: Any) -> None:
        if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
            check_int_bits(abs(base).bit_length() * exponent, self.current_limits(), "'**'")

    def _check_add(self, left: Any, right: Any) -> None:
        if isinstance(left, str) and isinstance(right, str):
            check_string_length(len(left) + len(right), self.current_limits(), "'+'")
        elif isinstance(left, list | tuple) and isinstance(right, list | tuple):
            limits = self.current_limits()
            check_sequence_length(len(left) + len(right), limits, "'+'")
            deep = value_size(left, limits.max_value_size) + value_size(
                right, limits.max_value_size
            )
            check_value_size(deep, limits, "'+'")

    # -- attribute access and calls --------------------------------------------------------

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        return self.undefined(
            f"access to attribute {attribute!r} of {_describe(obj)} is not allowed",
            name=attribute,
            obj=obj,
            exc=SecurityError,
        )

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        allowed = _ALLOWED_ATTRIBUTES.get(type(obj))
        if allowed is not None:
            # The allow-lists hold no private or mutating names: the base checks add nothing.
            return attr in allowed
        if not super().is_safe_attribute(obj, attr, value):
            return False
        if isinstance(obj, str):
            return attr in _STR_ATTRIBUTES
        if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
            # Named tuples such as groupby's (grouper, list) pairs: fields only.
            return attr in cast("tuple[str, ...]", type(obj)._fields)  # type: ignore[attr-defined]
        if isinstance(obj, _RUNTIME_TYPES):
            return not isinstance(value, type)
        return False

    def _expose(self, obj: Any, attribute: str, value: Any) -> Any:
        if not self.is_safe_attribute(obj, attribute, value):
            return self.unsafe_undefined(obj, attribute)
        if not isinstance(value, _ROUTINE_TYPES):
            return value
        if isinstance(obj, str):
            formatter = self.wrap_str_format(value)
            if formatter is not None:
                return formatter
            bounded = _BOUNDED_STR_METHODS.get(attribute)
            if bounded is not None:
                return _Method(functools.partial(bounded, self, obj), attribute)
        return _Method(value, attribute)

    def getattr(self, obj: Any, attribute: str) -> Any:
        kind = type(obj)
        if kind is dict and attribute not in _DICT_ATTRIBUTE_NAMES:
            # The common case, ``{{ user.name }}`` on JSON data, without raising and catching
            # an AttributeError first.
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        if kind is LoopContext and attribute in _LOOP_VALUES:
            # ``loop.index`` and friends, read on every iteration: plain values, no checks due.
            return getattr(obj, attribute)
        try:
            value = getattr(obj, attribute)
        except AttributeError:
            try:
                return _block_safe(obj[attribute])
            except (TypeError, LookupError):
                return self.undefined(obj=obj, name=attribute)
        return self._expose(obj, attribute, value)

    def getitem(self, obj: Any, argument: Any) -> Any:
        # Filters reach attributes of every item through here (``sort(attribute=...)``,
        # ``groupby``, ``map(attribute=...)``): one loop in C calling back per item, which only
        # this tick lets the deadline interrupt.
        budget = CURRENT_BUDGET.get()
        if budget is not None:
            budget.tick()
            if type(argument) is slice:
                result = obj[argument]
                if type(result) in (str, list, tuple):
                    charge_value(result)
                return result
        try:
            return _block_safe(obj[argument])
        except (TypeError, LookupError):
            if isinstance(argument, str):
                try:
                    value = getattr(obj, argument)
                except AttributeError:
                    pass
                else:
                    return self._expose(obj, argument, value)
        return self.undefined(obj=obj, name=argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if not isinstance(value, types.BuiltinMethodType | types.MethodType) or (
            value.__name__ not in ("format", "format_map")
        ):
            return None
        template_text = value.__self__
        if not isinstance(template_text, str):
            return None
        is_format_map = value.__name__ == "format_map"

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs = args[0]
                args = ()
            limits = self.current_limits()
            result = _BoundedFormatter(self, limits).vformat(str(template_text), args, kwargs)
            check_string_length(len(result), limits, "str.format")
            return result  # charged by the call hook, like every method result

        return _Method(bounded_format, value.__name__)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        kind = type(obj)
        if kind is not Macro and kind is not _Method and not isinstance(obj, _CALLABLE_TYPES):
            raise SecurityError(f"calling a {kind.__name__!r} object is not allowed")
        budget = CURRENT_BUDGET.get()
        if budget is None:
            return context.call(obj, *args, **kwargs)
        budget.check_deadline()
        if budget.depth >= budget.limits.max_call_depth:
            raise limit_error(
                f"calls nest deeper than {budget.limits.max_call_depth} levels "
                "(a macro or recursive loop that does not stop?)"
            )
        # Jinja passes loop and block variables along for callables that take the context;
        # none of the callables allowed here do, so they are dropped as Context.call would.
        kwargs.pop("_block_vars", None)
        kwargs.pop("_loop_vars", None)
        if (args or kwargs) and kind is Macro and (obj.catch_varargs or obj.catch_kwargs):
            # Extra arguments become a new ``varargs`` tuple / ``kwargs`` dict: a container
            # built from whatever was passed, so ``m(x, x)`` recursing doubles like a literal.
            limits = budget.limits
            size = value_size(args, limits.max_value_size)
            if kwargs:
                size += value_size(kwargs, limits.max_value_size)
            check_value_size(size, limits, "the arguments of a call")
            # Strict undefined applies to the new containers as to any literal (declared
            # parameters may still be undefined until used).
            declared = obj.arguments
            _fail_on_undefined(
                args[len(declared) :],
                (value for key, value in kwargs.items() if key not in declared),
            )
        budget.depth += 1
        try:
            if kind is _Method:
                try:
                    result = obj(*args, **kwargs)
                except TypeError:
                    # Usually an undefined argument ("must be str, not StrictUndefined").
                    _fail_on_undefined(args, kwargs.values())
                    raise
                result_kind = type(result)
                if result_kind is str:
                    charge_value(result)
                elif result_kind is list or result_kind is tuple:
                    # ``split``, ``partition``, ``splitlines``: new strings inside a new list.
                    charge(value_cost(result, budget.limits.max_value_size)[1])
                return result
            if kind is Macro:
                # Calling the macro directly skips Context.call's generic introspection, which
                # makes macro calls cheaper than in an unsandboxed Jinja environment.
                return obj(*args, **kwargs)
            if kind is LoopContext and len(args) == 1 and not kwargs:
                # ``loop(children)`` in a recursive loop iterates outside the ``{% for %}``
                # expression the loop guard wraps: guard it here.
                args = (budget.guarded(args[0]),)
            return context.call(obj, *args, **kwargs)
        finally:
            budget.depth -= 1

    def call_filter(
        self,
        name: str,
        value: Any,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        context: Context | None = None,
        eval_ctx: EvalContext | None = None,
    ) -> Any:
        # ``map('name')`` applies a filter per item from inside C-driven iteration: read the
        # clock here too, for the constant-time filters that skip their own read.
        budget = CURRENT_BUDGET.get()
        if budget is not None:
            budget.tick()
        try:
            return super().call_filter(name, value, args, kwargs, context, eval_ctx)
        except TypeError:
            _fail_on_undefined((value,), args or (), (kwargs or {}).values())
            _fail_on_method_value(value, *(args or ()))
            raise

    def call_test(
        self,
        name: str,
        value: Any,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        context: Context | None = None,
        eval_ctx: EvalContext | None = None,
    ) -> Any:
        # ``select('name')`` / ``reject`` apply a test per item: tick here too.
        budget = CURRENT_BUDGET.get()
        if budget is not None:
            budget.tick()
        return super().call_test(name, value, args, kwargs, context, eval_ctx)

    # -- filters ---------------------------------------------------------------------------

    def _build_filters(self) -> dict[str, Callable[..., Any]]:
        filters: dict[str, Callable[..., Any]] = {
            name: func for name, func in FILTERS.items() if name not in REMOVED_FILTERS
        }
        # Every filter application reads the clock first: repeated sorts, joins and the like
        # stop on time however they are repeated (loops, macros, map, chained filters). The
        # post-checked ones read it in their own wrapper, the others get a thin one.
        checked = {
            name: (func if name in _CONSTANT_TIME_FILTERS else _deadline_checked(func))
            if name in _NON_GROWING_FILTERS
            else self._post_checked(func, name)
            for name, func in filters.items()
        }
        # The bounded versions check their own result; wrapping them again would only cost.
        checked.update({name: _deadline_checked(f) for name, f in _BOUNDED_FILTERS.items()})
        for name in _LAZY_FILTERS:
            checked[name] = _iterator_safe(checked[name])
        return checked

    def _post_checked(self, func: Callable[..., Any], name: str) -> Callable[..., Any]:
        """Wrap a filter so no result longer than the string/list limits escapes it.

        Filters with a bounded version are refused *before* they allocate; for the rest (whose
        output grows at most a small constant factor, e.g. ``upper``, ``tojson``) this stops
        the growth from compounding through recursion.
        """

        what = f"the {name} filter"

        @functools.wraps(func)
        def checked(*args: Any, **kwargs: Any) -> Any:
            budget = CURRENT_BUDGET.get()
            if budget is not None and time.monotonic() > budget.deadline:
                raise budget.deadline_error()
            result = func(*args, **kwargs)
            kind = type(result)
            if kind is str:
                return account_text(result, self.limits, what)
            if kind is list or kind is tuple:
                limits = self.current_limits()
                check_sequence_length(len(result), limits, what)
                size, cost = value_cost(result, limits.max_value_size)
                check_value_size(size, limits, what)
                charge(cost)
            return result

        return checked


def _deadline_checked(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)  # keeps Jinja's pass_environment / pass_eval_context marks
    def checked(*args: Any, **kwargs: Any) -> Any:
        budget = CURRENT_BUDGET.get()
        if budget is not None and time.monotonic() > budget.deadline:
            raise budget.deadline_error()
        return func(*args, **kwargs)

    return checked


def _iterator_safe(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = func(*args, **kwargs)
        if type(result) in _EAGER_TYPES or not isinstance(result, Iterator):
            return result
        return _Iterator(result)

    return wrapper


class _BoundedFormatter(SandboxedFormatter):
    """``str.format`` with sandboxed field lookup and a cap on what the fields produce."""

    def __init__(self, env: PromptEnvironment, limits: RenderLimits) -> None:
        super().__init__(env)
        self._limits = limits
        self._produced = 0

    def format_field(self, value: Any, format_spec: str) -> Any:
        check_format_spec(format_spec, self._limits)
        text = super().format_field(value, format_spec)
        self._produced += len(text)
        check_string_length(self._produced, self._limits, "str.format")
        return text


# -- bounded string methods ----------------------------------------------------------------
#
# Each takes the environment and the string, then the template's arguments exactly as the
# str method does. Arguments that do not fit the checked shape go to the str method
# unchanged, so a wrong call gets Python's own message about the method (not this helper).


def _str_pad(method: str) -> Callable[..., str]:
    def pad(env: PromptEnvironment, text: str, *args: Any) -> str:
        if args and isinstance(args[0], int):
            check_string_length(args[0], env.current_limits(), f"str.{method}")
        return cast(str, getattr(text, method)(*args))  # charged by the call hook

    return pad


def _tabsize(tabsize: Any = 8) -> Any:
    return tabsize


def _str_expandtabs(env: PromptEnvironment, text: str, *args: Any, **kwargs: Any) -> str:
    try:
        tabsize = _tabsize(*args, **kwargs)
    except TypeError:
        tabsize = None
    if isinstance(tabsize, int):
        size = len(text) + text.count("\t") * max(tabsize, 0)
        check_string_length(size, env.current_limits(), "str.expandtabs")
    return text.expandtabs(*args, **kwargs)


def _replaced_size(text: str, old: str, new: str, count: int) -> int:
    occurrences = len(text) + 1 if not old else text.count(old)
    if count >= 0:
        occurrences = min(occurrences, count)
    return len(text) + occurrences * (len(new) - len(old))


def _str_replace(env: PromptEnvironment, text: str, *args: Any) -> str:
    if 2 <= len(args) <= 3:
        old, new, count = (*args, -1)[:3]
        if isinstance(old, str) and isinstance(new, str) and isinstance(count, int):
            check_string_length(
                _replaced_size(text, old, new, count), env.current_limits(), "str.replace"
            )
    return text.replace(*args)


def _str_case(method: str) -> Callable[..., str]:
    # Case mappings can grow text up to 3x ('ﬃ'.upper() is 'FFI'): the length is checked on the
    # result, which is at most three times a string that already passed the limit.
    def mapped(env: PromptEnvironment, text: str, *args: Any) -> str:
        result = cast(str, getattr(text, method)(*args))
        limits = env.current_limits()
        if len(result) > limits.max_string_length:
            check_string_length(len(result), limits, f"str.{method}")
        return result

    return mapped


# Python's reverse searches (``rfind``, ``rindex``, ``rsplit``, ``rpartition``) compare the
# needle at every position: len(text) * len(needle) steps on crafted input, tens of seconds
# for a megabyte of text and a long needle, in one call no deadline can interrupt (the forward
# searches switch to a linear algorithm). Past this much work the search runs forwards over
# the reversed text, which is linear and gives the same answer.
_QUADRATIC_WORK: Final = 4_000_000


def _search_is_costly(text: str, needle: Any) -> bool:
    return isinstance(needle, str) and len(text) * len(needle) > _QUADRATIC_WORK


def _find_args(sub: Any, start: Any = None, end: Any = None, /) -> tuple[Any, Any, Any]:
    return sub, start, end


def _split_args(sep: Any = None, maxsplit: Any = -1) -> tuple[Any, Any]:
    return sep, maxsplit


def _reverse_find(text: str, sub: str, start: int | None, end: int | None) -> int:
    """``text.rfind(sub, start, end)`` in linear time (CPython's index rules)."""
    n = len(text)
    if end is None or end > n:
        end = n
    elif end < 0:
        end = max(end + n, 0)
    if start is None:
        start = 0
    elif start < 0:
        start = max(start + n, 0)
    if end - start < len(sub):
        return -1
    found = text[start:end][::-1].find(sub[::-1])
    return -1 if found < 0 else end - found - len(sub)


def _linear_rfind(text: str, args: tuple[Any, ...]) -> int | None:
    """The rfind result when the native search would be costly, else None (use the native)."""
    try:
        sub, start, end = _find_args(*args)
    except TypeError:
        return None
    if not _search_is_costly(text, sub) or not all(
        index is None or isinstance(index, int) for index in (start, end)
    ):
        return None
    return _reverse_find(text, sub, start, end)


def _str_rfind(env: PromptEnvironment, text: str, *args: Any) -> int:
    found = _linear_rfind(text, args)
    return text.rfind(*args) if found is None else found


def _str_rindex(env: PromptEnvironment, text: str, *args: Any) -> int:
    found = _linear_rfind(text, args)
    if found is None:
        return text.rindex(*args)
    if found < 0:
        raise ValueError("substring not found")
    return found


def _str_rpartition(env: PromptEnvironment, text: str, *args: Any) -> tuple[str, str, str]:
    if len(args) == 1 and args[0] and _search_is_costly(text, args[0]):
        sep: str = args[0]
        found = _reverse_find(text, sep, None, None)
        if found < 0:
            return "", "", text
        return text[:found], sep, text[found + len(sep) :]
    return text.rpartition(*args)


def _str_rsplit(env: PromptEnvironment, text: str, *args: Any, **kwargs: Any) -> list[str]:
    try:
        sep, maxsplit = _split_args(*args, **kwargs)
    except TypeError:
        sep = maxsplit = None
    if sep and isinstance(maxsplit, int) and _search_is_costly(text, sep):
        # Splitting the reversed text from the left finds the same separators, rightmost first.
        return [part[::-1] for part in reversed(text[::-1].split(sep[::-1], maxsplit))]
    return text.rsplit(*args, **kwargs)


def _bounded_strip(text: str, chars: Any, method: str) -> str:
    """``text.strip(chars)`` (or lstrip/rstrip) without CPython's len(text) * len(chars) scan."""
    if not isinstance(chars, str) or len(text) * len(chars) <= _QUADRATIC_WORK:
        return cast(str, getattr(text, method)(chars))
    chars = "".join(set(chars))  # repeated characters are what usually makes the set long
    if len(text) * len(chars) <= _QUADRATIC_WORK:
        return cast(str, getattr(text, method)(chars))
    members = frozenset(chars)
    start, end = 0, len(text)
    if method != "rstrip":
        while start < end and text[start] in members:
            start += 1
    if method != "lstrip":
        while end > start and text[end - 1] in members:
            end -= 1
    return text[start:end]


def _str_strip(method: str) -> Callable[..., str]:
    def strip(env: PromptEnvironment, text: str, *args: Any) -> str:
        if len(args) == 1:
            return _bounded_strip(text, args[0], method)
        return cast(str, getattr(text, method)(*args))

    return strip


def _bounded_join(env: PromptEnvironment, separator: str, items: Iterable[Any], what: str) -> str:
    limit = env.current_limits().max_string_length
    parts = [item if type(item) is str else str(item) for item in items]
    # Measuring after converting is safe: each part is an existing string or the str() of a
    # value whose deep size was bounded when it was built.
    total = sum(map(len, parts)) + len(separator) * max(len(parts) - 1, 0)
    if total > limit:
        check_string_length(total, env.current_limits(), what)
    return separator.join(parts)


def _str_join(env: PromptEnvironment, separator: str, *args: Any) -> str:
    if len(args) != 1:
        return separator.join(*args)  # raises Python's own TypeError
    # str.join refuses non-strings; keep that rather than silently converting like |join.
    materialised = list(args[0])
    if not all(isinstance(item, str) for item in materialised):
        return separator.join(materialised)  # raises Python's own TypeError
    return _bounded_join(env, separator, materialised, "str.join")


_BOUNDED_STR_METHODS: Final[dict[str, Callable[..., Any]]] = {
    "center": _str_pad("center"),
    "ljust": _str_pad("ljust"),
    "rjust": _str_pad("rjust"),
    "zfill": _str_pad("zfill"),
    "expandtabs": _str_expandtabs,
    "replace": _str_replace,
    "join": _str_join,
    "rfind": _str_rfind,
    "rindex": _str_rindex,
    "rpartition": _str_rpartition,
    "rsplit": _str_rsplit,
    "strip": _str_strip("strip"),
    "lstrip": _str_strip("lstrip"),
    "rstrip": _str_strip("rstrip"),
    **{
        method: _str_case(method)
        for method in ("upper", "lower", "casefold", "swapcase", "title", "capitalize")
    },
}


# -- bounded filters -----------------------------------------------------------------------


def _limits_of(env: Any) -> RenderLimits:
    return cast(PromptEnvironment, env).current_limits()


def _charged(result: str) -> str:
    # Callers have already checked the length (usually before building the string).
    charge_value(result)
    return result


@pass_environment
def _center_filter(env: Any, value: Any, width: int = 80) -> str:
    if isinstance(width, int):
        check_string_length(width, _limits_of(env), "the center filter")
    return _charged(do_center(value, width))


@pass_environment
def _indent_filter(
    env: Any, s: Any, width: int | str = 4, first: bool = False, blank: bool = False
) -> str:
    text = str(s)
    pad = len(width) if isinstance(width, str) else max(width, 0) if isinstance(width, int) else 0
    limits = _limits_of(env)
    check_string_length(pad, limits, "the indent filter")
    lines = len(text.splitlines()) + 1
    check_string_length(len(text) + lines * pad, limits, "the indent filter")
    return _charged(do_indent(text, width, first, blank))


@pass_environment
def _wordwrap_filter(
    env: Any,
    s: Any,
    width: int = 79,
    break_long_words: bool = True,
    wrapstring: str | None = None,
    break_on_hyphens: bool = True,
) -> str:
    # Jinja's wordwrap joins with ``wrapstring`` before anything can look at the size; this
    # is the same algorithm with the size known before each join.
    separator = cast(str, env.newline_sequence) if wrapstring is None else str(wrapstring)
    limits = _limits_of(env)
    budget = CURRENT_BUDGET.get()
    paragraphs: list[str] = []
    total = 0
    for line in str(s).splitlines():
        if budget is not None:
            budget.check_deadline()
        if break_long_words and isinstance(width, int) and width > 0:
            _check_long_words(line, width, limits)
        wrapped = textwrap.wrap(
            line,
            width=width,
            expand_tabs=False,
            replace_whitespace=False,
            break_long_words=break_long_words,
            break_on_hyphens=break_on_hyphens,
        )
        total += sum(map(len, wrapped)) + len(separator) * len(wrapped)
        check_string_length(total, limits, "the wordwrap filter")
        paragraphs.append(separator.join(wrapped))
    return _charged(separator.join(paragraphs))


def _check_long_words(line: str, width: int, limits: RenderLimits) -> None:
    """Refuse wrapping that would take textwrap quadratic time.

    textwrap breaks a word longer than ``width`` by re-slicing the rest of the word for every
    line it fills: about ``len(word) ** 2 / width`` characters copied, 10**12 for a
    million-character word at width 1, and all of it in one uninterruptible call.
    """
    if len(line) <= width * 64:
        return  # at most 64 * len(line) copied: linear enough
    cost = sum(len(word) * len(word) // width for word in line.split() if len(word) > width)
    if cost > 50 * limits.max_string_length:
        raise limit_error(
            f"wordwrap at width {width} would split words of this text too many times; "
            "use a larger width or break_long_words=false"
        )


@pass_environment
def _format_filter(env: Any, value: Any, *args: Any, **kwargs: Any) -> str:
    limits = _limits_of(env)
    check_percent_format(str(value), limits)
    # The arguments' own length adds up too: '%s%s'|format(x, x) doubles x.
    return account_text(do_format(value, *args, **kwargs), limits, "the format filter")


@pass_environment
def _replace_filter(env: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    text, old_text, new_text = str(s), str(old), str(new)
    limit = -1 if count is None else count
    check_string_length(
        _replaced_size(text, old_text, new_text, limit), _limits_of(env), "the replace filter"
    )
    return _charged(text.replace(old_text, new_text, limit))


@pass_environment
def _join_filter(env: Any, value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
    items = value if attribute is None else map(make_attrgetter(env, attribute), value)
    return _charged(_bounded_join(cast(PromptEnvironment, env), str(d), items, "the join filter"))


@pass_environment
def _batch_filter(env: Any, value: Iterable[Any], linecount: int, fill_with: Any = None) -> Any:
    if isinstance(linecount, int):
        limits = _limits_of(env)
        check_sequence_length(linecount, limits, "the batch filter")
        _check_fill(fill_with, linecount, limits, "the batch filter")
    return do_batch(value, linecount, fill_with)


@pass_environment
def _slice_filter(env: Any, value: Any, slices: int, fill_with: Any = None) -> Any:
    if isinstance(slices, int):
        limits = _limits_of(env)
        # Every slice is a list, even an empty one: as many as range() may produce.
        if slices > limits.max_range:
            raise limit_error(
                f"the slice filter would make {slices} lists (limit {limits.max_range})"
            )
        _check_fill(fill_with, slices, limits, "the slice filter")
    # ``do_slice`` is Jinja's async-aware wrapper, which expects an eval context first.
    return sync_do_slice(value, slices, fill_with)


def _check_fill(fill_with: Any, times: int, limits: RenderLimits, what: str) -> None:
    # The fill value is repeated to pad the last group: the same amplification as ``[x] * n``.
    if fill_with is not None:
        deep = value_size(fill_with, limits.max_value_size)
        check_value_size(deep * max(times, 0), limits, what)


@pass_eval_context
def _tojson_filter(eval_ctx: EvalContext, value: Any, indent: int | str | None = None) -> str:
    too_wide = (isinstance(indent, int) and not 0 <= indent <= 16) or (
        isinstance(indent, str) and len(indent) > 16
    )
    if too_wide:
        raise limit_error("tojson indent must be between 0 and 16")
    # Plain str, not Markup: output is plain text and Markup would change later operations.
    result = str(do_tojson(eval_ctx, value, cast("int | None", indent)))
    # Escaping grows text (a quote becomes \"), and chained tojson compounds it.
    check_string_length(
        len(result), cast(PromptEnvironment, eval_ctx.environment).current_limits(), "tojson"
    )
    return _charged(result)


@pass_environment
def _int_filter(env: Any, value: Any, default: Any = 0, base: Any = 10) -> Any:
    if isinstance(value, str) and isinstance(base, int):
        check_int_text(value, base, _limits_of(env), "the int filter")
    try:
        return do_int(value, default, base)
    except OverflowError:  # '1e999'|int: the float fallback is infinite
        raise limit_error("the int filter was given a number too large to convert") from None


@pass_environment
def _round_filter(env: Any, value: Any, precision: Any = 0, method: Any = "common") -> Any:
    # Rounding computes 10 ** precision: 5|round(-10**7) builds a 33-million-bit number.
    if isinstance(precision, int):
        check_int_bits(abs(precision) * 10 // 3, _limits_of(env), "the round filter")
    return do_round(value, precision, method)


@pass_environment
def _trim_filter(env: Any, value: Any, chars: Any = None) -> str:
    if chars is None:
        return do_trim(value, chars)
    return _bounded_strip(str(value), chars, "strip")


@pass_environment
def _sum_filter(env: Any, iterable: Iterable[Any], attribute: Any = None, start: Any = 0) -> Any:
    # Summing lists is quadratic (every step copies); summing strings is refused by Python.
    if type(start) not in (int, float, bool):
        raise TypeError("the sum filter adds numbers; use the join filter for text")
    return do_sum(env, iterable, attribute, start)


_BOUNDED_FILTERS: Final[dict[str, Callable[..., Any]]] = {
    "center": _center_filter,
    "indent": _indent_filter,
    "wordwrap": _wordwrap_filter,
    "format": _format_filter,
    "replace": _replace_filter,
    "join": _join_filter,
    "batch": _batch_filter,
    "slice": _slice_filter,
    "tojson": _tojson_filter,
    "sum": _sum_filter,
    "int": _int_filter,
    "round": _round_filter,
    "trim": _trim_filter,
}


# -- rendering -----------------------------------------------------------------------------


def render_bounded(
    template: PromptTemplate,
    values: dict[str, Any],
    limits: RenderLimits,
    resolve: Callable[[str], str | None] | None,
    *,
    name: str | None,
    version: int | str | None = None,
) -> str:
    """Render ``template`` with already-sanitised ``values`` under ``limits``.

    Output is pulled chunk by chunk from the template's generator so the output cap and the
    deadline are enforced as text is produced, not after it has all been built: the cap on
    every chunk, the deadline every ``_BATCH`` chunks and every ``_CHARS_PER_CHECK`` characters
    (between chunks, the operations that made them read it themselves).
    """
    budget = Budget(limits, resolve)
    token = CURRENT_BUDGET.set(budget)
    cap = limits.max_output_bytes
    parts: list[str] = []
    append = parts.append
    size = 0
    next_check = _CHARS_PER_CHECK
    try:
        stream = cast(
            "Generator[str, None, None]", template.root_render_func(template.new_context(values))
        )
        try:
            # A plain loop costs about what islice batches did (~10 ns a chunk more) and
            # meters every chunk instead of every sixteenth.
            for chunk in stream:
                size += len(chunk)
                if size > cap:
                    # Characters never outnumber UTF-8 bytes, so this is already over.
                    raise limit_error(f"the output is over the limit of {cap} bytes")
                append(chunk)
                if size > next_check or not len(parts) % _BATCH:
                    budget.check_deadline()
                    next_check = size + _CHARS_PER_CHECK
        finally:
            stream.close()
    except Exception as exc:  # a template can make any Python operation fail
        raise translate_error(exc, template, name=name, version=version) from exc
    finally:
        CURRENT_BUDGET.reset(token)
    text = "".join(parts)
    if size * 4 > cap and len(text.encode("utf-8", "surrogatepass")) > cap:
        raise limit_error(f"the output is over the limit of {cap} bytes").located(
            template=name, version=version
        )
    return text


def _template_frames(exc: BaseException) -> list[tuple[Template, int]]:
    frames: list[tuple[Template, int]] = []
    tb = exc.__traceback__
    while tb is not None:
        template = tb.tb_frame.f_globals.get("__jinja_template__")
        if isinstance(template, Template):
            frames.append((template, template.get_corresponding_lineno(tb.tb_lineno)))
        tb = tb.tb_next
    return frames


def translate_error(
    exc: BaseException,
    template: Template | None,
    *,
    name: str | None,
    version: int | str | None = None,
) -> TemplateError:
    """Turn whatever a render raised into a :class:`TemplateError` naming template and line."""
    frames = _template_frames(exc)
    top_lines = [line for owner, line in frames if owner is template]
    lineno = top_lines[-1] if top_lines else None
    prefix = ""
    if frames and frames[-1][0] is not template:
        inner, inner_line = frames[-1]
        prefix = f"in included template {inner.name!r}, line {inner_line}: "
    located = functools.partial(_located, template=name, version=version, lineno=lineno)

    if isinstance(exc, TemplateError):
        if not prefix:
            return exc.located(template=name, version=version, lineno=lineno)
        return located(
            type(exc)(
                prefix + exc.detail,
                template=exc.template,
                version=exc.version,
                lineno=exc.lineno,
                hint=exc.hint,
            )
        )
    if isinstance(exc, JinjaTemplateNotFound):
        return located(TemplateNotFound(f"{prefix}included template {exc.name!r} does not exist"))
    if isinstance(exc, TemplateSyntaxError):
        if exc.name is not None and exc.name != name:
            prefix = f"in included template {exc.name!r}, line {exc.lineno}: "
        return located(TemplateValidationError(f"{prefix}{exc.message or 'syntax error'}"))
    if isinstance(exc, UndefinedError):
        return located(
            TemplateRenderError(
                f"{prefix}{_plain_text(exc.message or 'a value is undefined')}",
                hint="pass the variable, or guard it with 'is defined' or the default filter",
            )
        )
    if isinstance(exc, SecurityError):
        return located(
            TemplateRenderError(
                f"{prefix}unsafe operation refused: {_plain_text(str(exc))}",
                hint="templates may only read plain data and call allowed methods",
            )
        )
    if isinstance(exc, TemplateRuntimeError):
        return located(TemplateRenderError(f"{prefix}{_plain_text(str(exc))}"))
    if isinstance(exc, RecursionError):
        return located(
            TemplateLimitError(f"{prefix}templates nest too deeply (an include or macro cycle?)")
        )
    if isinstance(exc, MemoryError):
        return located(TemplateLimitError(f"{prefix}rendering ran out of memory"))
    # Python's own message (a TypeError, ZeroDivisionError, ...), minus internal names.
    kind = type(exc)
    label = f"{kind.__name__}: " if kind.__module__ == "builtins" else ""
    return located(TemplateRenderError(f"{prefix}{label}{_plain_text(str(exc))}"))


def _located(
    error: TemplateError,
    *,
    template: str | None,
    version: int | str | None,
    lineno: int | None,
) -> TemplateError:
    return error.located(template=template, version=version, lineno=lineno)
