"""Settings read once from the environment, in one place.

Everything tunable (database URL, timeouts, limits, cache TTLs) is a field here; nothing else in
the package reads ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache

from prompt_tool.errors import ConfigurationError

__all__ = [
    "DEFAULT_DATABASE_URL",
    "RENDER_LIMIT_FIELDS",
    "HealthLimits",
    "Settings",
    "get_settings",
]

DEFAULT_DATABASE_URL = "sqlite:///prompt_tool.db"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(
            f"{name}={raw!r} is not a whole number; set it to an integer or unset it"
        ) from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigurationError(
            f"{name}={raw!r} is not a number; set it to a number or unset it"
        ) from None


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a boolean; use 1 or 0")


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigurationError(f"{name}={raw!r} is not one of {', '.join(choices)}; pick one")
    return value


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 1:
        raise ConfigurationError(f"{name}={value} must be a positive whole number; raise it")
    return value


# The integer fields of prompt_tool.core.RenderLimits, each settable as
# PROMPT_TOOL_TEMPLATE_<FIELD> (docs/LIMITS.md); the output cap and the deadline have their own
# settings below. Named here, not imported: core reads settings, not the other way round.
RENDER_LIMIT_FIELDS = (
    "max_range",
    "max_string_length",
    "max_sequence_length",
    "max_int_bits",
    "max_call_depth",
    "max_buffered_chars",
    "max_allocated",
    "max_value_size",
)


def _render_limits(env: Mapping[str, str]) -> dict[str, int]:
    """The RenderLimits fields set in the environment (unset ones keep RenderLimits' default)."""
    limits = {}
    for name in RENDER_LIMIT_FIELDS:
        variable = f"PROMPT_TOOL_TEMPLATE_{name.upper()}"
        if env.get(variable):
            limits[name] = _positive(env, variable, 0)
    return limits


def _optional_limit(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    """A limit that ``off`` (or ``none``) turns off."""
    raw = env.get(name, "").strip().lower()
    if raw in {"off", "none"}:
        return None
    return default if not raw else _int(env, name, 0)


def _health_limits(env: Mapping[str, str]) -> HealthLimits:
    base = HealthLimits()
    return HealthLimits(
        replica_lag_ms=_optional_limit(
            env, "PROMPT_TOOL_BACKFILL_MAX_REPLICA_LAG_MS", base.replica_lag_ms
        ),
        wal_bytes_per_s=_optional_limit(
            env, "PROMPT_TOOL_BACKFILL_MAX_WAL_BYTES_PER_S", base.wal_bytes_per_s
        ),
        autovacuum=_flag(env, "PROMPT_TOOL_BACKFILL_PAUSE_ON_AUTOVACUUM", base.autovacuum),
        blocked_sessions=_optional_limit(
            env, "PROMPT_TOOL_BACKFILL_MAX_BLOCKED_SESSIONS", base.blocked_sessions
        ),
        transaction_age_s=_optional_limit(
            env, "PROMPT_TOOL_BACKFILL_MAX_TRANSACTION_AGE_S", base.transaction_age_s
        ),
    )


@dataclass(frozen=True, slots=True)
class HealthLimits:
    """When a backfill waits (see migrate/backfill/health.py): a signal past its limit holds the
    run until it is back under. ``None`` turns that signal off."""

    # Replay lag of the most lagging replica (pg_stat_replication; no replica reads as healthy).
    replica_lag_ms: int | None = 1_500
    # WAL the server writes per second, measured between two readings (pg_current_wal_lsn).
    # The run counts too: it writes about 4 KiB of WAL per session (25 MiB/s at 6,500/s).
    wal_bytes_per_s: int | None = 128 * 1024 * 1024
    # An (auto)vacuum running on a table the run writes (pg_stat_progress_vacuum).
    autovacuum: bool = True
    # Sessions waiting on a lock the run holds (pg_blocking_pids): more than this holds it.
    blocked_sessions: int | None = 0
    # The oldest open transaction on the server, in seconds (it keeps dead rows from vacuum).
    transaction_age_s: int | None = 3_600


@dataclass(frozen=True, slots=True)
class Settings:
    """Process-wide configuration. Build with :meth:`from_env`; override with :meth:`with_`."""

    database_url: str = DEFAULT_DATABASE_URL
    # Applied to every migration and backfill transaction on PostgreSQL: a DDL statement that
    # waits longer than this for a lock gives up instead of queueing every writer behind it.
    migration_lock_timeout_ms: int = 5_000
    migration_statement_timeout_ms: int = 60_000
    backfill_health: HealthLimits = field(default_factory=HealthLimits)
    redis_url: str | None = None
    templates_enabled: bool = True
    template_max_source_bytes: int = 64 * 1024
    template_max_stored_source_bytes: int = 16 * 1024 * 1024
    template_max_output_bytes: int = 1024 * 1024
    template_render_timeout_s: float = 2.0
    # RenderLimits fields given in the environment (see RENDER_LIMIT_FIELDS).
    template_limits: Mapping[str, int] = field(default_factory=dict)
    # The deepest include/import/extends chain validation follows, and how many distinct
    # templates one template may pull in (core.engine.MAX_INCLUDE_DEPTH, MAX_DEPENDENCIES).
    template_max_include_depth: int = 32
    template_max_dependencies: int = 256
    # Where templates render: "in-process" (the default) or "process", a pool of worker
    # processes with hard address-space and CPU limits (core.isolation), for deployments whose
    # template authors are not trusted.
    render_isolation: str = "in-process"
    render_isolation_workers: int = 2
    render_isolation_memory_bytes: int = 512 * 1024 * 1024
    # Largest --vars-file (or --variables-file) the CLI reads: refused before reading it all.
    vars_file_max_bytes: int = 16 * 1024 * 1024
    name_cache_ttl_s: float = 60.0
    redis_ttl_s: float = 30.0
    flag_cache_ttl_s: float = 5.0
    # Which OpenFeature provider answers the flag: "database" (built in) or "flagd-file".
    flag_provider: str = "database"
    flagd_file: str | None = None
    debug: bool = False
    # Who the CLI acts as when --as is not given (permissions and the audit trail name them).
    user: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            database_url=env.get("PROMPT_TOOL_DATABASE_URL") or DEFAULT_DATABASE_URL,
            migration_lock_timeout_ms=_int(env, "PROMPT_TOOL_LOCK_TIMEOUT_MS", 5_000),
            migration_statement_timeout_ms=_int(env, "PROMPT_TOOL_STATEMENT_TIMEOUT_MS", 60_000),
            backfill_health=_health_limits(env),
            redis_url=env.get("PROMPT_TOOL_REDIS_URL") or None,
            templates_enabled=_flag(env, "PROMPT_TOOL_TEMPLATES_ENABLED", True),
            template_max_source_bytes=_int(env, "PROMPT_TOOL_TEMPLATE_MAX_SOURCE_BYTES", 64 * 1024),
            template_max_stored_source_bytes=_int(
                env, "PROMPT_TOOL_TEMPLATE_MAX_STORED_SOURCE_BYTES", 16 * 1024 * 1024
            ),
            template_max_output_bytes=_int(
                env, "PROMPT_TOOL_TEMPLATE_MAX_OUTPUT_BYTES", 1024 * 1024
            ),
            template_render_timeout_s=_float(env, "PROMPT_TOOL_TEMPLATE_RENDER_TIMEOUT_S", 2.0),
            template_limits=_render_limits(env),
            template_max_include_depth=_positive(env, "PROMPT_TOOL_TEMPLATE_MAX_INCLUDE_DEPTH", 32),
            template_max_dependencies=_positive(env, "PROMPT_TOOL_TEMPLATE_MAX_INCLUDES", 256),
            render_isolation=_choice(
                env, "PROMPT_TOOL_RENDER_ISOLATION", ("in-process", "process"), "in-process"
            ),
            render_isolation_workers=_positive(env, "PROMPT_TOOL_RENDER_ISOLATION_WORKERS", 2),
            render_isolation_memory_bytes=_positive(
                env, "PROMPT_TOOL_RENDER_ISOLATION_MEMORY_BYTES", 512 * 1024 * 1024
            ),
            vars_file_max_bytes=_int(env, "PROMPT_TOOL_VARS_FILE_MAX_BYTES", 16 * 1024 * 1024),
            name_cache_ttl_s=_float(env, "PROMPT_TOOL_NAME_CACHE_TTL_S", 60.0),
            redis_ttl_s=_float(env, "PROMPT_TOOL_REDIS_TTL_S", 30.0),
            flag_cache_ttl_s=_float(env, "PROMPT_TOOL_FLAG_CACHE_TTL_S", 5.0),
            flag_provider=env.get("PROMPT_TOOL_FLAG_PROVIDER") or "database",
            flagd_file=env.get("PROMPT_TOOL_FLAGD_FILE") or None,
            debug=_flag(env, "PROMPT_TOOL_DEBUG", False),
            user=env.get("PROMPT_TOOL_USER") or None,
        )

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process, read from the environment on first use."""
    return Settings.from_env()
