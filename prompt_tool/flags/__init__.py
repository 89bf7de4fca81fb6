"""The per-project OpenFeature flag that chooses how session prompts are read.

One string flag, ``orchestration-templates``: ``legacy`` (the default and the answer to every
failure), ``shadow`` or ``templates``, evaluated per project through the OpenFeature SDK.

- The read path holds a :class:`FlagService` and asks :meth:`FlagService.variant_for` or
  :meth:`FlagService.variants_for`; reads never raise.
- Operators change the flag with :func:`set_variant`, :func:`set_default`,
  :func:`unset_variant`, :func:`unset_default`; every change is recorded with who and when
  (:func:`flag_history`). :func:`get_variant` and :func:`list_variants` say what readers get;
  :func:`list_flags` is the stored rows alone.
- :func:`use_provider` (or ``PROMPT_TOOL_FLAG_PROVIDER=flagd-file`` with
  ``PROMPT_TOOL_FLAGD_FILE=path``) replaces the database with any OpenFeature provider. The
  flag then lives there (:func:`flag_location`), and the writes above refuse with a
  :class:`FlagReadElsewhereError` naming it instead of changing rows nobody reads.
"""

from prompt_tool.flags.config import (
    FlagProviderConfig,
    FlagReadElsewhereError,
    configure_provider_from_env,
    flag_location,
    flag_provider_config,
    flagd_file_provider,
    reset_provider,
    use_provider,
)
from prompt_tool.flags.provider import DatabaseFlagProvider, GuardedProvider
from prompt_tool.flags.service import (
    DEFAULT_EVALUATION_TIMEOUT_S,
    FlagService,
    ProjectKey,
    get_variant,
    list_variants,
)
from prompt_tool.flags.store import Database, flag_history, list_flags
from prompt_tool.flags.types import (
    BUILTIN_DEFAULT,
    DEFAULT_SHADOW_SAMPLE_RATE,
    DOMAIN,
    FLAG_KEY,
    DecisionSource,
    FlagChange,
    FlagDecision,
    FlagEvent,
    FlagListing,
    FlagLocation,
    FlagState,
    FlagStatus,
    Guard,
    PendingChange,
    ProjectVariant,
    ProviderKind,
    Variant,
    VariantListing,
)
from prompt_tool.flags.writes import set_default, set_variant, unset_default, unset_variant

__all__ = [
    "BUILTIN_DEFAULT",
    "DEFAULT_EVALUATION_TIMEOUT_S",
    "DEFAULT_SHADOW_SAMPLE_RATE",
    "DOMAIN",
    "FLAG_KEY",
    "Database",
    "DatabaseFlagProvider",
    "DecisionSource",
    "FlagChange",
    "FlagDecision",
    "FlagEvent",
    "FlagListing",
    "FlagLocation",
    "FlagProviderConfig",
    "FlagReadElsewhereError",
    "FlagService",
    "FlagState",
    "FlagStatus",
    "Guard",
    "GuardedProvider",
    "PendingChange",
    "ProjectKey",
    "ProjectVariant",
    "ProviderKind",
    "Variant",
    "VariantListing",
    "configure_provider_from_env",
    "flag_history",
    "flag_location",
    "flag_provider_config",
    "flagd_file_provider",
    "get_variant",
    "list_flags",
    "list_variants",
    "reset_provider",
    "set_default",
    "set_variant",
    "unset_default",
    "unset_variant",
    "use_provider",
]
