"""The flag as the rest of prompt-tool reads it: :class:`FlagService`.

Every read goes through the OpenFeature SDK with an ``EvaluationContext`` whose targeting key is
the project slug, and can never fail: a provider that raises, answers garbage, is not ready, or
does not answer within ``evaluation_timeout_s`` gives ``legacy``, logged once per cause.

Domains. The OpenFeature registry is one per process, keyed by domain. Each service binds its
own provider (the database provider over *its* engine, or the provider it was given) to a domain
of its own, ``prompt-tool/<n>``, so two services over two databases in one process never share a
provider or a cache. A process-wide replacement (:func:`~prompt_tool.flags.use_provider`, or the
flagd file configured by environment) lives in the domain ``prompt-tool``; services without a
provider of their own follow it while it is set. Names of closed services are reused, so the
registry does not grow with every short-lived service.

Timeouts. Evaluations run on one long-lived daemon thread per service (not a thread per call)
and the caller waits for at most ``evaluation_timeout_s``; a batch is one hand-off. The hand-off
costs tens of microseconds, against milliseconds for the session read it decides. A provider
that hangs holds that one thread only: while it is stuck, reads answer ``legacy`` at once
instead of queueing behind it. ``evaluation_timeout_s=None`` evaluates in the caller's thread
(no bound) for providers known to answer from memory.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from types import TracebackType
from typing import Any, TypeVar

from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import FlagEvaluationDetails
from openfeature.provider import FeatureProvider
from openfeature.provider.no_op_provider import NoOpProvider
from sqlalchemy import Engine

from prompt_tool.db.engine import connected
from prompt_tool.errors import ConfigurationError
from prompt_tool.flags import config
from prompt_tool.flags.provider import (
    EXCEPTION_KEY,
    SAMPLE_RATE_KEY,
    SOURCE_KEY,
    DatabaseFlagProvider,
    GuardedProvider,
)
from prompt_tool.flags.store import Database, list_flags, project_ids, read_states
from prompt_tool.flags.types import (
    BUILTIN_DEFAULT,
    DEFAULT_SHADOW_SAMPLE_RATE,
    DOMAIN,
    FLAG_KEY,
    DecisionSource,
    FlagDecision,
    FlagLocation,
    FlagStatus,
    ProjectVariant,
    Variant,
    VariantListing,
)
from prompt_tool.settings import Settings, get_settings

__all__ = [
    "DEFAULT_EVALUATION_TIMEOUT_S",
    "FlagService",
    "ProjectKey",
    "get_variant",
    "list_variants",
]

logger = logging.getLogger("prompt_tool.flags")

R = TypeVar("R")
ProjectKey = tuple[str, int | None]
"""A project as the flag sees it: (slug, id). The id may be None when only the slug is known."""

# Far above an in-memory answer (microseconds) or a cache reload (a millisecond or so), far below
# anything a user would notice on a session read.
DEFAULT_EVALUATION_TIMEOUT_S = 0.25
# A one-off `flag get` starts cold (connects, loads): it may take longer, and nobody is waiting
# on a hot path.
_ONE_SHOT_TIMEOUT_S = 5.0
_MAX_CAUSES = 100
_VARIANTS = frozenset(v.value for v in Variant)
# Only the database provider reports where its answer came from; any other provider's answer
# is reported as "provider" with its OpenFeature reason.
_OWN_SOURCES = {
    s.value: s
    for s in (DecisionSource.OVERRIDE, DecisionSource.DEFAULT, DecisionSource.BUILTIN_DEFAULT)
}


class _OncePerCause:
    """Log the first occurrence of each cause; count every occurrence.

    A broken provider on a hot path would otherwise write one line per session read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def report(self, cause: str, message: str, *args: object, reads: int = 1) -> None:
        with self._lock:
            if cause not in self._counts and len(self._counts) >= _MAX_CAUSES:
                # Garbage answers can be endlessly varied; the log must stay bounded anyway.
                cause = "other"
            seen = self._counts.get(cause, 0)
            self._counts[cause] = seen + reads
        if seen == 0:
            logger.warning(
                message + " [cause %s: logged once, later occurrences are only counted]",
                *args,
                cause,
            )

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class _Worker:
    """One daemon thread running evaluations in order; callers wait on a Future with a bound.

    Daemon, and not a ThreadPoolExecutor: a provider stuck forever must not keep the
    interpreter from exiting.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._busy_since: float | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, work = job
            # False when the caller gave up before the job started: skip it.
            if not future.set_running_or_notify_cancel():
                continue
            self._busy_since = time.monotonic()
            try:
                future.set_result(work())
            except BaseException as error:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(error)
            finally:
                self._busy_since = None

    def submit(self, work: Callable[[], R]) -> Future[R]:
        future: Future[R] = Future()
        self._jobs.put((future, work))
        return future

    def busy_for(self) -> float:
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def stop(self) -> None:
        self._jobs.put(None)


class _Domains:
    """Names ``prompt-tool/<n>`` for services' own providers, reused once a service closes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[str] = []
        self._numbers = itertools.count(1)

    def acquire(self) -> str:
        with self._lock:
            return self._free.pop() if self._free else f"{DOMAIN}/{next(self._numbers)}"

    def release(self, name: str) -> None:
        with self._lock:
            self._free.append(name)


_domains = _Domains()


class FlagService:
    """The ``orchestration-templates`` variant of each project, for the hot read path.

    ``provider``: answer with this provider instead of the database. The service binds it,
    which initialises it, and :meth:`close` shuts it down, so give a provider to one service
    only; to share one across the process, use :func:`~prompt_tool.flags.use_provider`.
    Without one, the process-wide replacement is used while one is set, else the built-in
    database provider over ``engine``, cached for ``settings.flag_cache_ttl_s`` seconds (0: no
    cache) as measured by ``clock``.

    Hold one service for the life of the process (or use it as a context manager): it owns a
    worker thread and an OpenFeature domain until :meth:`close`.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings | None = None,
        provider: FeatureProvider | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        evaluation_timeout_s: float | None = DEFAULT_EVALUATION_TIMEOUT_S,
    ) -> None:
        if evaluation_timeout_s is not None and not evaluation_timeout_s > 0:
            raise ConfigurationError(
                f"flag evaluation timeout {evaluation_timeout_s!r} must be a positive number "
                "of seconds, or None to evaluate in the caller's thread"
            )
        self.engine = engine
        self.settings = settings or get_settings()
        self._clock = clock
        self._timeout_s = evaluation_timeout_s
        self._given = provider
        self._database: DatabaseFlagProvider | None = None
        self._causes = _OncePerCause()
        self._state_lock = threading.Lock()
        self._bound = False
        self._closed = False
        self._stuck: Future[list[FlagDecision]] | None = None
        self.domain = _domains.acquire()
        self._own_client: OpenFeatureClient = api.get_client(self.domain)
        self._replacement_client: OpenFeatureClient = api.get_client(DOMAIN)
        if provider is None:
            config.ensure_configured()
        self._worker = None if evaluation_timeout_s is None else _Worker(f"{self.domain}-flags")
        if self._worker is not None:
            # A service dropped without close() must not leave its thread waiting forever.
            weakref.finalize(self, self._worker.stop)
        if provider is not None or config.replacement_provider() is None:
            # Bind (and warm the cache) now, off the caller's thread, so the first read finds
            # the provider ready.
            if self._worker is None:
                self._bind_own()
            else:
                self._worker.submit(self._bind_own)

    # --- lifecycle -----------------------------------------------------------------------

    def _own_provider(self) -> FeatureProvider:
        if self._given is not None:
            return self._given
        if self._database is None:
            self._database = DatabaseFlagProvider(
                self.engine, ttl_s=self.settings.flag_cache_ttl_s, clock=self._clock
            )
        return self._database

    def _bind_own(self) -> None:
        with self._state_lock:
            if self._bound or self._closed:
                return
            guarded = GuardedProvider(self._own_provider())
            # Bound under the lock that close() takes, so a closing service never has its
            # domain re-bound behind its back (the name may already serve another service).
            api.set_provider(guarded, domain=self.domain)
            self._bound = True
        # No bound on this wait: it runs on the worker (or in the constructor when there is no
        # worker), and readers are protected from a hung start by the worker's busy check.
        problem = guarded.wait_ready(None)
        if problem is not None:
            self._causes.report(
                "init",
                "flag provider %s failed to start (%s); reads answer legacy until it recovers",
                guarded.get_metadata().name,
                problem,
            )

    def close(self) -> None:
        """Stop the worker and unbind this service's provider (shutting it down)."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            if self._bound:
                api.set_provider(NoOpProvider(), domain=self.domain)
        _domains.release(self.domain)
        if self._worker is not None:
            self._worker.stop()

    def __enter__(self) -> FlagService:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def wait_until_idle(self, timeout_s: float | None = None) -> bool:
        """Wait for queued work (the initial bind, a slow evaluation) to finish; True if it did."""
        if self._worker is None or self._closed:
            return True
        try:
            self._worker.submit(lambda: None).result(timeout=timeout_s)
        except FuturesTimeout:
            return False
        return True

    # --- introspection -------------------------------------------------------------------

    @property
    def provider_name(self) -> str:
        """The name of the provider answering right now."""
        if self._given is None and (replacement := config.replacement_provider()) is not None:
            return replacement.get_metadata().name
        return self._own_provider().get_metadata().name

    @property
    def read_from(self) -> FlagLocation:
        """Where the provider answering right now reads the flag."""
        if self._given is not None:
            return config.location_of(self._given, "the provider given to this service")
        return config.flag_location()

    def fallback_counts(self) -> dict[str, int]:
        """How many reads fell back to legacy, per cause, since the service started."""
        return self._causes.counts()

    def invalidate(self) -> None:
        """Drop the cached flag state: the next read queries the database."""
        if self._database is not None:
            self._database.invalidate()

    # --- reads ---------------------------------------------------------------------------

    def variant_for(self, project_slug: str, project_id: int | None = None) -> FlagDecision:
        """The variant of one project; never raises."""
        return self.variants_for([(project_slug, project_id)])[project_slug]

    def variants_for(self, projects: Iterable[ProjectKey]) -> dict[str, FlagDecision]:
        """The variant of each project, by slug, in one hand-off; never raises."""
        keys = list(dict.fromkeys((slug, project_id) for slug, project_id in projects))
        if not self.settings.templates_enabled:
            kill = FlagDecision(Variant.LEGACY, DecisionSource.KILL_SWITCH, 0.0)
            return {slug: kill for slug, _ in keys}
        if not keys:
            return {}
        decisions = self._run(keys)
        return {slug: decision for (slug, _), decision in zip(keys, decisions, strict=True)}

    def _run(self, keys: list[ProjectKey]) -> list[FlagDecision]:
        first = keys[0][0]
        if self._closed:
            return self._fail_all(keys, "closed", "flag service is closed", first)
        if self._worker is None:
            try:
                return self._evaluate(keys)
            except Exception as error:  # noqa: BLE001 - reads never break because of the flag
                return self._fail_all(keys, f"exception:{type(error).__name__}", str(error), first)
        assert self._timeout_s is not None
        stuck = self._stuck
        if (stuck is not None and not stuck.done()) or self._worker.busy_for() > self._timeout_s:
            return self._fail_all(
                keys, "timeout", "provider still busy with an earlier call that timed out", first
            )
        future = self._worker.submit(lambda: self._evaluate(keys))
        try:
            return future.result(timeout=self._timeout_s)
        except FuturesTimeout:
            if not future.cancel():
                # Running, so the provider itself is stuck: later reads must not queue behind it.
                self._stuck = future
            return self._fail_all(keys, "timeout", f"no answer within {self._timeout_s:g}s", first)
        except Exception as error:  # noqa: BLE001 - reads never break because of the flag
            return self._fail_all(keys, f"exception:{type(error).__name__}", str(error), first)

    def _client(self) -> OpenFeatureClient:
        if self._given is None and config.replacement_provider() is not None:
            return self._replacement_client
        if not self._bound:
            self._bind_own()
        return self._own_client

    def _evaluate(self, keys: list[ProjectKey]) -> list[FlagDecision]:
        client = self._client()
        decisions = []
        for slug, project_id in keys:
            attributes: dict[str, str | int] = {"project_slug": slug}
            if project_id is not None:
                attributes["project_id"] = project_id
            details = client.get_string_details(
                FLAG_KEY, BUILTIN_DEFAULT.value, EvaluationContext(slug, attributes)
            )
            decisions.append(self._interpret(details, slug))
        return decisions

    def _interpret(self, details: FlagEvaluationDetails[str], slug: str) -> FlagDecision:
        metadata: Mapping[str, object] = details.flag_metadata or {}
        if details.error_code is not None:
            code = str(getattr(details.error_code, "value", details.error_code))
            exception = metadata.get(EXCEPTION_KEY)
            cause = f"{code}:{exception}" if exception else code
            message = f"{code}: {details.error_message}" if details.error_message else code
            return self._fail(f"provider_error:{cause}", message, slug)
        value: object = details.value
        if not isinstance(value, str) or value not in _VARIANTS:
            shown = repr(value)[:60]
            return self._fail(f"unknown_variant:{shown}", f"unknown variant {shown}", slug)
        variant = Variant(value)
        source = _OWN_SOURCES.get(str(metadata.get(SOURCE_KEY)), DecisionSource.PROVIDER)
        detail = None
        if source is DecisionSource.PROVIDER:
            detail = str(getattr(details.reason, "value", details.reason))
        return FlagDecision(variant, source, self._sample_rate(variant, metadata, slug), detail)

    def _sample_rate(self, variant: Variant, metadata: Mapping[str, object], slug: str) -> float:
        if variant is not Variant.SHADOW:
            return 0.0
        rate = metadata.get(SAMPLE_RATE_KEY)
        if rate is None:
            return DEFAULT_SHADOW_SAMPLE_RATE
        if isinstance(rate, int | float) and not isinstance(rate, bool):
            number = float(rate)
            if not math.isnan(number) and 0.0 <= number <= 1.0:
                return number
        self._causes.report(
            "bad_sample_rate",
            "flag %s for project %s: shadow sample rate %r is not in 0..1; using %s",
            FLAG_KEY,
            slug,
            rate,
            DEFAULT_SHADOW_SAMPLE_RATE,
        )
        return DEFAULT_SHADOW_SAMPLE_RATE

    def _fail(self, cause: str, detail: str, slug: str, reads: int = 1) -> FlagDecision:
        self._causes.report(
            cause,
            "flag %s for project %s: %s; answering legacy",
            FLAG_KEY,
            slug,
            detail,
            reads=reads,
        )
        return FlagDecision(Variant.LEGACY, DecisionSource.PROVIDER_ERROR, 0.0, detail)

    def _fail_all(
        self, keys: list[ProjectKey], cause: str, detail: str, slug: str
    ) -> list[FlagDecision]:
        return [self._fail(cause, detail, slug, reads=len(keys))] * len(keys)


def get_variant(
    db: Database,
    project_slug: str,
    *,
    settings: Settings | None = None,
    provider: FeatureProvider | None = None,
) -> FlagStatus:
    """A project's effective variant, as the read path sees it, the stored rows behind it, and
    where the flag is read from (when not the database, those rows are not read)."""
    with connected(db) as engine:
        project_id, override, default = read_states(engine, project_slug)
        with FlagService(
            engine, settings, provider, evaluation_timeout_s=_ONE_SHOT_TIMEOUT_S
        ) as service:
            decision = service.variant_for(project_slug, project_id)
            provider_name = service.provider_name
            read_from = service.read_from
    return FlagStatus(
        flag_key=FLAG_KEY,
        project_slug=project_slug,
        project_id=project_id,
        variant=decision.variant,
        source=decision.reason,
        sample_rate=decision.sample_rate,
        detail=decision.detail,
        provider=provider_name,
        override=override,
        default=default,
        read_from=read_from,
    )


def list_variants(
    db: Database,
    *,
    settings: Settings | None = None,
    provider: FeatureProvider | None = None,
) -> VariantListing:
    """Every project's effective variant, evaluated as the read path evaluates it, beside the
    stored default and overrides (:func:`~prompt_tool.flags.list_flags`) and where the flag is
    read from. Under a provider other than the database, the stored rows are not what readers
    get; ``projects`` is."""
    settings = settings or get_settings()
    with connected(db) as engine:
        stored = list_flags(engine, settings=settings)
        ids = project_ids(engine)
        with FlagService(
            engine, settings, provider, evaluation_timeout_s=_ONE_SHOT_TIMEOUT_S
        ) as service:
            decisions = service.variants_for(ids.items())
            provider_name = service.provider_name
            read_from = service.read_from
    return VariantListing(
        flag_key=stored.flag_key,
        builtin_default=stored.builtin_default,
        kill_switch=stored.kill_switch,
        default=stored.default,
        overrides=stored.overrides,
        without_override=stored.without_override,
        read_from=read_from,
        provider=provider_name,
        projects=[
            ProjectVariant(
                project_slug=slug,
                project_id=project_id,
                variant=decisions[slug].variant,
                source=decisions[slug].reason,
                sample_rate=decisions[slug].sample_rate,
                detail=decisions[slug].detail,
            )
            for slug, project_id in ids.items()
        ],
    )
