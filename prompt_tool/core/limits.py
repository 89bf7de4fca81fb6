"""Resource limits for rendering and the per-render budget that enforces them.

A hostile or careless template must fail fast instead of eating memory or CPU. Each guard in the
sandbox asks the *current* budget (a context variable set for the duration of one render) what
the limits are and how much has been spent; outside a render (compilation, direct use of the
environment) the guards fall back to the environment's default limits and no deadline.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from prompt_tool.core.errors import TemplateLimitError
from prompt_tool.settings import Settings

if TYPE_CHECKING:
    from jinja2 import Template

__all__ = ["RenderLimits"]

# How many loop items / buffered writes pass between two clock reads. Reading the clock costs
# ~50 ns; every 256 steps keeps the overhead negligible and the deadline overshoot in the
# microseconds.
CLOCK_EVERY = 256


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """What one render may spend. Defaults follow :class:`~prompt_tool.settings.Settings`."""

    #: Cap on the rendered text, in UTF-8 bytes.
    max_output_bytes: int = 1024 * 1024
    #: Wall-clock budget for one render, in seconds.
    timeout_s: float = 2.0
    #: Most items ``range()`` may produce.
    max_range: int = 10_000
    #: Longest string any single operation (``*``, ``+``, ``~``, a filter, a method) may build.
    max_string_length: int = 1_000_000
    #: Longest list any single operation may build.
    max_sequence_length: int = 1_000_000
    #: Largest integer, in bits, that ``*``, ``**`` and the ``int`` filter may produce; ``//``
    #: and ``%`` refuse operands whose bit lengths multiply to more than its square.
    max_int_bits: int = 4096
    #: Deepest nesting of calls: macros calling macros, recursive ``loop()``, ``caller()``.
    max_call_depth: int = 64
    #: Total characters written into intermediate buffers (macro bodies, ``{% set %}`` blocks,
    #: call and filter blocks, imported modules). Text passing through nested macros is counted
    #: once per level, hence a multiple of the output cap.
    max_buffered_chars: int = 16 * 1024 * 1024
    #: Total characters and list items that all operations of one render may produce,
    #: temporaries included. Each operation is bounded on its own; this stops a template from
    #: keeping thousands of bounded results alive at once.
    max_allocated: int = 16_000_000
    #: Largest list or dict a template may build, counted deeply: items plus the characters of
    #: the strings inside, a shared value counted each time it appears. ``[x] * 1000`` is
    #: small in memory but costs 1000 times ``x`` to print, compare, hash or serialise, and
    #: those run in C where no deadline can stop them.
    max_value_size: int = 4_000_000

    def __post_init__(self) -> None:
        for name in (
            "max_output_bytes",
            "max_range",
            "max_string_length",
            "max_sequence_length",
            "max_int_bits",
            "max_call_depth",
            "max_buffered_chars",
            "max_allocated",
            "max_value_size",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"RenderLimits.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.timeout_s, int | float) or not self.timeout_s > 0:
            raise ValueError(f"RenderLimits.timeout_s must be positive, got {self.timeout_s!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> RenderLimits:
        return cls(
            max_output_bytes=settings.template_max_output_bytes,
            timeout_s=settings.template_render_timeout_s,
            **settings.template_limits,
        )


def limit_error(detail: str) -> TemplateLimitError:
    return TemplateLimitError(detail)


class Budget:
    """What one render has spent so far. Lives in :data:`CURRENT_BUDGET` while rendering.

    A plain slotted class rather than a dataclass: one is built per render, on the hot path.
    """

    __slots__ = (
        "allocated",
        "allocation_cap",
        "buffer_cap",
        "buffered",
        "calls",
        "deadline",
        "depth",
        "limits",
        "loaded",
        "modules",
        "resolve",
        "sizes",
    )

    def __init__(
        self, limits: RenderLimits, resolve: Callable[[str], str | None] | None = None
    ) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout_s
        self.resolve = resolve
        self.depth = 0
        self.calls = 0
        self.buffered = 0
        self.buffer_cap = limits.max_buffered_chars
        self.allocated = 0
        self.allocation_cap = limits.max_allocated
        #: Deep sizes of large containers already measured, by id (holding the object keeps
        #: the id valid). Containers never change in the sandbox, so entries never go stale.
        self.sizes: dict[int, tuple[object, int]] | None = None
        #: Included/imported templates already loaded by this render, by name.
        self.loaded: dict[str, Template] | None = None
        #: Default modules of imported templates, per render (see PromptTemplate).
        self.modules: dict[int, Any] | None = None

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise limit_error(f"rendering took longer than the {self.limits.timeout_s:g} s limit")

    def buffer_overflow(self) -> TemplateLimitError:
        return limit_error(
            f"the template built more than {self.buffer_cap} characters in macros and blocks"
        )

    def tick(self) -> None:
        """Count one unit of per-item work; read the clock every few hundred units."""
        self.calls += 1
        if not self.calls % CLOCK_EVERY:
            self.check_deadline()

    def guarded(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """Iterate while watching the clock, so nested loops with no output still time out."""
        for n, item in enumerate(iterable, 1):
            if not n % CLOCK_EVERY:
                self.check_deadline()
            yield item


#: The budget of the render running in this thread / task, if any.
CURRENT_BUDGET: ContextVar[Budget | None] = ContextVar("prompt_tool_render_budget", default=None)


def charge(amount: int) -> None:
    """Count ``amount`` characters or items produced against the render's allocation cap."""
    budget = CURRENT_BUDGET.get()
    if budget is not None:
        budget.allocated += amount
        if budget.allocated > budget.allocation_cap:
            raise limit_error(
                f"the template produced more than {budget.allocation_cap} characters and "
                "list items in total"
            )


def account_text(text: str, fallback: RenderLimits, what: str) -> str:
    """Check a produced string against the length limit and charge it, in one lookup."""
    budget = CURRENT_BUDGET.get()
    size = len(text)
    if budget is None:
        check_string_length(size, fallback, what)
        return text
    if size > budget.limits.max_string_length:
        check_string_length(size, budget.limits, what)
    budget.allocated += size
    if budget.allocated > budget.allocation_cap:
        charge(0)  # raises with the allocation message
    return text


# Containers smaller than this are measured again rather than remembered: cheap to walk, and
# remembering every small literal built in a loop would itself grow without bound.
_MEMO_MIN_SIZE = 1024


def value_size(value: object, limit: int) -> int:
    """Deep size of ``value``: items plus string characters, shared values counted each time.

    Stops counting once past ``limit`` (the result is then some number above it), so the walk
    itself costs at most ``limit`` steps however large the value is; a value repeated inside
    a container (``[x] * n``) is measured once per walk.
    """
    kind = type(value)
    if kind is str:
        return 1 + len(cast(str, value))
    if kind is not list and kind is not tuple and kind is not dict:
        return 1
    budget = CURRENT_BUDGET.get()
    return _deep_size(value, limit, budget, {})


def _deep_size(value: object, limit: int, budget: Budget | None, seen: dict[int, int]) -> int:
    size = len(cast("list[object]", value))
    if size > limit:
        return size + 1  # every item counts at least one: no need to look inside
    memo = budget.sizes if budget is not None else None
    if memo is not None:
        known = memo.get(id(value))
        if known is not None:
            return known[1]
    total = 1
    items: Iterable[object] = (
        cast("list[object]", value)
        if type(value) is not dict
        else (part for pair in cast("dict[object, object]", value).items() for part in pair)
    )
    for item in items:
        item_kind = type(item)
        if item_kind is str:
            total += 1 + len(cast(str, item))
        elif item_kind is list or item_kind is tuple or item_kind is dict:
            inner = seen.get(id(item))
            if inner is None:
                inner = seen[id(item)] = _deep_size(item, limit - total, budget, seen)
            total += inner
        else:
            total += 1
        if total > limit:
            return total
    if total >= _MEMO_MIN_SIZE and budget is not None:
        if budget.sizes is None:
            budget.sizes = {}
        budget.sizes[id(value)] = (value, total)
    return total


def check_value_size(size: int, limits: RenderLimits, what: str) -> None:
    if size > limits.max_value_size:
        raise limit_error(
            f"{what} would build a value of deep size {size} (limit {limits.max_value_size}; "
            "shared items count each time they appear)"
        )


def check_string_length(length: int, limits: RenderLimits, what: str) -> None:
    if length > limits.max_string_length:
        raise limit_error(
            f"{what} would build a string of {length} characters (limit {limits.max_string_length})"
        )


def check_sequence_length(length: int, limits: RenderLimits, what: str) -> None:
    if length > limits.max_sequence_length:
        raise limit_error(
            f"{what} would build a list of {length} items (limit {limits.max_sequence_length})"
        )


def check_int_bits(bits: int, limits: RenderLimits, what: str) -> None:
    if bits > limits.max_int_bits:
        raise limit_error(
            f"{what} would build a number of about {bits} bits (limit {limits.max_int_bits})"
        )


_INT_PREFIX_BASES = {"0x": 16, "0o": 8, "0b": 2}


def check_int_text(text: str, base: int, limits: RenderLimits, what: str) -> None:
    """Refuse converting ``text`` to an integer of more than ``max_int_bits`` bits.

    Checked on the digits before converting: Python's own guard (4,300 digits) does not apply
    to bases 2, 4, 8, 16 and 32, where a megabyte of hex digits builds a 4-million-bit number
    whose ``//`` or ``%`` then runs for minutes. Text that is not a number (prose passed to
    ``int``) is left to the conversion, which fails fast and falls back to the default.
    """
    if len(text) * 6 <= limits.max_int_bits:
        return  # at most 6 bits per digit (base 36 is ~5.2): cannot be over, O(1)
    digits = text.strip().replace("_", "")
    if digits[:1] in ("+", "-"):
        digits = digits[1:]
    prefix = digits[:2].lower()
    if base in (0, 2, 8, 16) and prefix in _INT_PREFIX_BASES:
        base = _INT_PREFIX_BASES[prefix] if base == 0 else base
        digits = digits[2:]
    elif base == 0:
        base = 10
    if not 2 <= base <= 36:
        return  # int() refuses the base itself
    number_like = digits.isdecimal() if base <= 10 else digits.isalnum()
    if not number_like:
        return
    bits = math.ceil(len(digits.lstrip("0")) * math.log2(base))
    check_int_bits(bits, limits, what)


def _ascii_digits_end(text: str, start: int) -> int:
    end = start
    while end < len(text) and "0" <= text[end] <= "9":
        end += 1
    return end


def _number(text: str, limits: RenderLimits) -> int:
    # A 5,000-digit width would make int() itself refuse (or be slow); anything past nine
    # digits is over every sane limit anyway.
    if len(text) > 9:
        check_string_length(10**9, limits, "a format width")
    return int(text)


# A ``%`` conversion without a mapping key: flags, width, precision. ``%%`` is matched first so
# the second ``%`` of a literal percent is not read as the start of a conversion.
_PERCENT_SPEC = re.compile(r"%%|%[#0\- +]*(\*|[0-9]+)?(?:\.(\*|[0-9]+))?")


def check_percent_format(fmt: str, limits: RenderLimits) -> None:
    """Refuse ``%``-format strings whose widths/precisions would build a huge string.

    Mirrors CPython's ``%`` conversion grammar: ``%[(key)][flags][width][.precision][lhL]type``.
    ``*`` widths are refused outright: they take the width from the arguments, which is the
    classic way around a check of the format string alone.
    """
    if "%" not in fmt:
        return
    total = 0
    if "(" not in fmt:
        # No mapping keys: a regex reads every width and precision (over-counting at worst).
        for match in _PERCENT_SPEC.finditer(fmt):
            width, precision = match.groups()
            if width == "*" or precision == "*":
                raise limit_error("'*' widths in format strings are not allowed")
            if width:
                total += _number(width, limits)
            if precision:
                total += _number(precision, limits)
        check_string_length(total, limits, "the format string's widths")
        return
    i = 0
    n = len(fmt)
    while True:
        i = fmt.find("%", i)
        if i < 0:
            break
        i += 1
        if i < n and fmt[i] == "(":
            depth = 1
            i += 1
            while i < n and depth:
                if fmt[i] == "(":
                    depth += 1
                elif fmt[i] == ")":
                    depth -= 1
                i += 1
        while i < n and fmt[i] in "#0- +":
            i += 1
        if i < n and fmt[i] == "*":
            raise limit_error("'*' widths in format strings are not allowed")
        end = _ascii_digits_end(fmt, i)
        if end > i:
            total += _number(fmt[i:end], limits)
        i = end
        if i < n and fmt[i] == ".":
            i += 1
            if i < n and fmt[i] == "*":
                raise limit_error("'*' precisions in format strings are not allowed")
            end = _ascii_digits_end(fmt, i)
            if end > i:
                total += _number(fmt[i:end], limits)
            i = end
        while i < n and fmt[i] in "hlL":
            i += 1
        i += 1  # the conversion type itself, so that "%%" is not read as two starts
    check_string_length(total, limits, "the format string's widths")


def check_format_spec(spec: str, limits: RenderLimits) -> None:
    """Refuse ``str.format`` specs (``{:>999999999}``) with huge widths or precisions.

    Every digit run in the spec is counted as if it were a width: specs are short and never
    prose, so over-counting a fill digit costs nothing.
    """
    if not spec:
        return
    total = 0
    i = 0
    while i < len(spec):
        end = _ascii_digits_end(spec, i)
        if end > i:
            total += _number(spec[i:end], limits)
            i = end
        else:
            i += 1
    check_string_length(total, limits, "the format spec")
