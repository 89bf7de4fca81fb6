"""Which OpenFeature provider answers the flag: the built-in database provider, or a replacement
for the whole process, given in code (:func:`use_provider`) or by configuration (a flagd JSON
flag-definition file, evaluated in-process by ``openfeature-provider-flagd``: no flagd server).

A replacement is bound to the dedicated OpenFeature domain :data:`DOMAIN` (``"prompt-tool"``),
never to the unnamed default domain, so an application's own global provider is left alone.

While a replacement answers, the database's flag rows are not read: :func:`flag_location` says
where the flag lives, and :func:`check_writes_reach_readers` refuses a database write that
readers would never see (:class:`FlagReadElsewhereError`).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from openfeature import api
from openfeature.provider import FeatureProvider
from openfeature.provider.no_op_provider import NoOpProvider
from sqlalchemy import Engine

from prompt_tool.errors import ConfigurationError
from prompt_tool.flags.provider import (
    DATABASE_PROVIDER_NAME,
    DatabaseFlagProvider,
    GuardedProvider,
)
from prompt_tool.flags.store import database_key
from prompt_tool.flags.types import DOMAIN, FLAG_KEY, FlagLocation, ProviderKind
from prompt_tool.settings import Settings, get_settings

__all__ = [
    "DATABASE_LOCATION",
    "FLAGD_FILE_ENV",
    "FLAGD_PROVIDER_NAME",
    "PROVIDER_ENV",
    "FlagProviderConfig",
    "FlagReadElsewhereError",
    "ProviderKind",
    "bind_and_wait",
    "check_writes_reach_readers",
    "configure_provider_from_env",
    "ensure_configured",
    "flag_location",
    "flag_provider_config",
    "flagd_file_provider",
    "location_of",
    "replacement_provider",
    "require_flagd_file",
    "reset_provider",
    "use_provider",
]

logger = logging.getLogger("prompt_tool.flags")

PROVIDER_ENV = "PROMPT_TOOL_FLAG_PROVIDER"
FLAGD_FILE_ENV = "PROMPT_TOOL_FLAGD_FILE"
DEFAULT_READY_WAIT_S = 5.0
# The kinds PROMPT_TOOL_FLAG_PROVIDER may name (``custom`` is only ever given in code).
_SETTABLE = (ProviderKind.DATABASE, ProviderKind.FLAGD_FILE)
# What FlagdProvider calls itself: the provider's name before one is bound (checked by a test).
FLAGD_PROVIDER_NAME = "FlagdProvider"
_USE_PROVIDER = "flags.use_provider"
_FLAGD_BY_ENV = f"{PROVIDER_ENV}={ProviderKind.FLAGD_FILE.value}"

DATABASE_LOCATION = FlagLocation(
    kind=ProviderKind.DATABASE,
    provider=DATABASE_PROVIDER_NAME,
    chosen_by="default",
    description="the database",
)


class FlagReadElsewhereError(ConfigurationError):
    """A change to the database's flag rows that readers would not see: they read the flag
    from somewhere else (a flagd file, another provider, another database)."""


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
    kind = next((k for k in _SETTABLE if k.value == raw), None)
    if kind is None:
        choices = ", ".join(k.value for k in _SETTABLE)
        raise ConfigurationError(
            f"{PROVIDER_ENV}={raw!r} is not a flag provider; use one of {choices} or unset it"
        ) from None
    path = settings.flagd_file
    if kind is ProviderKind.FLAGD_FILE and path is None:
        raise ConfigurationError(
            f"{PROVIDER_ENV}=flagd-file needs {FLAGD_FILE_ENV}=PATH to a flagd JSON flag file"
        )
    return FlagProviderConfig(kind, Path(path) if path else None)


def require_flagd_file(env: Mapping[str, str] | None = None) -> FlagProviderConfig:
    """:func:`flag_provider_config`, refusing a configured flagd file that is not there.

    For one-shot commands (the CLI): a service reads ``legacy`` until the file appears, but a
    command that answered from a file that does not exist would answer wrongly and exit 0.
    """
    config = flag_provider_config(env)
    if config.kind is ProviderKind.FLAGD_FILE and config.flagd_file is not None:
        path = config.flagd_file
        if not path.is_file():
            what = "is a directory, not" if path.is_dir() else "does not exist; expected"
            raise ConfigurationError(
                f"{FLAGD_FILE_ENV}={path}: {path.absolute()} {what} a flagd JSON flag file; "
                f"fix the path, or unset {PROVIDER_ENV} to read the flag from the database"
            )
    return config


# The file behind each provider made by flagd_file_provider, so that where the flag lives can be
# named however the provider was bound (by environment, or handed to use_provider).
_flagd_files: weakref.WeakKeyDictionary[FeatureProvider, str] = weakref.WeakKeyDictionary()


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
    _flagd_files[provider] = str(path)
    return provider


def location_of(provider: FeatureProvider, chosen_by: str = _USE_PROVIDER) -> FlagLocation:
    """Where ``provider`` reads the flag, for messages and listings; ``chosen_by`` says who
    picked it (a setting, or the code that called ``use_provider``)."""
    inner = provider.inner if isinstance(provider, GuardedProvider) else provider
    guarded = provider if isinstance(provider, GuardedProvider) else GuardedProvider(provider)
    name = guarded.get_metadata().name
    if isinstance(inner, DatabaseFlagProvider):
        url = database_key(inner.engine)
        return FlagLocation(
            ProviderKind.DATABASE, name, chosen_by, f"the database {url} ({chosen_by})", None, url
        )
    path = _flagd_files.get(inner)
    if path is not None:
        return FlagLocation(
            ProviderKind.FLAGD_FILE, name, chosen_by, f"the flagd file {path} ({chosen_by})", path
        )
    return FlagLocation(
        ProviderKind.CUSTOM, name, chosen_by, f"the OpenFeature provider {name!r} ({chosen_by})"
    )


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
        self.location = DATABASE_LOCATION
        self.configured = False


_process = _Process()


def use_provider(provider: FeatureProvider, *, wait_s: float = DEFAULT_READY_WAIT_S) -> None:
    """Answer the flag with ``provider`` in this whole process, instead of the database.

    Every :class:`~prompt_tool.flags.FlagService` built without a provider of its own follows
    it from its next read on, whenever this is called. Waits at most ``wait_s`` for it to be
    ready; until then, reads answer ``legacy``. From then on the flag lives in ``provider``:
    :func:`~prompt_tool.flags.set_variant` and the other writes to the database refuse
    (:class:`FlagReadElsewhereError`) unless it is a database provider over that same database.
    """
    _use(provider, wait_s, _USE_PROVIDER)


def _use(provider: FeatureProvider, wait_s: float, chosen_by: str) -> None:
    with _process.lock:
        current = _process.replacement
        if current is not None and current.inner is provider:
            # Re-binding would shut the provider down (as the replaced one) right after
            # initialising it again.
            return
        guarded = GuardedProvider(provider)
        _process.replacement = guarded
        _process.location = location_of(guarded, chosen_by)
        _process.configured = True
        problem = bind_and_wait(guarded, DOMAIN, wait_s)
    if problem is not None:
        logger.warning(
            "flag provider %s over %s is not ready (%s); reads answer legacy until it is",
            guarded.get_metadata().name,
            _process.location.description,
            problem,
        )


def reset_provider() -> None:
    """Go back to the built-in database provider (the process's replacement is shut down)."""
    with _process.lock:
        previous, _process.replacement = _process.replacement, None
        _process.location = DATABASE_LOCATION
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
            _use(flagd_file_provider(config.flagd_file), DEFAULT_READY_WAIT_S, _FLAGD_BY_ENV)
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


def flag_location() -> FlagLocation:
    """Where the readers of this process read the flag.

    Once a provider is bound, the bound one; before that, the one the settings choose (read
    without binding it: saying where the flag lives must not start a provider).
    """
    with _process.lock:
        if _process.configured:
            return _process.location
    config = flag_provider_config()
    if config.kind is ProviderKind.FLAGD_FILE and config.flagd_file is not None:
        path = str(config.flagd_file)
        return FlagLocation(
            ProviderKind.FLAGD_FILE,
            FLAGD_PROVIDER_NAME,
            _FLAGD_BY_ENV,
            f"the flagd file {path} ({_FLAGD_BY_ENV})",
            path,
        )
    return DATABASE_LOCATION


def check_writes_reach_readers(engine: Engine, project_slug: str | None) -> None:
    """Refuse, before anything is written, a change to ``engine``'s flag rows that readers
    would not see; ``project_slug`` None is the default. The one-line message says where the
    flag lives and what to do instead."""
    location = flag_location()
    if location.kind is ProviderKind.DATABASE and (
        location.database is None or location.database == database_key(engine)
    ):
        return
    raise FlagReadElsewhereError(_elsewhere(location, project_slug))


def _elsewhere(location: FlagLocation, project_slug: str | None) -> str:
    back = (
        f"unset {PROVIDER_ENV} to use the database"
        if location.chosen_by == _FLAGD_BY_ENV
        else "call flags.reset_provider() to use the database"
    )
    if location.kind is ProviderKind.DATABASE:
        return (
            f"the flag is read from {location.description}, not this database: nothing was "
            f"changed; make the change there, or {back} given here"
        )
    if location.kind is ProviderKind.FLAGD_FILE:
        what = (
            f'its "{FLAG_KEY}" targeting for project {project_slug}'
            if project_slug is not None
            else f'its "{FLAG_KEY}" defaultVariant'
        )
        return (
            f"the flag is read from {location.description}, not the database: nothing was "
            f"changed; edit {what} there, or {back}"
        )
    what = f"project {project_slug}" if project_slug is not None else "the default"
    return (
        f"the flag is read from {location.description}, not the database: nothing was "
        f'changed; change "{FLAG_KEY}" for {what} in that provider, or {back}'
    )
