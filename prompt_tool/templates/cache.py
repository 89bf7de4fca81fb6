"""Caches for resolving template names (name + label -> template version).

Two layers, both owned by the template manager:

- :class:`NameCache`: in-process, thread-safe, bounded. Fresh entries are served as they are,
  expired ones are served stale while one background refresh runs, and misses are single-flighted
  so a burst of requests for a cold name costs one database query.
- :class:`RedisSourceCache`: optional, shared between processes through Redis (the ``redis``
  extra). Entries live under per-project *epochs* so a write anywhere invalidates everywhere with
  one ``INCR``. It fails open: a missing or slow Redis only costs the cache, never a request.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast
from urllib.parse import urlsplit

from sqlalchemy.exc import InterfaceError, OperationalError

from prompt_tool.errors import ConfigurationError, DatabaseUnavailableError
from prompt_tool.settings import Settings

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["NameCache", "NameCacheStats", "RedisSourceCache", "Refresher"]

logger = logging.getLogger("prompt_tool.templates.cache")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")

Refresher = Callable[[Callable[[], None]], None]
"""Runs one refresh job, usually later and on another thread."""

# The errors that mean "the database cannot be reached" rather than "the query is wrong": only
# these may be answered from a fallback, anything else is a bug the caller has to see.
_UNREACHABLE = (DatabaseUnavailableError, OperationalError, InterfaceError)


@dataclass(frozen=True, slots=True)
class NameCacheStats:
    """The name cache's counters since it was built; a snapshot, so reading it takes no lock."""

    hits: int = 0
    stale_hits: int = 0
    misses: int = 0
    loads: int = 0
    refreshes: int = 0
    refresh_failures: int = 0
    fallbacks: int = 0


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    loaded_at: float
    # A failed refresh must not be retried by the very next request: with the database down that
    # would queue one doomed query per request instead of one per back-off period.
    retry_at: float


class _Flight(Generic[V]):
    """One load or refresh in progress for one key.

    ``generation`` comes from a counter shared by the whole cache, and ``NameCache._flights[key]``
    holds the key's current flight; a result is only stored while its flight is still current.
    Invalidation retires the flight, which is how it wins against a load that began before it.
    """

    __slots__ = ("background", "done", "error", "generation", "owner", "value")

    def __init__(self, generation: int, *, background: bool) -> None:
        self.generation = generation
        self.background = background
        self.owner = threading.get_ident()
        self.done = threading.Event()
        self.value: V | None = None
        self.error: BaseException | None = None


class _DaemonPool:
    """A few daemon worker threads fed from a queue.

    Not ``ThreadPoolExecutor``: its workers are joined at interpreter exit, so one refresh stuck on
    an unreachable database would hold up shutdown. Refreshes are disposable; daemons are right.
    """

    def __init__(self, max_workers: int) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._max_workers = max_workers
        self._workers = 0
        self._idle = 0

    def __call__(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)
        with self._lock:
            if self._idle > 0 or self._workers >= self._max_workers:
                return
            self._workers += 1
            number = self._workers
        threading.Thread(
            target=self._work, name=f"prompt-tool-cache-refresh-{number}", daemon=True
        ).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
            try:
                job()
            except Exception:  # a worker that dies would silently stop every later refresh
                logger.exception("a background cache refresh failed")


_shared_pool: _DaemonPool | None = None
_shared_pool_lock = threading.Lock()


def _default_refresher() -> Refresher:
    global _shared_pool  # noqa: PLW0603 -- one pool per process, built on first use
    with _shared_pool_lock:
        if _shared_pool is None:
            _shared_pool = _DaemonPool(max_workers=4)
        return _shared_pool


class NameCache(Generic[K, V]):
    """An in-process, thread-safe, LRU-bounded cache with stale-while-revalidate.

    ``get`` never blocks on the database for a name it has seen before: once an entry is older
    than ``ttl_s`` it is still returned, and one refresh per key is handed to ``refresher``.
    ``ttl_s=0`` turns caching off (every ``get`` loads), which keeps the call sites identical.
    """

    def __init__(
        self,
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10_000,
        refresher: Refresher | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        if ttl_s < 0:
            raise ConfigurationError(
                f"the name cache TTL is {ttl_s!r}; set it to 0 (no caching) or a positive number "
                "of seconds"
            )
        if max_entries < 1:
            raise ConfigurationError(
                f"the name cache size is {max_entries!r}; set it to a positive number of entries"
            )
        self._ttl_s = ttl_s
        self._clock = clock
        self._max_entries = max_entries
        self._refresher = refresher if refresher is not None else _default_refresher()
        self._retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._flights: dict[K, _Flight[V]] = {}
        self._generations = itertools.count(1)
        self._hits = 0
        self._stale_hits = 0
        self._misses = 0
        self._loads = 0
        self._refreshes = 0
        self._refresh_failures = 0
        self._fallbacks = 0

    @property
    def ttl_s(self) -> float:
        return self._ttl_s

    @property
    def stats(self) -> NameCacheStats:
        with self._lock:
            return NameCacheStats(
                hits=self._hits,
                stale_hits=self._stale_hits,
                misses=self._misses,
                loads=self._loads,
                refreshes=self._refreshes,
                refresh_failures=self._refresh_failures,
                fallbacks=self._fallbacks,
            )

    @property
    def size(self) -> int:
        """How many names are cached now.

        A property rather than ``__len__`` on purpose: an empty cache must stay truthy, or
        ``names or NameCache(...)`` would silently replace an injected cache that is still empty.
        """
        with self._lock:
            return len(self._entries)

    def get(
        self,
        key: K,
        load: Callable[[], V],
        *,
        fallback: Callable[[], V] | None = None,
    ) -> V:
        """The value for ``key``: cached, stale while refreshing, or loaded now on a miss.

        ``fallback`` answers a miss when ``load`` cannot reach the database; it is never cached,
        so the real value is loaded as soon as the database is back.
        """
        if self._ttl_s == 0:
            with self._lock:
                self._misses += 1
                self._loads += 1
            return self._load_or_fall_back(key, load, fallback)

        refresh: _Flight[V] | None = None
        with self._lock:
            now = self._clock()
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                flight, leader = self._join_or_lead(key)
            else:
                self._entries.move_to_end(key)
                if now - entry.loaded_at < self._ttl_s:
                    self._hits += 1
                    return entry.value
                self._stale_hits += 1
                refresh = self._claim_refresh(key, entry, now)

        if entry is None:
            if leader:
                return self._lead(key, flight, load, fallback, now)
            return self._follow(key, flight, fallback)
        if refresh is not None:
            self._schedule(key, refresh, load)
        return entry.value

    def invalidate(self, key: K) -> None:
        """Forget ``key``; a load or refresh already running for it will not be stored."""
        with self._lock:
            self._entries.pop(key, None)
            self._flights.pop(key, None)

    def invalidate_where(self, predicate: Callable[[K], bool]) -> None:
        """Forget every key ``predicate`` accepts (e.g. all names of one project)."""
        with self._lock:
            keys = set(self._entries) | set(self._flights)
        # The predicate is the caller's code: run it without the lock so it can't stall readers.
        doomed = [key for key in keys if predicate(key)]
        with self._lock:
            for key in doomed:
                self._entries.pop(key, None)
                self._flights.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._flights.clear()

    def _claim_refresh(self, key: K, entry: _Entry[V], now: float) -> _Flight[V] | None:
        if key in self._flights or now < entry.retry_at:
            return None
        flight: _Flight[V] = _Flight(next(self._generations), background=True)
        self._flights[key] = flight
        self._refreshes += 1
        return flight

    def _join_or_lead(self, key: K) -> tuple[_Flight[V], bool]:
        flight = self._flights.get(key)
        # A background refresh can be in flight for a key whose entry was evicted; a caller with
        # nothing to serve must not queue behind the pool, so it starts its own load instead.
        if flight is not None and not flight.background:
            if flight.owner == threading.get_ident():
                raise RuntimeError(
                    f"loading {key!r} asked the name cache for {key!r} again; the loader must not "
                    "call back into the cache for its own key"
                )
            return flight, False
        flight = _Flight(next(self._generations), background=False)
        self._flights[key] = flight
        self._loads += 1
        return flight, True

    def _lead(
        self,
        key: K,
        flight: _Flight[V],
        load: Callable[[], V],
        fallback: Callable[[], V] | None,
        started: float,
    ) -> V:
        try:
            value = load()
        except BaseException as error:
            # Published before re-raising so that waiters never hang, whatever went wrong.
            flight.error = error
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
            flight.done.set()
            if fallback is not None and isinstance(error, _UNREACHABLE):
                return self._fall_back(key, error, fallback)
            raise
        flight.value = value
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
                self._store(key, value, started)
        flight.done.set()
        return value

    def _follow(self, key: K, flight: _Flight[V], fallback: Callable[[], V] | None) -> V:
        flight.done.wait()
        error = flight.error
        if error is None:
            return cast(V, flight.value)
        if fallback is not None and isinstance(error, _UNREACHABLE):
            return self._fall_back(key, error, fallback)
        raise error

    def _load_or_fall_back(
        self, key: K, load: Callable[[], V], fallback: Callable[[], V] | None
    ) -> V:
        try:
            return load()
        except _UNREACHABLE as error:
            if fallback is None:
                raise
            return self._fall_back(key, error, fallback)

    def _fall_back(self, key: K, error: BaseException, fallback: Callable[[], V]) -> V:
        logger.warning(
            "cannot resolve %r: the database is unreachable (%s); using the fallback, uncached",
            key,
            _first_line(error),
        )
        with self._lock:
            self._fallbacks += 1
        return fallback()

    def _schedule(self, key: K, flight: _Flight[V], load: Callable[[], V]) -> None:
        try:
            self._refresher(partial(self._refresh, key, flight, load))
        except Exception as error:  # noqa: BLE001
            # e.g. a refresher that was shut down: the stale value still serves, so only warn.
            self._refresh_failed(key, flight, error)

    def _refresh(self, key: K, flight: _Flight[V], load: Callable[[], V]) -> None:
        started = self._clock()
        try:
            value = load()
        except Exception as error:  # noqa: BLE001
            # Whatever the failure, the stale value is still the best answer and a retry may work.
            self._refresh_failed(key, flight, error)
            return
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
                self._store(key, value, started)

    def _refresh_failed(self, key: K, flight: _Flight[V], error: BaseException) -> None:
        logger.warning(
            "refreshing %r failed (%s); serving the stale value, retrying in %gs",
            key,
            _first_line(error),
            self._retry_after_s,
        )
        with self._lock:
            self._refresh_failures += 1
            if self._flights.get(key) is flight:
                del self._flights[key]
                entry = self._entries.get(key)
                if entry is not None:
                    entry.retry_at = self._clock() + self._retry_after_s

    def _store(self, key: K, value: V, loaded_at: float) -> None:
        self._entries[key] = _Entry(value, loaded_at, retry_at=loaded_at)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return first or type(error).__name__


_Epochs = tuple[int, int]
"""(global epoch, project epoch); the project epoch is 0 for the global scope."""


class RedisSourceCache:
    """A cache shared by every process through Redis, for JSON-serialisable dicts.

    Keys carry the global epoch and the project's epoch, so :meth:`bump_epoch` invalidates a whole
    scope with one ``INCR`` and old entries simply stop being read (they expire with ``ttl_s``).
    Every Redis failure is swallowed: the caller sees a miss or a no-op, a warning is logged once
    per outage, and Redis is skipped for ``backoff_s`` after each failure so a dead server costs
    one short timeout per back-off period instead of one per call.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 30.0,
        namespace: str = "prompt-tool",
        socket_timeout_s: float = 0.25,
        backoff_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0:
            raise ConfigurationError(
                f"the Redis cache TTL is {ttl_s!r}; set it to a positive number of seconds"
            )
        # Imported here, not at the top: redis is an optional extra and the package must import
        # without it.
        try:
            import redis  # noqa: PLC0415
            from redis.backoff import NoBackoff  # noqa: PLC0415
            from redis.retry import Retry  # noqa: PLC0415
        except ImportError:
            raise ConfigurationError(
                "a Redis URL is set but the redis package is not installed; install "
                "'prompt-tool[redis]' or unset PROMPT_TOOL_REDIS_URL"
            ) from None
        self._where = _describe(url)
        try:
            self._client: Redis = redis.Redis.from_url(
                url,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                # redis-py retries by default; each retry would be one more timeout on the
                # request path, and the back-off below already decides when to try again.
                retry=Retry(NoBackoff(), 0),
                retry_on_timeout=False,
            )
        except ValueError as error:
            raise ConfigurationError(
                f"the Redis URL {self._where} is malformed ({error}); use redis://host:port/db"
            ) from None
        self._failures: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._namespace = namespace
        self._backoff_s = backoff_s
        self._clock = clock
        self._lock = threading.Lock()
        self._down = False
        self._skip_until = float("-inf")
        self._seen = threading.local()

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisSourceCache | None:
        """The shared cache ``settings`` ask for, or None when no Redis URL is configured."""
        if not settings.redis_url:
            return None
        return cls(settings.redis_url, ttl_s=settings.redis_ttl_s)

    @property
    def available(self) -> bool:
        """False while an outage is known (the last attempt failed)."""
        return not self._down

    def get(self, project_id: int | None, key: str) -> dict[str, Any] | None:
        return self._attempt(partial(self._get, project_id, key))

    def set(self, project_id: int | None, key: str, value: dict[str, Any]) -> None:
        """Store ``value`` for ``ttl_s``.

        Written under the epochs this thread saw when its last :meth:`get` of the same key missed,
        if any: the value was read from the database after that, so if a writer bumped the epoch
        in between, the possibly outdated value lands under the dead epoch and is never served.
        """
        # Serialised before touching Redis: a value that isn't JSON is the caller's bug, not an
        # outage, and must not be swallowed as one.
        payload = json.dumps(value, separators=(",", ":"), sort_keys=True)
        epochs = self._recall(project_id, key)
        self._attempt(partial(self._set, project_id, key, payload, epochs))

    def bump_epoch(self, project_id: int | None) -> None:
        """Invalidate every entry of a project, or of every project when ``project_id`` is None."""
        self._attempt(lambda client: client.incr(self._epoch_key(project_id)))

    def close(self) -> None:
        self._client.close()

    def _get(self, project_id: int | None, key: str, client: Redis) -> dict[str, Any] | None:
        epochs = self._read_epochs(client, project_id)
        raw = client.get(self._value_key(project_id, key, epochs))
        if raw is None:
            self._remember(project_id, key, epochs)
            return None
        try:
            value = json.loads(cast(bytes, raw))
        except ValueError:  # written by an incompatible version: a miss, overwritten on set
            self._remember(project_id, key, epochs)
            return None
        return value if isinstance(value, dict) else None

    def _set(
        self,
        project_id: int | None,
        key: str,
        payload: str,
        epochs: _Epochs | None,
        client: Redis,
    ) -> None:
        if epochs is None:
            epochs = self._read_epochs(client, project_id)
        client.set(self._value_key(project_id, key, epochs), payload, px=self._ttl_ms)

    def _read_epochs(self, client: Redis, project_id: int | None) -> _Epochs:
        if project_id is None:
            raw = cast(list[bytes | None], client.mget([self._epoch_key(None)]))
            return int(raw[0] or 0), 0
        raw = cast(
            list[bytes | None],
            client.mget([self._epoch_key(None), self._epoch_key(project_id)]),
        )
        return int(raw[0] or 0), int(raw[1] or 0)

    def _epoch_key(self, project_id: int | None) -> str:
        scope = "global" if project_id is None else f"p{project_id}"
        return f"{self._namespace}:epoch:{scope}"

    def _value_key(self, project_id: int | None, key: str, epochs: _Epochs) -> str:
        global_epoch, project_epoch = epochs
        if project_id is None:
            return f"{self._namespace}:src:global:e{global_epoch}:{key}"
        return f"{self._namespace}:src:p{project_id}:e{global_epoch}.{project_epoch}:{key}"

    def _remember(self, project_id: int | None, key: str, epochs: _Epochs) -> None:
        seen: dict[tuple[int | None, str], _Epochs] | None = getattr(self._seen, "epochs", None)
        if seen is None:
            seen = self._seen.epochs = {}
        seen.pop((project_id, key), None)
        seen[(project_id, key)] = epochs
        # Bounded because a get that misses is not always followed by a set (the load failed).
        if len(seen) > 256:
            del seen[next(iter(seen))]

    def _recall(self, project_id: int | None, key: str) -> _Epochs | None:
        seen: dict[tuple[int | None, str], _Epochs] | None = getattr(self._seen, "epochs", None)
        return None if seen is None else seen.pop((project_id, key), None)

    def _attempt(self, operation: Callable[[Redis], T]) -> T | None:
        with self._lock:
            now = self._clock()
            if now < self._skip_until:
                return None
            if self._down:
                # One caller probes a server known to be down; the rest keep skipping meanwhile,
                # so a burst of requests right after the back-off doesn't pay a timeout each.
                self._skip_until = now + self._backoff_s
        try:
            result = operation(self._client)
        except self._failures as error:
            self._failed(error)
            return None
        if self._down:
            self._recovered()
        return result

    def _failed(self, error: BaseException) -> None:
        with self._lock:
            self._skip_until = self._clock() + self._backoff_s
            first = not self._down
            self._down = True
        if first:
            logger.warning(
                "Redis at %s is unreachable (%s); serving without the shared cache and trying "
                "again every %gs",
                self._where,
                _first_line(error),
                self._backoff_s,
            )

    def _recovered(self) -> None:
        with self._lock:
            was_down = self._down
            self._down = False
            self._skip_until = float("-inf")
        if was_down:
            # A warning, not info, so that it shows up wherever the outage warning did.
            logger.warning("Redis at %s has recovered; using the shared cache again", self._where)


def _describe(url: str) -> str:
    """``url`` without its credentials, for log lines."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    return f"{parts.scheme}://{host}{port}{parts.path}"
