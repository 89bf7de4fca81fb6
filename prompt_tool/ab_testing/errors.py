"""A/B testing's errors: bad input to the library (exit code 2), each saying what to do."""

from __future__ import annotations

from prompt_tool.errors import InvalidInputError

__all__ = ["ABTestConflictError", "ABTestFrozenError", "ABTestStateError"]


class ABTestStateError(InvalidInputError):
    """The test is not in a state that allows this (start a stopped test, promote a draft)."""


class ABTestFrozenError(ABTestStateError):
    """The test has run, so its variants and weights can no longer change."""


class ABTestConflictError(ABTestStateError):
    """Another test of the same template, role and project is already running."""
