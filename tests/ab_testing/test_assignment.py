"""Assignment is a pure function of (test, unit, weights): stable everywhere, honouring weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from prompt_tool.ab_testing import choose_variant, unit_point
from prompt_tool.errors import InvalidInputError

UNITS = [f"user-{n}" for n in range(500)] + ["", "ü-ñ-☃", "42"]
CASES = [(1, [50, 50]), (7, [50, 30, 20]), (123_456_789, [1, 3])]

_SUBPROCESS = """
import json, sys
from prompt_tool.ab_testing import choose_variant
cases, units = json.load(sys.stdin)
print(json.dumps([[choose_variant(t, u, w) for u in units] for t, w in cases]))
"""


def test_same_unit_gets_the_same_variant_in_another_process_with_another_hash_seed() -> None:
    here = [[choose_variant(t, u, w) for u in UNITS] for t, w in CASES]
    other = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS],
        input=json.dumps([CASES, UNITS]),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert json.loads(other.stdout) == here


def test_assignment_is_pinned_so_a_release_never_reshuffles_running_tests() -> None:
    # The first 8 bytes of sha256(b"1:user-0") are e3f053053bfdaf74.
    assert unit_point(1, "user-0") == 0xE3F053053BFDAF74
    assert [choose_variant(7, f"user-{n}", [50, 30, 20]) for n in range(12)] == [
        0,
        1,
        0,
        0,
        0,
        0,
        2,
        0,
        0,
        0,
        2,
        0,
    ]


@pytest.mark.parametrize("weights", [[50, 50], [50, 30, 20], [1, 3], [90, 5, 3, 2]])
def test_weights_are_honoured_within_one_point_over_100000_units(weights: list[int]) -> None:
    units = 100_000
    counts = Counter(choose_variant(17, f"session-{n}", weights) for n in range(units))
    total = sum(weights)
    for index, weight in enumerate(weights):
        assert abs(counts[index] / units - weight / total) < 0.01, (index, counts)


def test_each_test_shuffles_units_independently() -> None:
    first = [choose_variant(1, f"u{n}", [1, 1]) for n in range(2_000)]
    second = [choose_variant(2, f"u{n}", [1, 1]) for n in range(2_000)]
    agreement = sum(a == b for a, b in zip(first, second, strict=True)) / len(first)
    assert 0.45 < agreement < 0.55


def test_scaling_all_weights_keeps_every_unit_where_it_was() -> None:
    units = [f"u{n}" for n in range(2_000)]
    assert [choose_variant(3, u, [1, 2]) for u in units] == [
        choose_variant(3, u, [10, 20]) for u in units
    ]


@pytest.mark.parametrize("weights", [[], [0, 1], [-1, 2], [True, 1]])
def test_weights_must_be_whole_numbers_of_at_least_one(weights: list[int]) -> None:
    with pytest.raises(InvalidInputError, match="weights"):
        choose_variant(1, "u", weights)
