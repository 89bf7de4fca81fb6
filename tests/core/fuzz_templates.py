"""Hypothesis strategies that build hostile-looking templates for the render budget fuzzer.

Templates are composed from Jinja2's grammar (literals, big integers, long strings, the binary
operators, conditionals, subscripts), the environment's filters with plausible arguments, the
string methods (the reverse searches, strips and case mappings included), for loops over
``range()`` and variables, nested loops, ``set`` blocks, macros and calls, and includes and
imports through a dict loader whose graph (cycles and missing names included) the strategy
draws. Variables are random JSON under a fixed set of names, so most expressions resolve.

Importable on its own: ``scripts/bench --fuzz`` runs the same property with many examples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import strategies as st

from prompt_tool.core import TemplateEngine
from prompt_tool.settings import Settings

__all__ = [
    "FILTER_NAMES",
    "STRING_METHODS",
    "VARIABLE_NAMES",
    "FuzzCase",
    "expressions",
    "fuzz_cases",
    "json_values",
]

Expr = st.SearchStrategy[str]

#: Top-level variable names every case defines (with random JSON values).
VARIABLE_NAMES = ("a", "b", "n", "s", "items", "d")
#: Names that loops and ``set`` bind; used before binding they are undefined (an error).
LOCAL_NAMES = ("i", "j", "x", "v0", "v1")
#: Names of the templates an include graph may hold (plus one that never exists).
TEMPLATE_NAMES = ("t0", "t1", "t2", "t3")
MISSING_TEMPLATE = "nowhere"

# Strings that stress the text operations: ligatures and sharp s grow under upper(), the
# repeated prefixes are the worst cases of naive reverse searches, surrogates cannot be encoded.
AWKWARD_TEXT = ("\ufb03", "\u00df", "\u0130", "ab" * 8, "a" * 15 + "b", "{{", "[/INST]", "\ud800")


def _filter_names() -> tuple[str, ...]:
    environment = TemplateEngine(settings=Settings()).environment
    return tuple(sorted(name for name in environment.filters if not name.startswith("_")))


FILTER_NAMES = _filter_names()

STRING_METHODS = (
    "upper",
    "lower",
    "title",
    "capitalize",
    "swapcase",
    "casefold",
    "strip",
    "lstrip",
    "rstrip",
    "find",
    "rfind",
    "index",
    "rindex",
    "count",
    "split",
    "rsplit",
    "partition",
    "rpartition",
    "replace",
    "center",
    "ljust",
    "rjust",
    "zfill",
    "expandtabs",
    "startswith",
    "endswith",
    "join",
    "format",
    "splitlines",
)


def jinja_string(text: str) -> str:
    """``text`` as a Jinja string literal (Python escapes, which Jinja's lexer accepts)."""
    return repr(text)


# -- JSON variables -------------------------------------------------------------------------

_json_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(AWKWARD_TEXT),
    st.builds(lambda piece, k: piece * k, st.sampled_from(AWKWARD_TEXT[:6]), st.integers(1, 2000)),
)

json_values: st.SearchStrategy[object] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _json_text,
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.sampled_from(("k", "title", "real", "a", "x")), children, max_size=4)
    ),
    max_leaves=20,
)


def variables() -> st.SearchStrategy[dict[str, object]]:
    return st.fixed_dictionaries({name: json_values for name in VARIABLE_NAMES})


# -- expressions ----------------------------------------------------------------------------

_small_ints = st.integers(-3, 64).map(str)
_big_ints = st.one_of(
    st.integers(-(10**40), 10**40).map(str),
    st.sampled_from(("10**100", "2**4000", "9**9", "10**6", "4096", "100000", "999999")),
)
_strings = st.one_of(
    st.text(max_size=8).map(jinja_string),
    st.sampled_from(AWKWARD_TEXT).map(jinja_string),
    # long strings, built the way a template author would
    st.builds(
        lambda piece, k: f"({jinja_string(piece)} * {k})",
        st.sampled_from((*AWKWARD_TEXT[:6], "x", " ")),
        st.sampled_from((10, 1000, 50_000, 99_999, 10**6)),
    ),
)

literals: Expr = st.one_of(
    _small_ints,
    _big_ints,
    _strings,
    st.sampled_from(("none", "true", "false", "1.5", "[]", "{}", "[1, 2, 3]", "{'k': 'v'}")),
    st.sampled_from(("range(10)", "range(1000)", "range(10000)")),
)
names: Expr = st.sampled_from(VARIABLE_NAMES + LOCAL_NAMES)
atoms: Expr = st.one_of(literals, names)

BINARY_OPERATORS = ("+", "-", "*", "**", "/", "//", "%", "~", "==", "<", "in", "and", "or")

# Arguments a filter plausibly takes (expressions); anything else gets none or one atom.
_int_arg = st.one_of(_small_ints, _big_ints)
_str_arg = _strings
_FILTER_ARGUMENTS: dict[str, Callable[[Expr], st.SearchStrategy[list[str]]]] = {
    "batch": lambda e: st.lists(_int_arg, min_size=1, max_size=1),
    "slice": lambda e: st.lists(_int_arg, min_size=1, max_size=1),
    "center": lambda e: st.lists(_int_arg, max_size=1),
    "indent": lambda e: st.lists(_int_arg, max_size=1),
    "truncate": lambda e: st.lists(_int_arg, max_size=1),
    "wordwrap": lambda e: st.lists(_int_arg, max_size=1),
    "round": lambda e: st.lists(_int_arg, max_size=1),
    "replace": lambda e: st.lists(e, min_size=2, max_size=3),
    "join": lambda e: st.lists(_str_arg, max_size=1),
    "int": lambda e: st.sampled_from(([], ["0"], ["base=16"], ["0", "2"])),
    "format": lambda e: st.lists(e, max_size=3),
    "map": lambda e: st.sampled_from((*STRING_METHODS[:8], "abs", "string", "length")).map(
        lambda name: [jinja_string(name)]
    ),
    "select": lambda e: st.sampled_from((["'odd'"], ["'string'"], ["'defined'"], [])),
    "reject": lambda e: st.sampled_from((["'even'"], ["'none'"], [])),
    "selectattr": lambda e: st.just(["'real'"]),
    "rejectattr": lambda e: st.just(["'k'"]),
    "sort": lambda e: st.sampled_from(([], ["reverse=true"], ["attribute='real'"])),
    "groupby": lambda e: st.just(["'k'"]),
    "attr": lambda e: st.sampled_from((["'real'"], ["'upper'"])),
    "default": lambda e: st.lists(e, max_size=1),
    "d": lambda e: st.lists(e, max_size=1),
    "sum": lambda e: st.sampled_from(([], ["start=[]"], ["start=0"])),
    "tojson": lambda e: st.sampled_from(([], ["indent=2"], ["indent=100000"])),
    "urlencode": lambda e: st.just([]),
}


def _one_atom_or_none(expr: Expr) -> st.SearchStrategy[list[str]]:
    return st.lists(atoms, max_size=1)


def _filter_call(expr: Expr) -> st.SearchStrategy[str]:
    def call(name: str) -> st.SearchStrategy[str]:
        arguments = _FILTER_ARGUMENTS.get(name, _one_atom_or_none)(expr)
        return st.builds(
            lambda target, args: f"({target})|{name}" + (f"({', '.join(args)})" if args else ""),
            expr,
            arguments,
        )

    return st.sampled_from(FILTER_NAMES).flatmap(call)


def _method_call(expr: Expr) -> st.SearchStrategy[str]:
    return st.builds(
        lambda target, method, args: f"({target}).{method}({', '.join(args)})",
        expr,
        st.sampled_from(STRING_METHODS),
        st.lists(st.one_of(_strings, _small_ints, _big_ints), max_size=2),
    )


def _extend(expr: Expr) -> Expr:
    return st.one_of(
        st.builds(
            lambda left, op, right: f"({left} {op} {right})",
            expr,
            st.sampled_from(BINARY_OPERATORS),
            expr,
        ),
        _filter_call(expr),
        _method_call(expr),
        st.lists(expr, max_size=4).map(lambda items: f"[{', '.join(items)}]"),
        st.lists(expr, min_size=2, max_size=3).map(lambda items: f"({', '.join(items)},)"),
        st.builds(lambda target, key: f"({target})[{key}]", expr, expr),
        st.builds(
            lambda target, attribute: f"({target}).{attribute}",
            expr,
            st.sampled_from(("k", "real", "a")),
        ),
        st.builds(
            lambda target, start, stop: f"({target})[{start}:{stop}]",
            expr,
            _small_ints,
            _small_ints,
        ),
        st.builds(lambda yes, test, no: f"({yes} if {test} else {no})", expr, expr, expr),
        expr.map(lambda inner: f"(not {inner})"),
        expr.map(lambda inner: f"(-{inner})"),
        expr.map(lambda inner: f"range({inner})"),
    )


_EXPRESSIONS: Expr = st.recursive(atoms, _extend, max_leaves=6)


def expressions() -> Expr:
    return _EXPRESSIONS


# -- statements -----------------------------------------------------------------------------

_iterables: Expr = st.one_of(
    st.sampled_from(("range(10)", "range(100)", "range(10000)", "items", "s", "d", "a", "b")),
    expressions(),
)


@functools.cache
def _body(depth: int, templates: tuple[str, ...]) -> st.SearchStrategy[str]:
    """A sequence of statements, nesting up to ``depth`` more levels of blocks."""
    return st.lists(_statement(depth, templates), min_size=1, max_size=4).map("".join)


@functools.cache
def _statement(depth: int, templates: tuple[str, ...]) -> st.SearchStrategy[str]:
    expr = expressions()
    leaves: list[st.SearchStrategy[str]] = [
        st.sampled_from(("x", " ", "\n", "text ")),
        expr.map(lambda e: f"{{{{ {e} }}}}"),
        st.builds(lambda name, e: f"{{% set {name} = {e} %}}", st.sampled_from(LOCAL_NAMES), expr),
    ]
    if templates:
        target = st.sampled_from((*templates, MISSING_TEMPLATE))
        leaves += [
            target.map(lambda t: f"{{% include {t!r} %}}"),
            target.map(lambda t: f"{{% include {t!r} ignore missing %}}"),
            st.builds(
                lambda t, e: f"{{% import {t!r} as lib %}}{{{{ lib.m({e}) }}}}", target, expr
            ),
            st.builds(
                lambda t, e: f"{{% from {t!r} import m as f %}}{{{{ f({e}) }}}}", target, expr
            ),
        ]
    if depth <= 0:
        return st.one_of(*leaves)
    inner = _body(depth - 1, templates)
    blocks = [
        st.builds(
            lambda var, it, body: f"{{% for {var} in {it} %}}{body}{{% endfor %}}",
            st.sampled_from(("i", "j", "x")),
            _iterables,
            inner,
        ),
        st.builds(
            lambda test, yes, no: f"{{% if {test} %}}{yes}{{% else %}}{no}{{% endif %}}",
            expr,
            inner,
            inner,
        ),
        st.builds(
            lambda name, body: f"{{% set {name} %}}{body}{{% endset %}}",
            st.sampled_from(LOCAL_NAMES),
            inner,
        ),
        st.builds(
            lambda body, calls: f"{{% macro g(x, n=2) %}}{body}{{% endmacro %}}{calls}",
            inner,
            st.lists(expr, min_size=1, max_size=3).map(
                lambda args: "".join(f"{{{{ g({a}) }}}}" for a in args)
            ),
        ),
        st.builds(
            lambda body: (
                f"{{% macro h() %}}[{{{{ caller() }}}}]{{% endmacro %}}"
                f"{{% call h() %}}{body}{{% endcall %}}"
            ),
            inner,
        ),
        st.builds(
            lambda name, body: f"{{% filter {name} %}}{body}{{% endfilter %}}",
            st.sampled_from(("upper", "trim", "title", "striptags", "wordcount")),
            inner,
        ),
    ]
    return st.one_of(*leaves, *blocks)


def templates(depth: int = 2, others: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    """One template source; with ``others`` it may include or import them."""
    return _body(depth, others)


# -- cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FuzzCase:
    """A template, the templates it may reach through the loader, and its variables."""

    source: str
    library: dict[str, str] = field(default_factory=dict)
    variables: dict[str, object] = field(default_factory=dict)

    def loader(self, name: str) -> str | None:
        return self.library.get(name)

    def describe(self) -> str:
        lines = [f"source: {self.source!r}"]
        lines += [f"  {name}: {text!r}" for name, text in sorted(self.library.items())]
        lines.append(f"variables: {_short(repr(self.variables))}")
        return "\n".join(lines)


def _short(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


@st.composite
def _library(draw: st.DrawFn) -> dict[str, str]:
    """A random include graph: each template may include or import any other, itself too.

    Library templates define a macro ``m`` (what the imports call) around their body.
    """
    count = draw(st.integers(0, len(TEMPLATE_NAMES)))
    present = TEMPLATE_NAMES[:count]
    library: dict[str, str] = {}
    for name in present:
        body = draw(templates(depth=1, others=present))
        shape = draw(st.sampled_from(("macro", "plain", "both")))
        if shape == "macro":
            library[name] = f"{{% macro m(x='') %}}{body}{{% endmacro %}}"
        elif shape == "plain":
            library[name] = body
        else:
            library[name] = f"{{% macro m(x='') %}}{{{{ x }}}}{body}{{% endmacro %}}{body}"
    return library


@st.composite
def fuzz_cases(draw: st.DrawFn) -> FuzzCase:
    library = draw(_library())
    source = draw(templates(depth=2, others=tuple(library)))
    return FuzzCase(source=source, library=library, variables=draw(variables()))
