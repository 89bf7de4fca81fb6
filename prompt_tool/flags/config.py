"""Which OpenFeature provider answers the flag: the built-in database provider, or a replacement
for the whole process, given in code (:func:`use_provider`) or by configuration (a flagd JSON
flag-definition file, evaluated in-process by ``openfeature-provider-flagd``: no flagd server).

A replacement is bound to the dedicated OpenFeature domain :data:`DOMAIN` (``"prompt-tool"``),
never to the unnamed default domain, so an application's own global provider is left alone.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from openfeature import api
from openfeature.provider import FeatureProvider
from openfeature.provider.no_op_provider import NoOpProvider

from prompt_tool.errors import ConfigurationError
from prompt_tool.flags.provider import GuardedProvider
from prompt_tool.flags.types import DOMAIN
from prompt_tool.settings import Settings, get_settings

__all__ = [
    "FLAGD_FILE_ENV",
    "PROVIDER_ENV",
    "FlagProviderConfig",
    "ProviderKind",
    "bind_and_wait",
    "configure_provider_from_env",
    "ensure_configured",
    "flag_provider_config",
    "flagd_file_provider",
    "replacement_provider",
    "reset_provider",
    "use_provider",
]

logger = logging.getLogger("prompt_tool.flags")

PROVIDER_ENV = "PROMPT_TOOL_FLAG_PROVIDER"
FLAGD_FILE_ENV = "PROMPT_TOOL_FLAGD_FILE"
DEFAULT_READY_WAIT_S = 5.0


class ProviderKind(enum.StrEnum):
    DATABASE = "database"
    FLAGD_FILE = "flagd-file"


@dataclass(frozen=True, slots=True)
class FlagProviderConfig:
    kind: ProviderKind = ProviderKind.DATABASE
    flagd_file: Path | None = None


def flag_provider_config(env: Mapping[str, str] | None = None) -> FlagProviderConfig:
    """The provider chosen by ``PROMPT_TOOL_FLAG_PROVIDER`` and ``PROMPT_TOOL_FLAGD_FILE``.

    Read from the process settings, or from ``env`` when given.
    """
    settings = get_settings() if env is None else Settings.from_env(env)
    raw = settings.flag_provider.strip().lower()
    try:
        kind = ProviderKind(raw)
    except ValueError:
        choices = ", ".join(k.value for k in ProviderKind)
        raise ConfigurationError(
            f"{PROVIDER_ENV}={raw!r} is not a flag provider; use one of {choices} or unset it"
        ) from None
    path = settings.flagd_file
    if kind is ProviderKind.FLAGD_FILE and path is None:
        raise ConfigurationError(
            f"{PROVIDER_ENV}=flagd-file needs {FLAGD_FILE_ENV}=PATH to a flagd JSON flag file"
        )
    return FlagProviderConfig(kind, Path(path) if path else None)


def flagd_file_provider(path: str | os.PathLike[str]) -> FeatureProvider:
    """flagd's in-process provider over a local flag-definition file, re-read when it changes."""
    try:
        # Imported here: flagd is the optional ``flagd`` extra, needed only when configured.
        from openfeature.contrib.provider.flagd import FlagdProvider  # noqa: PLC0415
        from openfeature.contrib.provider.flagd.config import ResolverType  # noqa: PLC0415
    except ImportError:
        raise ConfigurationError(
            "the flagd-file flag provider needs openfeature-provider-flagd; "
            "install prompt-tool[flagd]"
        ) from None
    provider: FeatureProvider = FlagdProvider(
        resolver_type=ResolverType.FILE, offline_flag_source_path=str(path)
    )
    return provider


def bind_and_wait(provider: GuardedProvider, domain: str, wait_s: float | None) -> str | None:
    """Bind ``provider`` to ``domain`` and wait at most ``wait_s`` for it to be ready.

    Not ``set_provider_and_wait``: that runs ``initialize`` in the caller's thread with no bound,
    so a provider that never gets ready would hang start-up. Here the SDK initialises it on its
    own thread and, until it is ready, evaluations answer ``legacy``. Returns what went wrong.
    """
    api.set_provider(provider, domain=domain)
    return provider.wait_ready(wait_s)


class _Process:
    """The process-wide replacement provider, and whether the configuration was read yet."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.replacement: GuardedProvider | None = None
        self.configured = False


_process = _Process()


def use_provider(provider: FeatureProvider, *, wait_s: float = DEFAULT_READY_WAIT_S) -> None:
    """Answer the flag with ``provider`` in this whole process, instead of the database.

    Every :class:`~prompt_tool.flags.FlagService` built without a provider of its own follows
    it from its next read on, whenever this is called. Waits at most ``wait_s`` for it to be
    ready; until then, reads answer ``legacy``.
    """
    with _process.lock:
        current = _process.replacement
        if current is not None and current.inner is provider:
            # Re-binding would shut the provider down (as the replaced one) right after
            # initialising it again.
            return
        guarded = GuardedProvider(provider)
        _process.replacement = guarded
        _process.configured = True
        problem = bind_and_wait(guarded, DOMAIN, wait_s)
    if problem is not None:
        logger.warning(
            "flag provider %s is not ready (%s); reads answer legacy until it is",
            guarded.get_metadata().name,
            problem,
        )


def reset_provider() -> None:
    """Go back to the built-in database provider (the process's replacement is shut down)."""
    with _process.lock:
        previous, _process.replacement = _process.replacement, None
        _process.configured = True
        if previous is not None:
            api.set_provider(NoOpProvider(), domain=DOMAIN)


def configure_provider_from_env(env: Mapping[str, str] | None = None) -> FlagProviderConfig:
    """Apply :func:`flag_provider_config`: bind a flagd file provider, or go back to the database.

    A missing or unreadable flag file is not fatal: reads answer ``legacy`` (logged) and the
    file is picked up when it appears. A malformed setting raises ConfigurationError.
    """
    config = flag_provider_config(env)
    with _process.lock:
        if config.kind is ProviderKind.FLAGD_FILE and config.flagd_file is not None:
            use_provider(flagd_file_provider(config.flagd_file))
        else:
            reset_provider()
    return config


def ensure_configured() -> None:
    """Read the configuration on first use, once per process."""
    if _process.configured:
        return
    with _process.lock:
        if not _process.configured:
            configure_provider_from_env()


def replacement_provider() -> GuardedProvider | None:
    """The provider replacing the database in this process, if any."""
    return _process.replacement
