"""What the A/B testing library hands back: plain, frozen data the CLI prints as a table or JSON."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from prompt_tool.templates import TemplateAddress

__all__ = [
    "ABResults",
    "ABTestInfo",
    "ABTestStatus",
    "Assignment",
    "Comparison",
    "LegacyABTest",
    "Promotion",
    "ProportionTest",
    "RecordedOutcome",
    "TestRef",
    "VariantInfo",
    "VariantResult",
    "VariantSpec",
]

TestRef = int | str
"""A test as a user names it: its id, or its name when that is unique."""


class ABTestStatus(enum.StrEnum):
    """draft -> running <-> paused -> stopped (draft and paused may also stop at once).

    Only a draft test's variants may change: once a test has run, its variants and weights are
    frozen for good, so the same unit keeps its variant for the life of the test.
    """

    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class VariantSpec:
    """A variant to create: a name, a version of the tested template, and a relative weight."""

    name: str
    version: int
    weight: int = 1


@dataclass(frozen=True, slots=True)
class VariantInfo:
    id: int
    name: str
    version: int
    version_id: int
    weight: int
    share: float
    """The weight as a fraction of all weights: the expected share of enrolled sessions."""


@dataclass(frozen=True, slots=True)
class ABTestInfo:
    """A test of one role of one orchestration template, in one project."""

    id: int
    name: str
    status: ABTestStatus
    project: str
    template: TemplateAddress
    template_id: int
    role: str
    variants: tuple[VariantInfo, ...]
    created_at: datetime
    changed: bool = True
    """False when a start, pause or stop found the test already in that state (nothing written)."""

    def describe(self) -> str:
        return (
            f"A/B test {self.id} {self.name!r} ({self.status.value}): role {self.role} of "
            f"{self.template.describe()}, sessions of project {self.project}"
        )


@dataclass(frozen=True, slots=True)
class Assignment:
    """A session enrolled in a test: which variant (and template version) it got, and why."""

    test_id: int
    test_name: str
    role: str
    variant_id: int
    variant: str
    version: int
    version_id: int
    unit_key: str


@dataclass(frozen=True, slots=True)
class RecordedOutcome:
    test_id: int
    test_name: str
    session_id: int
    variant: str
    success: bool | None
    metric: float | None
    outcome_at: datetime | None


@dataclass(frozen=True, slots=True)
class ProportionTest:
    """Two-proportion z-test of ``b`` against ``a``: ``difference`` is rate(b) - rate(a).

    The p-value (two-sided) uses the pooled standard error, the confidence interval the
    unpooled one (Wald). ``None`` where the data cannot say: an empty group, or no variance.
    """

    difference: float | None
    z: float | None
    p_value: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float


@dataclass(frozen=True, slots=True)
class VariantResult:
    variant_id: int
    name: str
    version: int
    weight: int
    sessions: int
    """Sessions enrolled in this variant."""
    outcomes: int
    """Sessions with a recorded success flag (the denominator of ``success_rate``)."""
    successes: int
    success_rate: float | None
    metrics: int
    """Sessions with a recorded metric (the denominator of ``mean_metric``)."""
    mean_metric: float | None


@dataclass(frozen=True, slots=True)
class Comparison:
    """One variant against the control (the test's first variant)."""

    variant: str
    control: str
    test: ProportionTest


@dataclass(frozen=True, slots=True)
class ABResults:
    test: ABTestInfo
    variants: tuple[VariantResult, ...]
    comparisons: tuple[Comparison, ...]


@dataclass(frozen=True, slots=True)
class Promotion:
    """A winner promoted: the template's production label moved, the test stopped."""

    test_id: int
    test_name: str
    template: TemplateAddress
    variant: str
    label: str
    from_version: int | None
    to_version: int
    label_moved: bool
    """False when the label already pointed at the winner (nothing moved, nothing recorded)."""

    def describe(self) -> str:
        before = f"v{self.from_version}" if self.from_version is not None else "nothing"
        moved = (
            f"moved {self.label} from {before} to v{self.to_version}"
            if self.label_moved
            else f"{self.label} already was v{self.to_version}"
        )
        return (
            f"A/B test {self.test_id} {self.test_name!r}: promoted variant {self.variant}; "
            f"{self.template.describe()}: {moved}; test stopped"
        )


@dataclass(frozen=True, slots=True)
class LegacyABTest:
    """A legacy A/B test of an orchestration prompt, which ``prompt-tool ab`` cannot run."""

    id: int
    name: str
    status: str
    project: str
    prompt_id: int
    prompt_name: str
    variants: int

    def describe(self) -> str:
        return (
            f"legacy A/B test {self.id} {self.name!r} ({self.status}) in project {self.project} "
            f"tests orchestration prompt {self.prompt_name!r} ({self.variants} variants); "
            "recreate it on the imported template with `prompt-tool ab create`"
        )
