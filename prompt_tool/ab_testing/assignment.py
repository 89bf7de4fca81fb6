"""Deterministic assignment: the same (test, unit) always gets the same variant, in any process.

No shared state and no randomness: the variant follows from SHA-256 of ``"<test id>:<unit key>"``
(not Python's ``hash``, which is salted per process). The first 64 bits of the digest, as an
unsigned big-endian integer ``h``, pick a point ``h * total_weight >> 64`` in ``[0, total)``;
the variant is the one whose slice of the cumulative weights holds the point. Every unit is
equally likely to land on each of the ``total`` points (to within 2**-64), so the variants get
their weights' shares of the units. Hashing the test id in makes tests independent: a unit on
the first variant of one test is not thereby on the first variant of the next.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from prompt_tool.errors import InvalidInputError

__all__ = ["MAX_UNIT_KEY_LENGTH", "check_unit_key", "choose_variant", "unit_point"]

MAX_UNIT_KEY_LENGTH = 200  # ab_assignments.unit_key is VARCHAR(200)
_BITS = 64


def check_unit_key(unit_key: str) -> str:
    """``unit_key`` if it can be stored; :class:`InvalidInputError` otherwise."""
    if not unit_key or len(unit_key) > MAX_UNIT_KEY_LENGTH:
        raise InvalidInputError(
            f"unit key {unit_key[:40]!r} must be 1 to {MAX_UNIT_KEY_LENGTH} characters; "
            "pass a stable id of the user or conversation, or none to use the session id"
        )
    return unit_key


def unit_point(test_id: int, unit_key: str) -> int:
    """The unit's stable 64-bit position for this test (uniform over ``0 .. 2**64 - 1``)."""
    digest = hashlib.sha256(f"{test_id}:{unit_key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[: _BITS // 8], "big")


def choose_variant(test_id: int, unit_key: str, weights: Sequence[int]) -> int:
    """The index (into ``weights``, in the test's variant order) of the unit's variant."""
    if not weights or any(isinstance(w, bool) or int(w) != w or w < 1 for w in weights):
        raise InvalidInputError(f"variant weights {list(weights)!r} must be whole numbers >= 1")
    point = (unit_point(test_id, unit_key) * sum(weights)) >> _BITS
    for index, weight in enumerate(weights):
        if point < weight:
            return index
        point -= weight
    raise AssertionError("unreachable: the point lies below the total weight")
