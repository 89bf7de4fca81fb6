"""The name caches: in-process stale-while-revalidate, and the shared Redis layer.

Time is an injected fake clock and background refreshes run when the test says so, so no test
waits on the wall clock to order events. The Redis tests use a real server (see ``redis_url``).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from sqlalchemy.exc import InterfaceError, OperationalError

from prompt_tool.errors import ConfigurationError, DatabaseUnavailableError
from prompt_tool.settings import Settings
from prompt_tool.templates.cache import NameCache, NameCacheStats, RedisSourceCache

LOGGER = "prompt_tool.templates.cache"
DEFAULT_TEST_REDIS = "redis://127.0.0.1:6379/15"
WAIT_S = 5.0


@dataclass(frozen=True)
class Resolved:
    """Stands in for the manager's resolved template version."""

    name: str
    version: int


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ManualRefresher:
    """Holds refresh jobs until the test runs them: the in-flight window is as long as we like."""

    def __init__(self) -> None:
        self.jobs: list[Callable[[], None]] = []

    def __call__(self, job: Callable[[], None]) -> None:
        self.jobs.append(job)

    def run_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            job()


class Loader:
    """A ``load`` callable that counts its calls and returns (or raises) what it is told."""

    def __init__(self, name: str = "greeting") -> None:
        self.name = name
        self.version = 1
        self.calls = 0
        self.error: BaseException | None = None

    def __call__(self) -> Resolved:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return Resolved(self.name, self.version)


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll for a state another thread reaches; the interval only spares the CPU."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.002)


def _run_threads(count: int, target: Callable[[], Any]) -> tuple[list[Any], list[BaseException]]:
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            value = target()
        except BaseException as error:
            with lock:
                errors.append(error)
        else:
            with lock:
                results.append(value)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive(), "a caller is still blocked in the cache"
    return results, errors


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def refresher() -> ManualRefresher:
    return ManualRefresher()


@pytest.fixture
def cache(clock: FakeClock, refresher: ManualRefresher) -> NameCache[str, Resolved]:
    return NameCache(60.0, clock=clock, refresher=refresher)


# --- NameCache: freshness -------------------------------------------------------------------


def test_fresh_entry_is_served_without_loading(
    cache: NameCache[str, Resolved], clock: FakeClock
) -> None:
    load = Loader()
    assert cache.get("greeting", load) == Resolved("greeting", 1)
    clock.advance(59.9)
    load.version = 2
    assert cache.get("greeting", load) == Resolved("greeting", 1)
    assert load.calls == 1
    assert cache.stats == NameCacheStats(hits=1, misses=1, loads=1)


def test_expired_entry_is_served_stale_while_one_refresh_runs(
    cache: NameCache[str, Resolved], clock: FakeClock, refresher: ManualRefresher
) -> None:
    load = Loader()
    cache.get("greeting", load)
    clock.advance(60.0)
    load.version = 2

    for _ in range(5):
        assert cache.get("greeting", load) == Resolved("greeting", 1)
    assert load.calls == 1, "a stale read must not load synchronously"
    assert len(refresher.jobs) == 1

    refresher.run_all()
    assert cache.get("greeting", load) == Resolved("greeting", 2)
    assert load.calls == 2
    stats = cache.stats
    assert (stats.stale_hits, stats.refreshes, stats.hits) == (5, 1, 1)


def test_concurrent_stale_readers_schedule_one_refresh(
    cache: NameCache[str, Resolved], clock: FakeClock, refresher: ManualRefresher
) -> None:
    load = Loader()
    cache.get("greeting", load)
    clock.advance(61.0)
    start = threading.Barrier(16)

    def read() -> Resolved:
        start.wait(WAIT_S)
        return cache.get("greeting", load)

    results, errors = _run_threads(16, read)
    assert not errors
    assert results == [Resolved("greeting", 1)] * 16
    assert len(refresher.jobs) == 1


def test_refreshed_entry_is_fresh_for_another_ttl(
    cache: NameCache[str, Resolved], clock: FakeClock, refresher: ManualRefresher
) -> None:
    load = Loader()
    cache.get("greeting", load)
    clock.advance(60.0)
    cache.get("greeting", load)
    refresher.run_all()
    clock.advance(59.0)
    cache.get("greeting", load)
    assert refresher.jobs == []
    assert load.calls == 2


def test_failed_refresh_keeps_serving_stale_and_retries_later(
    clock: FakeClock, refresher: ManualRefresher, caplog: pytest.LogCaptureFixture
) -> None:
    cache: NameCache[str, Resolved] = NameCache(
        60.0, clock=clock, refresher=refresher, retry_after_s=1.0
    )
    load = Loader()
    cache.get("greeting", load)
    clock.advance(60.0)
    load.error = OperationalError("SELECT", {}, Exception("server closed the connection"))

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.get("greeting", load) == Resolved("greeting", 1)
        refresher.run_all()
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert record.levelno == logging.WARNING
    assert "refreshing 'greeting' failed" in record.getMessage()

    # Still stale, and no retry before the back-off: a down database gets one query per second.
    assert cache.get("greeting", load) == Resolved("greeting", 1)
    assert refresher.jobs == []

    clock.advance(1.0)
    load.error = None
    load.version = 2
    assert cache.get("greeting", load) == Resolved("greeting", 1)
    refresher.run_all()
    assert cache.get("greeting", load) == Resolved("greeting", 2)
    assert cache.stats.refresh_failures == 1


def test_a_refresher_that_refuses_the_job_leaves_the_stale_value_serving(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def shut_down(job: Callable[[], None]) -> None:
        raise RuntimeError("cannot schedule new futures after shutdown")

    cache: NameCache[str, Resolved] = NameCache(60.0, clock=clock, refresher=shut_down)
    load = Loader()
    cache.get("greeting", load)
    clock.advance(60.0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.get("greeting", load) == Resolved("greeting", 1)
    assert "after shutdown" in caplog.text


def test_default_refresher_refreshes_on_a_daemon_thread(clock: FakeClock) -> None:
    cache: NameCache[str, Resolved] = NameCache(60.0, clock=clock)
    cache.get("greeting", Loader())
    clock.advance(60.0)
    release = threading.Event()
    ran_on: list[threading.Thread] = []

    def slow_load() -> Resolved:
        ran_on.append(threading.current_thread())
        assert release.wait(WAIT_S)
        return Resolved("greeting", 2)

    # Returns while the refresh is still blocked: it cannot be running on this thread.
    assert cache.get("greeting", slow_load) == Resolved("greeting", 1)
    release.set()
    _wait_until(
        lambda: cache.get("greeting", slow_load) == Resolved("greeting", 2),
        "the background refresh is stored",
    )
    assert ran_on[0] is not threading.current_thread()
    assert ran_on[0].daemon


# --- NameCache: misses ----------------------------------------------------------------------


def test_concurrent_misses_load_once(cache: NameCache[str, Resolved]) -> None:
    entered = threading.Event()
    release = threading.Event()
    calls = 0

    def slow_load() -> Resolved:
        nonlocal calls
        calls += 1
        entered.set()
        assert release.wait(WAIT_S)
        return Resolved("greeting", 7)

    results: list[Resolved] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get("greeting", slow_load)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    assert entered.wait(WAIT_S)
    # Every caller has registered its miss (under the cache's lock) before the load may finish.
    _wait_until(lambda: cache.stats.misses == 8, "all eight callers have missed")
    release.set()
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive()
    assert calls == 1
    assert results == [Resolved("greeting", 7)] * 8
    assert cache.stats.loads == 1


def test_a_failed_load_reaches_every_waiting_caller_and_is_not_cached(
    cache: NameCache[str, Resolved],
) -> None:
    entered = threading.Event()
    release = threading.Event()

    def failing_load() -> Resolved:
        entered.set()
        assert release.wait(WAIT_S)
        raise LookupError("no template named 'greeting'")

    caught: list[BaseException] = []

    def call() -> None:
        try:
            cache.get("greeting", failing_load)
        except LookupError as error:
            caught.append(error)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert entered.wait(WAIT_S)
    _wait_until(lambda: cache.stats.misses == 4, "all four callers have missed")
    release.set()
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive()
    assert len(caught) == 4
    assert cache.stats.loads == 1

    load = Loader()
    assert cache.get("greeting", load) == Resolved("greeting", 1)
    assert load.calls == 1


def test_a_loader_that_asks_for_its_own_key_fails_instead_of_deadlocking(
    cache: NameCache[str, Resolved],
) -> None:
    def reentrant() -> Resolved:
        return cache.get("greeting", reentrant)

    with pytest.raises(RuntimeError, match="must not call back"):
        cache.get("greeting", reentrant)


@pytest.mark.parametrize(
    "error",
    [
        DatabaseUnavailableError("cannot connect to postgresql://db/app"),
        OperationalError("SELECT 1", {}, Exception("connection refused")),
        InterfaceError("SELECT 1", {}, Exception("connection already closed")),
    ],
    ids=["DatabaseUnavailableError", "OperationalError", "InterfaceError"],
)
def test_unreachable_database_on_a_miss_uses_the_fallback_uncached(
    cache: NameCache[str, Resolved], error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    load = Loader()
    load.error = error
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = cache.get("greeting", load, fallback=lambda: Resolved("greeting", 0))
    assert got == Resolved("greeting", 0)
    assert "using the fallback" in caplog.text
    assert cache.stats.fallbacks == 1

    load.error = None
    assert cache.get("greeting", load, fallback=lambda: Resolved("greeting", 0)) == Resolved(
        "greeting", 1
    )


def test_fallback_only_for_names_never_fetched(
    cache: NameCache[str, Resolved], clock: FakeClock, refresher: ManualRefresher
) -> None:
    fetched = Loader("fetched")
    cache.get("fetched", fetched)
    clock.advance(120.0)
    down = DatabaseUnavailableError("cannot connect")
    fetched.error = down
    fell_back: list[str] = []

    def fallback(name: str) -> Callable[[], Resolved]:
        def answer() -> Resolved:
            fell_back.append(name)
            return Resolved(name, 0)

        return answer

    never = Loader("never")
    never.error = down
    assert cache.get("fetched", fetched, fallback=fallback("fetched")) == Resolved("fetched", 1)
    refresher.run_all()
    assert cache.get("fetched", fetched, fallback=fallback("fetched")) == Resolved("fetched", 1)
    assert cache.get("never", never, fallback=fallback("never")) == Resolved("never", 0)
    assert fell_back == ["never"]


def test_errors_other_than_an_unreachable_database_are_raised_despite_a_fallback(
    cache: NameCache[str, Resolved],
) -> None:
    load = Loader()
    load.error = LookupError("no template named 'greeting'")
    with pytest.raises(LookupError):
        cache.get("greeting", load, fallback=lambda: Resolved("greeting", 0))
    assert cache.stats.fallbacks == 0


def test_unreachable_database_without_a_fallback_is_raised(
    cache: NameCache[str, Resolved],
) -> None:
    load = Loader()
    load.error = DatabaseUnavailableError("cannot connect")
    with pytest.raises(DatabaseUnavailableError):
        cache.get("greeting", load)


def test_waiting_callers_each_get_their_own_fallback(cache: NameCache[str, Resolved]) -> None:
    entered = threading.Event()
    release = threading.Event()

    def down() -> Resolved:
        entered.set()
        assert release.wait(WAIT_S)
        raise DatabaseUnavailableError("cannot connect")

    outcome: dict[int, Resolved] = {}

    def caller(number: int) -> None:
        def own_fallback() -> Resolved:
            return Resolved("greeting", -number)

        outcome[number] = cache.get("greeting", down, fallback=own_fallback)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    assert entered.wait(WAIT_S)
    _wait_until(lambda: cache.stats.misses == 3, "all three callers have missed")
    release.set()
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive()
    assert outcome == {i: Resolved("greeting", -i) for i in range(3)}
    assert cache.stats.fallbacks == 3


# --- NameCache: configuration and bounds ----------------------------------------------------


def test_zero_ttl_disables_caching(clock: FakeClock, refresher: ManualRefresher) -> None:
    cache: NameCache[str, Resolved] = NameCache(0, clock=clock, refresher=refresher)
    load = Loader()
    for _ in range(3):
        cache.get("greeting", load)
    assert load.calls == 3
    assert cache.size == 0
    load.error = DatabaseUnavailableError("cannot connect")
    assert cache.get("greeting", load, fallback=lambda: Resolved("greeting", 0)) == Resolved(
        "greeting", 0
    )


def test_least_recently_used_entry_is_evicted(clock: FakeClock, refresher: ManualRefresher) -> None:
    cache: NameCache[str, Resolved] = NameCache(
        60.0, clock=clock, refresher=refresher, max_entries=2
    )
    loads = {name: Loader(name) for name in ("a", "b", "c")}
    cache.get("a", loads["a"])
    cache.get("b", loads["b"])
    cache.get("a", loads["a"])  # "b" is now the least recently used
    cache.get("c", loads["c"])
    assert cache.size == 2
    cache.get("a", loads["a"])
    cache.get("b", loads["b"])
    assert (loads["a"].calls, loads["b"].calls, loads["c"].calls) == (1, 2, 1)


@pytest.mark.parametrize(
    ("ttl_s", "max_entries"), [(-1.0, 10), (60.0, 0)], ids=["negative-ttl", "no-room"]
)
def test_nonsense_settings_are_a_configuration_error(ttl_s: float, max_entries: int) -> None:
    with pytest.raises(ConfigurationError):
        NameCache(ttl_s, max_entries=max_entries)


def test_keys_can_be_tuples_and_values_any_type(clock: FakeClock) -> None:
    cache: NameCache[tuple[int | None, str, str], dict[str, int]] = NameCache(60.0, clock=clock)
    assert cache.get((None, "greeting", "production"), lambda: {"version": 3}) == {"version": 3}
    assert cache.get((7, "greeting", "production"), lambda: {"version": 4}) == {"version": 4}


# --- NameCache: invalidation ----------------------------------------------------------------


def test_invalidated_name_is_loaded_again(cache: NameCache[str, Resolved]) -> None:
    load = Loader()
    cache.get("greeting", load)
    cache.invalidate("greeting")
    cache.invalidate("never-cached")
    load.version = 2
    assert cache.get("greeting", load) == Resolved("greeting", 2)


def test_invalidation_beats_an_in_flight_refresh(
    cache: NameCache[str, Resolved], clock: FakeClock, refresher: ManualRefresher
) -> None:
    load = Loader()
    cache.get("greeting", load)
    clock.advance(60.0)
    cache.get("greeting", load)  # schedules a refresh that will read version 1 ...
    cache.invalidate("greeting")  # ... but a write happened after it started
    load.version = 2
    refresher.run_all()
    assert cache.size == 0, "the refresh from before the invalidation must not be stored"

    load.version = 3
    assert cache.get("greeting", load) == Resolved("greeting", 3)


def test_invalidation_beats_an_in_flight_miss_load(cache: NameCache[str, Resolved]) -> None:
    entered = threading.Event()
    release = threading.Event()

    def old_load() -> Resolved:
        entered.set()
        assert release.wait(WAIT_S)
        return Resolved("greeting", 1)

    first: list[Resolved] = []
    thread = threading.Thread(target=lambda: first.append(cache.get("greeting", old_load)))
    thread.start()
    assert entered.wait(WAIT_S)

    cache.invalidate("greeting")
    # A caller after the invalidation must not join the old load: it loads for itself.
    assert cache.get("greeting", lambda: Resolved("greeting", 2)) == Resolved("greeting", 2)
    release.set()
    thread.join(WAIT_S)
    assert first == [Resolved("greeting", 1)], "the caller from before still gets its answer"
    assert cache.get("greeting", Loader()) == Resolved("greeting", 2), "but it is not stored"


def test_invalidate_where_forgets_only_matching_names(
    clock: FakeClock, refresher: ManualRefresher
) -> None:
    cache: NameCache[tuple[int, str], Resolved] = NameCache(60.0, clock=clock, refresher=refresher)
    for project, name in [(1, "a"), (1, "b"), (2, "a")]:
        cache.get((project, name), Loader(name))
    clock.advance(60.0)
    cache.get((1, "a"), lambda: Resolved("a", 1))  # a refresh in flight for a matching key

    cache.invalidate_where(lambda key: key[0] == 1)
    refresher.run_all()
    assert cache.size == 1
    assert cache.get((2, "a"), lambda: Resolved("a", 99)) == Resolved("a", 1)
    assert cache.get((1, "b"), lambda: Resolved("b", 2)) == Resolved("b", 2)


def test_clear_forgets_everything_including_in_flight_refreshes(
    cache: NameCache[str, Resolved], clock: FakeClock, refresher: ManualRefresher
) -> None:
    cache.get("a", Loader("a"))
    cache.get("b", Loader("b"))
    clock.advance(60.0)
    cache.get("a", Loader("a"))
    cache.clear()
    refresher.run_all()
    assert cache.size == 0


# --- Redis: finding a server ------------------------------------------------------------------


def _require_redis() -> bool:
    return os.environ.get("PROMPT_TOOL_REQUIRE_REDIS", "") in {"1", "true", "yes"}


def _pings(url: str) -> str | None:
    """None when ``url`` answers PING, else why not."""
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        client.ping()
    except (redis.RedisError, OSError) as error:
        return str(error)
    finally:
        client.close()
    return None


def _missing(reason: str) -> None:
    if _require_redis():
        pytest.fail(f"PROMPT_TOOL_REQUIRE_REDIS=1 but {reason}")
    pytest.skip(f"SKIPPING Redis tests: {reason}; set PROMPT_TOOL_REQUIRE_REDIS=1 to fail instead")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis to test against: ``PROMPT_TOOL_TEST_REDIS_URL``, else db 15 on localhost."""
    url = os.environ.get("PROMPT_TOOL_TEST_REDIS_URL") or DEFAULT_TEST_REDIS
    problem = _pings(url)
    if problem is not None:
        _missing(f"no Redis answers at {url} ({problem})")
    return url


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A namespace no other test or run uses; every key under it is deleted afterwards."""
    name = f"pt-test-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{name}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def shared(redis_url: str, namespace: str) -> Iterator[RedisSourceCache]:
    cache = RedisSourceCache(redis_url, namespace=namespace)
    yield cache
    cache.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateRedis:
    """A redis-server of our own, so a test can take it away without harming anyone else."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        process = self.process

        def up() -> bool:
            if process.poll() is not None:
                pytest.fail(f"redis-server on port {self.port} exited with {process.returncode}")
            return _pings(self.url) is None

        _wait_until(up, f"redis-server answers PING on port {self.port}")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(WAIT_S)
            self.process = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        _missing("redis-server is not on PATH")
    assert binary is not None
    server = PrivateRedis(binary, _free_port())
    server.start()
    yield server
    server.kill()


# --- RedisSourceCache ---------------------------------------------------------------------


def test_shared_cache_round_trips_json_dicts_per_scope(shared: RedisSourceCache) -> None:
    value = {"template_id": 3, "version": 2, "label": "production", "tags": ["a", "b"]}
    assert shared.get(7, "greeting@production") is None
    shared.set(7, "greeting@production", value)
    shared.set(None, "greeting@production", {"template_id": 1, "version": 1})
    assert shared.get(7, "greeting@production") == value
    assert shared.get(None, "greeting@production") == {"template_id": 1, "version": 1}
    assert shared.get(8, "greeting@production") is None


def test_entries_are_shared_between_processes(redis_url: str, namespace: str) -> None:
    writer = RedisSourceCache(redis_url, namespace=namespace)
    reader = RedisSourceCache(redis_url, namespace=namespace)
    writer.set(7, "greeting", {"version": 1})
    assert reader.get(7, "greeting") == {"version": 1}
    reader.bump_epoch(7)
    assert writer.get(7, "greeting") is None
    writer.close()
    reader.close()


def test_bumping_a_project_epoch_invalidates_only_that_project(shared: RedisSourceCache) -> None:
    shared.set(7, "greeting", {"version": 1})
    shared.set(8, "greeting", {"version": 1})
    shared.set(None, "greeting", {"version": 1})
    shared.bump_epoch(7)
    assert shared.get(7, "greeting") is None
    assert shared.get(8, "greeting") == {"version": 1}
    assert shared.get(None, "greeting") == {"version": 1}

    shared.set(7, "greeting", {"version": 2})
    assert shared.get(7, "greeting") == {"version": 2}


def test_bumping_the_global_epoch_invalidates_every_project(shared: RedisSourceCache) -> None:
    shared.set(7, "greeting", {"version": 1})
    shared.set(8, "greeting", {"version": 1})
    shared.set(None, "greeting", {"version": 1})
    shared.bump_epoch(None)
    assert shared.get(7, "greeting") is None
    assert shared.get(8, "greeting") is None
    assert shared.get(None, "greeting") is None


def test_entries_are_written_with_the_ttl(redis_url: str, namespace: str) -> None:
    cache = RedisSourceCache(redis_url, namespace=namespace, ttl_s=30.0)
    cache.set(7, "greeting", {"version": 1})
    client = redis.Redis.from_url(redis_url)
    [key] = list(client.scan_iter(match=f"{namespace}:src:*"))
    assert 0 < int(client.pttl(key)) <= 30_000
    client.close()
    cache.close()


def test_a_value_read_before_a_concurrent_bump_is_not_served_after_it(
    redis_url: str, namespace: str, shared: RedisSourceCache
) -> None:
    other_process = RedisSourceCache(redis_url, namespace=namespace)
    assert shared.get(7, "greeting") is None  # miss: the manager goes to the database ...
    other_process.bump_epoch(7)  # ... while another process publishes a new version
    shared.set(7, "greeting", {"version": 1})  # the now outdated read lands in the old epoch
    assert other_process.get(7, "greeting") is None
    assert shared.get(7, "greeting") is None
    other_process.close()


def test_a_value_that_is_not_json_is_the_callers_error(shared: RedisSourceCache) -> None:
    with pytest.raises(TypeError):
        shared.set(7, "greeting", {"when": object()})


def test_redis_going_away_mid_run_fails_open(
    private_redis: PrivateRedis, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    cache = RedisSourceCache(private_redis.url, backoff_s=5.0, clock=clock)
    cache.set(7, "greeting", {"version": 1})
    assert cache.get(7, "greeting") == {"version": 1}

    private_redis.kill()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        started = time.perf_counter()
        for _ in range(100):
            assert cache.get(7, "greeting") is None
            cache.set(7, "greeting", {"version": 2})
            cache.bump_epoch(7)
            cache.bump_epoch(None)
        elapsed = time.perf_counter() - started
        assert elapsed < 0.5, f"400 calls against a dead Redis took {elapsed:.2f}s"
        assert not cache.available

        clock.advance(5.0)  # the back-off is over, but Redis is still down: same outage
        assert cache.get(7, "greeting") is None
    outage = [r for r in caplog.records if r.name == LOGGER]
    assert len(outage) == 1, [r.getMessage() for r in outage]
    assert outage[0].levelno == logging.WARNING
    assert "unreachable" in outage[0].getMessage()
    caplog.clear()

    private_redis.start()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.get(7, "greeting") is None, "skipped: still inside the back-off"
        cache.set(7, "greeting", {"version": 3})
        clock.advance(5.0)
        assert cache.get(7, "greeting") is None  # recovers; the restarted server is empty
        cache.set(7, "greeting", {"version": 3})
        assert cache.get(7, "greeting") == {"version": 3}
    assert cache.available
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        f"Redis at redis://127.0.0.1:{private_redis.port}/0 has recovered; using the shared "
        "cache again"
    ]
    cache.close()


def test_a_hanging_redis_costs_one_short_timeout_then_backs_off(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Accepts TCP connections (the kernel does that) but never answers, like a wedged server.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(16)
        port = mute.getsockname()[1]
        cache = RedisSourceCache(
            f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.05, backoff_s=5.0, clock=clock
        )
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            started = time.perf_counter()
            assert cache.get(7, "greeting") is None
            first = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(100):
                assert cache.get(7, "greeting") is None
            rest = time.perf_counter() - started
        cache.close()
    assert first < 1.0
    assert rest < 0.1, f"100 calls inside the back-off took {rest:.2f}s"
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1


def test_an_unreachable_redis_at_startup_fails_open(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    cache = RedisSourceCache(f"redis://127.0.0.1:{_free_port()}/0", clock=clock)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.get(None, "greeting") is None
        cache.set(None, "greeting", {"version": 1})
        cache.bump_epoch(None)
    assert "unreachable" in caplog.text
    assert "has recovered" not in caplog.text


def test_credentials_stay_out_of_the_log(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    cache = RedisSourceCache(f"redis://app:s3cret@127.0.0.1:{_free_port()}/0", clock=clock)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cache.get(None, "greeting")
    assert "unreachable" in caplog.text
    assert "s3cret" not in caplog.text


def test_from_settings_is_none_without_a_redis_url() -> None:
    assert RedisSourceCache.from_settings(Settings()) is None


def test_from_settings_builds_a_cache_from_the_redis_url() -> None:
    cache = RedisSourceCache.from_settings(Settings(redis_url="redis://127.0.0.1:1/0"))
    assert isinstance(cache, RedisSourceCache)
    cache.close()


def test_a_malformed_redis_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="malformed"):
        RedisSourceCache("http://127.0.0.1:6379")


def test_a_redis_url_without_the_redis_extra_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigurationError, match=r"prompt-tool\[redis\]"):
        RedisSourceCache("redis://127.0.0.1:6379/0")


def test_the_cache_module_imports_without_redis_installed() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from prompt_tool.templates.cache import NameCache, RedisSourceCache\n"
        "assert NameCache(1.0).get('k', lambda: 1) == 1\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
