"""The flag's vocabulary: its key, its variants, and the plain results the library returns."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from prompt_tool.errors import InvalidInputError

__all__ = [
    "BUILTIN_DEFAULT",
    "DEFAULT_SHADOW_SAMPLE_RATE",
    "DOMAIN",
    "FLAG_KEY",
    "DecisionSource",
    "FlagChange",
    "FlagDecision",
    "FlagEvent",
    "FlagListing",
    "FlagLocation",
    "FlagState",
    "FlagStatus",
    "Guard",
    "PendingChange",
    "ProjectVariant",
    "ProviderKind",
    "Variant",
    "VariantListing",
    "parse_sample_rate",
    "parse_variant",
]

FLAG_KEY = "orchestration-templates"
# The OpenFeature domain of a replacement provider (use_provider, flagd file). An application's
# own default provider lives in the unnamed domain and is never touched by prompt-tool.
DOMAIN = "prompt-tool"


class Variant(enum.StrEnum):
    """How a project's session prompts are read."""

    LEGACY = "legacy"
    SHADOW = "shadow"
    TEMPLATES = "templates"


# The answer when nothing is stored and the answer to every failure: legacy columns are always
# written (dual write), so reading them is correct for every project at every step.
BUILTIN_DEFAULT = Variant.LEGACY
# ``shadow`` without a rate compares every read: that is what an operator who turns shadow on
# without further thought expects, and the rate can be lowered at any time.
DEFAULT_SHADOW_SAMPLE_RATE = 1.0

_CHOICES = "legacy, shadow or templates"


def parse_variant(value: str) -> Variant:
    """``value`` as a :class:`Variant`, or :class:`InvalidInputError` naming the choices."""
    try:
        return Variant(value)
    except ValueError:
        raise InvalidInputError(f"unknown variant {value!r}; choose {_CHOICES}") from None


def parse_sample_rate(value: float | None, variant: Variant) -> float | None:
    """A shadow sample rate checked to be in 0..1, and only given together with ``shadow``."""
    if value is None:
        return None
    if variant is not Variant.SHADOW:
        raise InvalidInputError(
            f"--sample-rate only applies to the shadow variant, not {variant.value}; "
            "drop it or set shadow"
        )
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise InvalidInputError(
            f"sample rate {value!r} is not between 0 and 1; use e.g. 0.1 for 10% of reads"
        )
    return float(value)


class ProviderKind(enum.StrEnum):
    """What answers the flag: ``database`` and ``flagd-file`` are the values of
    ``PROMPT_TOOL_FLAG_PROVIDER``; ``custom`` is any other provider given in code
    (:func:`~prompt_tool.flags.use_provider`), never a setting."""

    DATABASE = "database"
    FLAGD_FILE = "flagd-file"
    CUSTOM = "custom"


@dataclass(frozen=True, slots=True)
class FlagLocation:
    """Where the readers of this process read the flag, so where a change must be made.

    ``database``: the database a replacement database provider reads (its URL, no password);
    None for the built-in provider, which reads the database each command or service is given.
    ``description`` names the place in a phrase an operator can act on, e.g. ``the flagd file
    /etc/flags.json (PROMPT_TOOL_FLAG_PROVIDER=flagd-file)``.
    """

    kind: ProviderKind
    provider: str
    chosen_by: str
    description: str
    flagd_file: str | None = None
    database: str | None = None


class DecisionSource(enum.StrEnum):
    """Where a project's effective variant came from."""

    OVERRIDE = "override"
    DEFAULT = "default"
    BUILTIN_DEFAULT = "builtin_default"
    KILL_SWITCH = "kill_switch"
    PROVIDER_ERROR = "provider_error"
    # A replacement provider (flagd, ...) decided; ``detail`` carries its OpenFeature reason.
    PROVIDER = "provider"


@dataclass(frozen=True, slots=True)
class FlagDecision:
    """The variant to use for one project, and why.

    ``sample_rate`` is the share of reads the shadow shim compares: the configured rate for
    ``shadow``, 0.0 for the other variants (nothing to compare).
    """

    variant: Variant
    reason: DecisionSource
    sample_rate: float = 0.0
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class FlagState:
    """One stored row: the global default (``project_slug`` None) or a project's override."""

    project_slug: str | None
    project_id: int | None
    variant: str
    shadow_sample_rate: float | None
    updated_by: str | None
    updated_at: datetime | None


@dataclass(frozen=True, slots=True)
class FlagChange:
    """The result of a set or unset. ``changed`` is False when the state already was so (then
    nothing is written and no event recorded)."""

    flag_key: str
    project_slug: str | None
    project_id: int | None
    old_variant: str | None
    new_variant: str | None
    shadow_sample_rate: float | None
    actor: str
    changed: bool
    at: datetime | None
    event_id: int | None


@dataclass(frozen=True, slots=True)
class FlagStatus:
    """A project's effective variant with its source, and the stored rows behind it.

    ``read_from`` is where readers read the flag; when it is not the database, ``override`` and
    ``default`` are database rows that nobody reads.
    """

    flag_key: str
    project_slug: str
    project_id: int
    variant: Variant
    source: DecisionSource
    sample_rate: float
    detail: str | None
    provider: str
    override: FlagState | None
    default: FlagState | None
    read_from: FlagLocation


@dataclass(frozen=True, slots=True)
class FlagListing:
    """The stored state of the flag: default, every override, every project without one."""

    flag_key: str
    builtin_default: str
    kill_switch: bool
    default: FlagState | None
    overrides: list[FlagState]
    without_override: list[str]


@dataclass(frozen=True, slots=True)
class ProjectVariant:
    """One project's effective variant, as the read path gets it."""

    project_slug: str
    project_id: int
    variant: Variant
    source: DecisionSource
    sample_rate: float
    detail: str | None


@dataclass(frozen=True, slots=True)
class VariantListing(FlagListing):
    """The stored state of the flag (as :class:`FlagListing`) and what readers get from it.

    ``projects`` holds every project's effective variant, evaluated through the provider the
    readers use (``provider``, reading from ``read_from``); when that is not the database, the
    stored default and overrides are rows nobody reads.
    """

    read_from: FlagLocation
    provider: str
    projects: list[ProjectVariant]


@dataclass(frozen=True, slots=True)
class FlagEvent:
    """One recorded change: who, when, from which variant to which (``None``: unset)."""

    id: int
    flag_key: str
    project_slug: str | None
    project_id: int | None
    old_variant: str | None
    new_variant: str | None
    actor: str | None
    at: datetime | None


@dataclass(frozen=True, slots=True)
class PendingChange:
    """What a guard is asked to allow, before anything is written."""

    flag_key: str
    project_slug: str | None
    project_id: int | None
    old_variant: str | None
    new_variant: Variant
    shadow_sample_rate: float | None
    actor: str


Guard = Callable[[PendingChange], None]
"""Refuses a change by raising a :class:`prompt_tool.errors.PromptToolError`; returns to allow."""
