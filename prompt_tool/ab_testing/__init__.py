"""A/B tests of orchestration template versions: assignment, outcomes, results, promotion.

- A test targets one role of one orchestration template, for the sessions of one project; its
  variants are versions of that template with relative weights (:func:`create_ab_test`).
- :func:`start_ab_test`, :func:`pause_ab_test`, :func:`stop_ab_test`: draft -> running <->
  paused -> stopped; a test that has run keeps its variants and weights (a new test changes
  them); at most one test runs per (template, role, project).
- Sessions made by :func:`prompt_tool.compat.create_session` with a ``flags`` service, in a
  project whose flag is not ``legacy``, are enrolled in the running test of each template they
  use: the variant follows from a hash of (test id, unit key or session id)
  (:func:`choose_variant`) and the session renders and references that variant's version.
- :func:`record_outcome` annotates a session; :func:`ab_results` aggregates per variant with a
  two-proportion z-test; :func:`promote_variant` moves ``production`` to the winner and stops.
"""

from prompt_tool.ab_testing.assignment import check_unit_key, choose_variant, unit_point
from prompt_tool.ab_testing.enrolment import Enrolment, enrol_session
from prompt_tool.ab_testing.errors import (
    ABTestConflictError,
    ABTestFrozenError,
    ABTestStateError,
)
from prompt_tool.ab_testing.legacy import legacy_orchestration_ab_tests
from prompt_tool.ab_testing.outcomes import ab_results, record_outcome
from prompt_tool.ab_testing.promotion import promote_variant
from prompt_tool.ab_testing.stats import DEFAULT_CONFIDENCE, two_proportion_z_test
from prompt_tool.ab_testing.store import (
    create_ab_test,
    get_ab_test,
    list_ab_tests,
    pause_ab_test,
    set_variants,
    start_ab_test,
    stop_ab_test,
)
from prompt_tool.ab_testing.types import (
    ABResults,
    ABTestInfo,
    ABTestStatus,
    Assignment,
    Comparison,
    LegacyABTest,
    Promotion,
    ProportionTest,
    RecordedOutcome,
    TestRef,
    VariantInfo,
    VariantResult,
    VariantSpec,
)

__all__ = [
    "DEFAULT_CONFIDENCE",
    "ABResults",
    "ABTestConflictError",
    "ABTestFrozenError",
    "ABTestInfo",
    "ABTestStateError",
    "ABTestStatus",
    "Assignment",
    "Comparison",
    "Enrolment",
    "LegacyABTest",
    "Promotion",
    "ProportionTest",
    "RecordedOutcome",
    "TestRef",
    "VariantInfo",
    "VariantResult",
    "VariantSpec",
    "ab_results",
    "check_unit_key",
    "choose_variant",
    "create_ab_test",
    "enrol_session",
    "get_ab_test",
    "legacy_orchestration_ab_tests",
    "list_ab_tests",
    "pause_ab_test",
    "promote_variant",
    "record_outcome",
    "set_variants",
    "start_ab_test",
    "stop_ab_test",
    "two_proportion_z_test",
    "unit_point",
]
