"""OpenFeature providers: the built-in one over the database, and the guard every provider is
wrapped in before prompt-tool binds it.

The database provider answers from an in-process snapshot of the whole flag (default + every
override), loaded in one query and kept for ``ttl_s`` seconds, so a hot read path costs a dict
lookup rather than a query per session. A write through this process bumps the database's
generation (see :mod:`prompt_tool.flags.store`) and the next read reloads at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEvent, ProviderEventDetails
from openfeature.exception import ErrorCode, OpenFeatureError
from openfeature.flag_evaluation import FlagMetadata, FlagResolutionDetails, FlagValueType, Reason
from openfeature.hook import Hook
from openfeature.provider import AbstractProvider, FeatureProvider, Metadata
from openfeature.track import TrackingEventDetails
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from prompt_tool.flags.store import Snapshot, StoredRow, database_key, generation, load_snapshot
from prompt_tool.flags.types import BUILTIN_DEFAULT, FLAG_KEY, DecisionSource

__all__ = [
    "DATABASE_PROVIDER_NAME",
    "EXCEPTION_KEY",
    "SAMPLE_RATE_KEY",
    "SOURCE_KEY",
    "DatabaseFlagProvider",
    "GuardedProvider",
]

DATABASE_PROVIDER_NAME = "prompt-tool-database"
# Flag metadata keys. ``shadow_sample_rate`` is unprefixed on purpose: a flagd flag definition
# can carry it in its own ``metadata`` block and the shadow shim honours it the same way.
SAMPLE_RATE_KEY = "shadow_sample_rate"
SOURCE_KEY = "prompt_tool.source"
EXCEPTION_KEY = "prompt_tool.exception"

T = TypeVar("T")
ObjectValue = Sequence[FlagValueType] | Mapping[str, FlagValueType]


def _error(
    default: T, code: ErrorCode, message: str, exception: str | None = None
) -> FlagResolutionDetails[T]:
    metadata: FlagMetadata = {} if exception is None else {EXCEPTION_KEY: exception}
    return FlagResolutionDetails(
        value=default,
        error_code=code,
        error_message=message,
        reason=Reason.ERROR,
        flag_metadata=metadata,
    )


@dataclass(frozen=True, slots=True)
class _Failure:
    exception: str
    message: str


class DatabaseFlagProvider(AbstractProvider):
    """The ``orchestration-templates`` flag read from ``feature_flag_states`` over ``engine``.

    Each instance owns its engine and its cache: two instances over two databases never see
    each other's state, whichever OpenFeature domains they are bound to.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        flag_key: str = FLAG_KEY,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.flag_key = flag_key
        self._key = database_key(engine)
        self._ttl_s = ttl_s
        self._clock = clock
        # Held during the reload query: concurrent readers of an expired snapshot wait for one
        # query instead of each running their own.
        self._lock = threading.Lock()
        self._snapshot: Snapshot | _Failure | None = None
        self._loaded_at = 0.0
        self._generation = -1
        self.loads = 0

    def get_metadata(self) -> Metadata:
        return Metadata(name=DATABASE_PROVIDER_NAME)

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        # Warm the cache so the first session read does not pay for the query; a failure here
        # is reported by the first evaluation instead, which falls back to legacy.
        self._current()

    def invalidate(self) -> None:
        with self._lock:
            self._snapshot = None

    def _current(self) -> Snapshot | _Failure:
        with self._lock:
            now = self._clock()
            current_generation = generation(self._key)
            fresh = (
                self._snapshot is not None
                and self._ttl_s > 0
                and self._generation == current_generation
                and now - self._loaded_at < self._ttl_s
            )
            if fresh and self._snapshot is not None:
                return self._snapshot
            self.loads += 1
            try:
                loaded: Snapshot | _Failure = load_snapshot(self.engine, self.flag_key)
            except SQLAlchemyError as error:
                origin = getattr(error, "orig", None) or error
                first_line = (str(origin).strip().splitlines() or [type(origin).__name__])[0]
                # Kept like a snapshot, so a database that is down costs one query per TTL,
                # not one per session read.
                loaded = _Failure(type(origin).__name__, first_line)
            self._snapshot = loaded
            self._loaded_at = now
            self._generation = current_generation
            return loaded

    def _resolve(self, context: EvaluationContext | None) -> FlagResolutionDetails[str]:
        snapshot = self._current()
        if isinstance(snapshot, _Failure):
            return _error(
                BUILTIN_DEFAULT.value,
                ErrorCode.GENERAL,
                f"cannot read the flag table: {snapshot.message}",
                snapshot.exception,
            )
        row: StoredRow | None = None
        attributes = context.attributes if context is not None else {}
        project_id = attributes.get("project_id")
        slug = attributes.get("project_slug") or (context.targeting_key if context else None)
        if isinstance(project_id, int) and not isinstance(project_id, bool):
            row = snapshot.by_id.get(project_id)
        elif isinstance(slug, str):
            row = snapshot.by_slug.get(slug)
        if row is not None:
            return self._found(row, Reason.TARGETING_MATCH, DecisionSource.OVERRIDE)
        if snapshot.default is not None:
            return self._found(snapshot.default, Reason.STATIC, DecisionSource.DEFAULT)
        return FlagResolutionDetails(
            value=BUILTIN_DEFAULT.value,
            variant=BUILTIN_DEFAULT.value,
            reason=Reason.DEFAULT,
            flag_metadata={SOURCE_KEY: DecisionSource.BUILTIN_DEFAULT.value},
        )

    @staticmethod
    def _found(
        row: StoredRow, reason: Reason, source: DecisionSource
    ) -> FlagResolutionDetails[str]:
        metadata: dict[str, bool | int | float | str] = {SOURCE_KEY: source.value}
        if row.shadow_sample_rate is not None:
            metadata[SAMPLE_RATE_KEY] = row.shadow_sample_rate
        return FlagResolutionDetails(
            value=row.variant, variant=row.variant, reason=reason, flag_metadata=metadata
        )

    def resolve_string_details(
        self,
        flag_key: str,
        default_value: str,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[str]:
        if flag_key != self.flag_key:
            return _error(default_value, ErrorCode.FLAG_NOT_FOUND, f"no flag {flag_key!r}")
        return self._resolve(evaluation_context)

    def _not_a_string(self, flag_key: str, default: T) -> FlagResolutionDetails[T]:
        if flag_key != self.flag_key:
            return _error(default, ErrorCode.FLAG_NOT_FOUND, f"no flag {flag_key!r}")
        return _error(default, ErrorCode.TYPE_MISMATCH, f"{flag_key!r} is a string flag")

    def resolve_boolean_details(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        return self._not_a_string(flag_key, default_value)

    def resolve_integer_details(
        self,
        flag_key: str,
        default_value: int,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[int]:
        return self._not_a_string(flag_key, default_value)

    def resolve_float_details(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        return self._not_a_string(flag_key, default_value)

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: ObjectValue,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[ObjectValue]:
        return self._not_a_string(flag_key, default_value)


class GuardedProvider(AbstractProvider):
    """Any provider, made unable to break a read.

    An exception from the provider becomes an error resolution (the SDK would otherwise log a
    traceback on every single call), and anything that is not a ``FlagResolutionDetails`` becomes
    one too. Events the inner provider emits are re-emitted as this provider's, so readiness and
    errors are tracked for the object actually bound in the OpenFeature registry.
    """

    def __init__(self, inner: FeatureProvider) -> None:
        super().__init__()
        self.inner = inner
        # The SDK initialises a provider on its own thread; this is how a binder waits for it
        # with a bound of its choosing, and learns why it failed.
        self.initialized = threading.Event()
        self.init_error: Exception | None = None

    def _forward(
        self, _provider: FeatureProvider, event: ProviderEvent, details: ProviderEventDetails
    ) -> None:
        self.emit(event, details)

    def attach(
        self,
        on_emit: Callable[[FeatureProvider, ProviderEvent, ProviderEventDetails], None],
    ) -> None:
        super().attach(on_emit)
        self.inner.attach(self._forward)

    def detach(self) -> None:
        super().detach()
        self.inner.detach()

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        try:
            self.inner.initialize(evaluation_context)
        except Exception as error:
            self.init_error = error
            raise
        finally:
            self.initialized.set()

    def wait_ready(self, timeout_s: float | None) -> str | None:
        """Wait for ``initialize`` to end; return what went wrong, if anything."""
        if not self.initialized.wait(timeout_s):
            return f"not ready after {timeout_s:g}s"
        if self.init_error is not None:
            reason = str(self.init_error).strip()
            kind = type(self.init_error).__name__
            return f"{kind}: {reason}" if reason else kind
        return None

    def shutdown(self) -> None:
        self.inner.shutdown()

    def get_metadata(self) -> Metadata:
        try:
            return self.inner.get_metadata()
        except Exception:  # noqa: BLE001 - a name is cosmetic; a broken one must not stop reads
            return Metadata(name=type(self.inner).__name__)

    def get_provider_hooks(self) -> list[Hook]:
        try:
            return list(self.inner.get_provider_hooks())
        except Exception:  # noqa: BLE001 - hooks are optional; losing them beats failing reads
            return []

    def track(
        self,
        tracking_event_name: str,
        evaluation_context: EvaluationContext | None = None,
        tracking_event_details: TrackingEventDetails | None = None,
    ) -> None:
        self.inner.track(tracking_event_name, evaluation_context, tracking_event_details)

    @staticmethod
    def _guard(call: Callable[[], Any], default: T) -> FlagResolutionDetails[T]:
        try:
            result = call()
        except OpenFeatureError as error:
            return _error(
                default,
                error.error_code,
                error.error_message or type(error).__name__,
                type(error).__name__,
            )
        except Exception as error:  # noqa: BLE001 - any provider failure must read as legacy
            return _error(
                default, ErrorCode.GENERAL, f"{type(error).__name__}: {error}", type(error).__name__
            )
        if not isinstance(result, FlagResolutionDetails):
            return _error(
                default,
                ErrorCode.GENERAL,
                f"provider returned {type(result).__name__}, not FlagResolutionDetails",
                "BadResolution",
            )
        return result

    def resolve_string_details(
        self,
        flag_key: str,
        default_value: str,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[str]:
        return self._guard(
            lambda: self.inner.resolve_string_details(flag_key, default_value, evaluation_context),
            default_value,
        )

    def resolve_boolean_details(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        return self._guard(
            lambda: self.inner.resolve_boolean_details(flag_key, default_value, evaluation_context),
            default_value,
        )

    def resolve_integer_details(
        self,
        flag_key: str,
        default_value: int,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[int]:
        return self._guard(
            lambda: self.inner.resolve_integer_details(flag_key, default_value, evaluation_context),
            default_value,
        )

    def resolve_float_details(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        return self._guard(
            lambda: self.inner.resolve_float_details(flag_key, default_value, evaluation_context),
            default_value,
        )

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: ObjectValue,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[ObjectValue]:
        return self._guard(
            lambda: self.inner.resolve_object_details(flag_key, default_value, evaluation_context),
            default_value,
        )
