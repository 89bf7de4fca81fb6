"""The two-proportion z-test, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from prompt_tool.ab_testing import two_proportion_z_test
from prompt_tool.errors import InvalidInputError


def test_z_test_matches_a_hand_computed_example() -> None:
    # Control 40/200 = 0.20, variant 60/200 = 0.30, difference 0.10.
    # Pooled rate 100/400 = 0.25; pooled SE = sqrt(0.25 * 0.75 * (1/200 + 1/200))
    #   = sqrt(0.001875) = 0.0433013; z = 0.10 / 0.0433013 = 2.309401;
    #   p = 2 * (1 - Phi(2.309401)) = 0.020921.
    # Unpooled SE = sqrt(0.2 * 0.8 / 200 + 0.3 * 0.7 / 200) = sqrt(0.00185) = 0.0430116;
    #   95% CI = 0.10 +- 1.959964 * 0.0430116 = 0.10 +- 0.0843013 = (0.0156987, 0.1843013).
    result = two_proportion_z_test(40, 200, 60, 200)
    assert result.difference == pytest.approx(0.10)
    assert result.z == pytest.approx(2.309401, abs=1e-6)
    assert result.p_value == pytest.approx(0.020921, abs=1e-6)
    assert result.ci_low == pytest.approx(0.0156987, abs=1e-6)
    assert result.ci_high == pytest.approx(0.1843013, abs=1e-6)
    assert result.confidence == 0.95


def test_z_squared_is_the_chi_squared_of_the_two_by_two_table() -> None:
    # Pearson's chi-squared for [[40, 160], [60, 140]]: expected 50/150 in each row, so
    # chi2 = 2 * (10^2/50 + 10^2/150) = 5.333333.
    result = two_proportion_z_test(40, 200, 60, 200)
    assert result.z is not None
    assert result.z**2 == pytest.approx(16 / 3)


def test_a_wider_confidence_gives_a_wider_interval_and_the_same_p_value() -> None:
    narrow = two_proportion_z_test(40, 200, 60, 200, confidence=0.90)
    wide = two_proportion_z_test(40, 200, 60, 200, confidence=0.99)
    assert narrow.p_value == wide.p_value
    assert wide.ci_low is not None and narrow.ci_low is not None
    assert wide.ci_low < narrow.ci_low
    # 99%: 0.10 +- 2.575829 * 0.0430116
    assert wide.ci_high == pytest.approx(0.10 + 2.575829 * 0.0430116, abs=1e-6)


def test_no_data_or_no_variance_gives_no_p_value_rather_than_a_made_up_one() -> None:
    empty = two_proportion_z_test(0, 0, 3, 10)
    assert (empty.difference, empty.z, empty.p_value, empty.ci_low) == (None, None, None, None)
    all_failed = two_proportion_z_test(0, 10, 0, 12)
    assert all_failed.difference == 0.0
    assert all_failed.p_value is None
    assert (all_failed.ci_low, all_failed.ci_high) == (0.0, 0.0)


def test_identical_rates_give_p_value_one() -> None:
    result = two_proportion_z_test(5, 10, 10, 20)
    assert result.z == 0.0
    assert math.isclose(result.p_value or 0.0, 1.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [((11, 10, 1, 10), "not a proportion"), ((-1, 10, 1, 10), "not a proportion")],
)
def test_counts_must_be_proportions(args: tuple[int, int, int, int], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        two_proportion_z_test(*args)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 95.0, -0.5])
def test_confidence_must_be_between_zero_and_one(confidence: float) -> None:
    with pytest.raises(InvalidInputError, match="confidence"):
        two_proportion_z_test(1, 10, 2, 10, confidence=confidence)
