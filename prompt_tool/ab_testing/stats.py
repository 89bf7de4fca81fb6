"""The statistics of a result, in pure Python: a two-proportion z-test and its interval.

For successes ``x_a`` of ``n_a`` (control) and ``x_b`` of ``n_b`` (variant), rates ``p_a`` and
``p_b`` and difference ``d = p_b - p_a``:

- p-value: ``z = d / sqrt(p (1 - p) (1/n_a + 1/n_b))`` with the pooled rate
  ``p = (x_a + x_b) / (n_a + n_b)`` (the standard error under "no difference"), two-sided,
  ``P(|Z| >= |z|) = erfc(|z| / sqrt 2)``;
- confidence interval: ``d +- z_crit * sqrt(p_a (1 - p_a) / n_a + p_b (1 - p_b) / n_b)``
  (Wald, unpooled), with ``z_crit`` the normal quantile ``1 - (1 - confidence) / 2``.

This is the same test as Pearson's chi-squared on the 2x2 table (``chi2 = z**2``), and it is
a large-sample approximation: with a handful of sessions per variant, read it as a hint only.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from prompt_tool.ab_testing.types import ProportionTest
from prompt_tool.errors import InvalidInputError

__all__ = ["DEFAULT_CONFIDENCE", "normal_quantile", "two_proportion_z_test"]

DEFAULT_CONFIDENCE = 0.95


def normal_quantile(confidence: float) -> float:
    """The two-sided critical value: 1.959963... for 0.95."""
    if not 0.0 < confidence < 1.0:
        raise InvalidInputError(
            f"confidence {confidence!r} must be between 0 and 1, e.g. 0.95 for 95%"
        )
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def two_proportion_z_test(
    successes_a: int,
    n_a: int,
    successes_b: int,
    n_b: int,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
) -> ProportionTest:
    """Is the success rate of ``b`` different from that of ``a``? (See the module docstring.)"""
    critical = normal_quantile(confidence)
    for successes, n in ((successes_a, n_a), (successes_b, n_b)):
        if n < 0 or not 0 <= successes <= n:
            raise InvalidInputError(f"{successes} successes of {n} is not a proportion")
    if n_a == 0 or n_b == 0:
        return ProportionTest(None, None, None, None, None, confidence)
    p_a, p_b = successes_a / n_a, successes_b / n_b
    difference = p_b - p_a
    pooled = (successes_a + successes_b) / (n_a + n_b)
    pooled_se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b))
    z = p_value = None
    if pooled_se > 0.0:
        z = difference / pooled_se
        p_value = math.erfc(abs(z) / math.sqrt(2.0))
    se = math.sqrt(p_a * (1.0 - p_a) / n_a + p_b * (1.0 - p_b) / n_b)
    return ProportionTest(
        difference=difference,
        z=z,
        p_value=p_value,
        ci_low=difference - critical * se,
        ci_high=difference + critical * se,
        confidence=confidence,
    )
