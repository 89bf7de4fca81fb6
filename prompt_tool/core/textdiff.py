"""Unified diffs of two texts that print as `diff` and `git diff` print them."""

from __future__ import annotations

import difflib
from collections.abc import Iterator

__all__ = ["unified_diff"]

_NO_NEWLINE = "\\ No newline at end of file\n"


def _lines(diff: Iterator[str]) -> Iterator[str]:
    for line in diff:
        if line.endswith("\n"):
            yield line
        elif line.splitlines() != [line]:  # ends in another line break (\r, \u2028, ...)
            yield line + "\n"
        else:  # the text's last line, without a line break: said, not run into the next
            yield line + "\n"
            yield _NO_NEWLINE


def unified_diff(old: str, new: str, fromfile: str, tofile: str, *, context: int = 3) -> str:
    """The unified diff of ``old`` and ``new`` (empty when they are equal). A last line without
    a newline is followed by ``\\ No newline at end of file``, so it never runs into the line
    after it."""
    return "".join(
        _lines(
            difflib.unified_diff(
                old.splitlines(keepends=True),
                new.splitlines(keepends=True),
                fromfile,
                tofile,
                n=context,
            )
        )
    )
