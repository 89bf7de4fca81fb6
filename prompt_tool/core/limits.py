"""Resource limits for rendering and the per-render budget that enforces them.

A hostile or careless template must fail fast instead of eating memory or CPU. Each guard in the
sandbox asks the *current* budget (a context variable set for the duration of one render) what
the limits are and how much has been spent; outside a render (compilation, direct use of the
environment) the guards fall back to the environment's default limits and no deadline.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import chain, compress
from typing import TYPE_CHECKING, Any, cast

from prompt_tool.core.errors import TemplateLimitError
from prompt_tool.settings import RENDER_LIMIT_FIELDS, Settings

if TYPE_CHECKING:
    from jinja2 import Template

__all__ = ["RenderLimits"]

#: The share of ``timeout_s`` a render itself may use. The rest is headroom for what the same
#: request does around the render (compiling the source and its includes, validating, reading
#: and storing in the database), so that the whole request, not only the render, finishes
#: within ``timeout_s``: with the default 2 s a render is stopped at 1.5 s.
RENDER_SHARE = 0.75

# What containers cost in memory (64-bit CPython, garbage-collector header included), used to
# charge what a template builds in bytes: sys.getsizeof of an empty list is 56 (+16 for the
# GC header), each item a pointer of 8; a str is 49 bytes plus one to four per character.
LIST_BYTES = 72
TUPLE_BYTES = 56
DICT_BYTES = 80
ITEM_BYTES = 8
DICT_ITEM_BYTES = 40
STR_BYTES = 49


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """What one render may spend. Defaults follow :class:`~prompt_tool.settings.Settings`."""

    #: Cap on the rendered text, in UTF-8 bytes.
    max_output_bytes: int = 1024 * 1024
    #: Wall-clock budget for one render request, in seconds. The render itself is stopped at
    #: ``RENDER_SHARE`` of it (1.5 s of the default 2 s); the rest is headroom for compiling,
    #: validating and database time, so the request as a whole finishes within it.
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
    #: Total bytes (approximate, CPython's object sizes: a string is 49 bytes plus its
    #: characters, a list 72 plus 8 per item, each new nested list, tuple or dict counted too)
    #: that all operations of one render may produce, temporaries included. Each operation is
    #: bounded on its own; this stops a template from building gigabytes out of thousands of
    #: bounded results, kept or thrown away.
    max_allocated: int = 32 * 1024 * 1024
    #: Largest list or dict a template may build, counted deeply: items plus the characters of
    #: the strings inside, a shared value counted each time it appears. ``[x] * 1000`` is
    #: small in memory but costs 1000 times ``x`` to print, compare, hash or serialise, and
    #: those run in C where no deadline can stop them.
    max_value_size: int = 4_000_000

    def __post_init__(self) -> None:
        for name in ("max_output_bytes", *RENDER_LIMIT_FIELDS):
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
        "deadline",
        "depth",
        "limits",
        "loaded",
        "memo_bytes",
        "modules",
        "resolve",
        "sizes",
    )

    def __init__(
        self, limits: RenderLimits, resolve: Callable[[str], str | None] | None = None
    ) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout_s * RENDER_SHARE
        self.resolve = resolve
        self.depth = 0
        self.buffered = 0
        self.buffer_cap = limits.max_buffered_chars
        self.allocated = 0
        self.allocation_cap = limits.max_allocated
        #: Deep sizes of large containers already measured, by id, with the container (holding
        #: it keeps the id valid; containers never change in the sandbox, so entries never go
        #: stale). What the memo keeps alive is bounded: past ``_MEMO_MAX_BYTES`` of held
        #: containers it is emptied, so the accounting never holds a render's garbage.
        self.sizes: dict[int, tuple[object, int]] | None = None
        self.memo_bytes = 0
        #: Included/imported templates already loaded by this render, by name.
        self.loaded: dict[str, Template] | None = None
        #: Default modules of imported templates, per render (see PromptTemplate).
        self.modules: dict[int, Any] | None = None

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise self.deadline_error()

    def deadline_error(self) -> TemplateLimitError:
        return limit_error(f"rendering took longer than the {self.limits.timeout_s:g} s limit")

    def buffer_overflow(self) -> TemplateLimitError:
        return limit_error(
            f"the template built more than {self.buffer_cap} characters in macros and blocks"
        )

    def tick(self) -> None:
        """Count one unit of per-item work (a lookup, a test): reads the clock every time."""
        if time.monotonic() > self.deadline:
            raise self.deadline_error()

    def guarded(self, iterable: Iterable[Any]) -> Iterable[Any]:
        """``iterable`` with the clock read every ``LOOP_CHECK_EVERY`` items."""
        return _Guarded(self, iterable)


# Loop items handed out between two clock reads. The count runs in C (``compress`` over a
# chain of blocks of ``True``; the block generator reads the clock each time it is resumed),
# so the guard costs ~25 ns per item instead of a Python step each. The deadline can be
# overrun by at most this many loop bodies, and a body's filters, calls and includes read the
# clock themselves: eight of the cheapest bodies take microseconds, far below 10 ms.
LOOP_CHECK_EVERY = 8
_TICKS = (True,) * LOOP_CHECK_EVERY
_SIZED = frozenset({list, tuple, range, str, dict})


class _Guarded:
    """An iterable that reads the clock every ``LOOP_CHECK_EVERY`` items handed out.

    Sized iterables keep their length, so ``loop.length`` stays O(1). For an unsized one
    (a generator from ``map`` or ``select``) ``len()`` lists what is left and the running
    iteration carries on over that list: Jinja's own ``loop.length`` would list it and then
    iterate the list directly, dropping the guard.
    """

    __slots__ = ("_budget", "_iterable", "_iterator", "_pulled", "_sized")

    def __init__(self, budget: Budget, iterable: Iterable[Any]) -> None:
        self._budget = budget
        self._iterable = iterable
        self._iterator: Iterator[Any] | None = None
        self._pulled = 0
        self._sized = type(iterable) in _SIZED or hasattr(iterable, "__len__")
        if not self._sized:
            self._iterator = iter(iterable)

    def __len__(self) -> int:
        if self._iterator is None:
            return len(self._iterable)  # type: ignore[arg-type]
        rest = list(self._iterator)
        self._iterator = iter(rest)
        return self._pulled + len(rest)

    def __iter__(self) -> Iterator[Any]:
        items = self._iterable if self._sized else self._lazy()
        return compress(items, chain.from_iterable(self._ticks()))

    def _ticks(self) -> Iterator[tuple[bool, ...]]:
        clock = time.monotonic
        budget = self._budget
        deadline = budget.deadline
        while True:
            yield _TICKS
            # Resumed when the next block of items is asked for: after their loop bodies ran.
            if clock() > deadline:
                raise budget.deadline_error()

    def _lazy(self) -> Iterator[Any]:
        while True:
            current = self._iterator
            assert current is not None
            for item in current:
                self._pulled += 1
                yield item
                if self._iterator is not current:
                    break  # len() listed the rest: carry on over that list
            else:
                return


#: The budget of the render running in this thread / task, if any.
CURRENT_BUDGET: ContextVar[Budget | None] = ContextVar("prompt_tool_render_budget", default=None)


def charge(amount: int) -> None:
    """Count ``amount`` bytes produced against the render's allocation cap."""
    budget = CURRENT_BUDGET.get()
    if budget is not None:
        budget.allocated += amount
        if budget.allocated > budget.allocation_cap:
            raise allocation_error(budget)


def allocation_error(budget: Budget) -> TemplateLimitError:
    return limit_error(
        f"the template built more than {budget.allocation_cap} bytes of values in total "
        "(temporaries included)"
    )


def shallow_bytes(value: object) -> int:
    """Approximate bytes of ``value`` itself, not counting the items it refers to."""
    kind = type(value)
    if kind is str:
        return sys.getsizeof(value)
    if kind is list:
        return LIST_BYTES + ITEM_BYTES * len(cast("list[object]", value))
    if kind is tuple:
        return TUPLE_BYTES + ITEM_BYTES * len(cast("tuple[object, ...]", value))
    if kind is dict:
        return DICT_BYTES + DICT_ITEM_BYTES * len(cast("dict[object, object]", value))
    return 0


def charge_value(value: object) -> None:
    """Charge a value an operation just built: its own bytes (items it shares are not new)."""
    charge(shallow_bytes(value))


def account_text(text: str, fallback: RenderLimits, what: str) -> str:
    """Check a produced string against the length limit and charge it, in one lookup."""
    budget = CURRENT_BUDGET.get()
    size = len(text)
    if budget is None:
        check_string_length(size, fallback, what)
        return text
    if size > budget.limits.max_string_length:
        check_string_length(size, budget.limits, what)
    budget.allocated += sys.getsizeof(text)
    if budget.allocated > budget.allocation_cap:
        raise allocation_error(budget)
    return text


# Containers smaller than this are measured again rather than remembered: cheap to walk, and
# remembering every small literal built in a loop would itself grow without bound.
_MEMO_MIN_SIZE = 1024
# Bytes of containers remembered since the memo was last purged. Past this, entries that
# nothing but the memo still refers to (the render's garbage) are dropped: the accounting
# never keeps more than about this much alive.
_MEMO_MAX_BYTES = 4 * 1024 * 1024


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
    return _deep_size(value, limit, budget, {}, [0])


def value_cost(value: object, limit: int) -> tuple[int, int]:
    """``value_size`` and the approximate bytes of ``value``, counted deeply.

    The bytes are those of each distinct list, tuple and dict inside (once each; one measured
    earlier in the render is not new and counts nothing) plus each string where it appears:
    what a filter that builds nested values (``batch``, ``groupby``, ``list`` of a string)
    costs in memory, which items and characters alone undercount ten times over.
    """
    kind = type(value)
    if kind is str:
        return 1 + len(cast(str, value)), sys.getsizeof(value)
    if kind is not list and kind is not tuple and kind is not dict:
        return 1, 0
    spent = [0]
    size = _deep_size(value, limit, CURRENT_BUDGET.get(), {}, spent)
    return size, spent[0]


def _deep_size(
    value: object, limit: int, budget: Budget | None, seen: dict[int, int], spent: list[int]
) -> int:
    size = len(cast("list[object]", value))
    if size > limit:
        spent[0] += shallow_bytes(value)
        return size + 1  # every item counts at least one: no need to look inside
    memo = budget.sizes if budget is not None else None
    if memo is not None:
        known = memo.get(id(value))
        if known is not None:
            return known[1]
    spent_before = spent[0]
    spent[0] += shallow_bytes(value)
    total = 1
    items: Iterable[object] = (
        cast("list[object]", value)
        if type(value) is not dict
        else (part for pair in cast("dict[object, object]", value).items() for part in pair)
    )
    for item in items:
        item_kind = type(item)
        if item_kind is str:
            length = len(cast(str, item))
            total += 1 + length
            # One-character Latin-1 strings are shared singletons in CPython: they cost nothing.
            if length > 1 or (length == 1 and cast(str, item) > "\xff"):
                spent[0] += sys.getsizeof(item)
        elif item_kind is list or item_kind is tuple or item_kind is dict:
            inner = seen.get(id(item))
            if inner is None:
                inner = seen[id(item)] = _deep_size(item, limit - total, budget, seen, spent)
            total += inner
        else:
            total += 1
        if total > limit:
            return total
    if total >= _MEMO_MIN_SIZE and budget is not None:
        _remember(budget, value, total, spent[0] - spent_before)
    return total


def _remember(budget: Budget, value: object, total: int, held: int) -> None:
    memo = budget.sizes
    if memo is None:
        memo = budget.sizes = {}
    budget.memo_bytes += held
    if budget.memo_bytes > _MEMO_MAX_BYTES:
        _purge(memo)
        budget.memo_bytes = held
    memo[id(value)] = (value, total)


def _purge(memo: dict[int, tuple[object, int]]) -> None:
    """Drop the entries whose container only the memo still refers to."""
    for key in list(memo):
        entry = memo[key]
        # References: the memo's tuple, ``entry[0]`` bound below, and getrefcount's argument.
        held = entry[0]
        del entry
        if sys.getrefcount(held) <= 3:
            del memo[key]
        del held


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
