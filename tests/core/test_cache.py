"""Compiled templates are cached by content hash in a bounded, thread-safe LRU."""

from __future__ import annotations

import hashlib
import threading

import pytest

from prompt_tool.core import CompiledCache, CompiledCacheStats, TemplateEngine, content_hash
from prompt_tool.settings import Settings


def test_content_hash_is_sha256_hex_of_utf8_bytes() -> None:
    text = "héllo\r\n{{ x }}"
    assert content_hash(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert len(content_hash("")) == 64


def test_content_hash_never_crashes_on_lone_surrogates() -> None:
    assert content_hash("\ud800") == content_hash("\ud800")


def test_lru_evicts_the_least_recently_used_entry() -> None:
    cache: CompiledCache[str] = CompiledCache(maxsize=2)
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"  # "b" is now the least recently used
    cache.put("c", "C")
    assert "b" not in cache
    assert cache.get("a") == "A"
    assert cache.get("c") == "C"
    assert len(cache) == 2


def test_counters_track_hits_and_misses() -> None:
    cache: CompiledCache[str] = CompiledCache(maxsize=4)
    assert cache.get("x") is None
    cache.put("x", "X")
    assert cache.get("x") == "X"
    assert cache.get("x") == "X"
    assert cache.stats() == CompiledCacheStats(hits=2, misses=1, size=1, maxsize=4)
    assert cache.stats().hit_rate == pytest.approx(2 / 3)
    cache.clear()
    assert cache.stats() == CompiledCacheStats(hits=0, misses=0, size=0, maxsize=4)


def test_first_writer_wins_so_every_reader_shares_one_entry() -> None:
    cache: CompiledCache[list[int]] = CompiledCache()
    first, second = [1], [1]
    assert cache.put("k", first) is first
    assert cache.put("k", second) is first


def test_cache_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CompiledCache(maxsize=0)


def test_cache_is_thread_safe_under_contention() -> None:
    cache: CompiledCache[int] = CompiledCache(maxsize=50)
    errors: list[BaseException] = []

    def hammer(offset: int) -> None:
        try:
            for i in range(2000):
                key = str((i * 7 + offset) % 120)
                if cache.get(key) is None:
                    cache.put(key, i)
        except BaseException as error:  # surfaced below, in the main thread
            errors.append(error)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = cache.stats()
    assert stats.size <= 50
    assert stats.hits + stats.misses == 8 * 2000


def test_engine_compiles_each_distinct_source_once(engine: TemplateEngine) -> None:
    first = engine.compile("Hi {{ x }}", name="a")
    again = engine.compile("Hi {{ x }}", name="b")  # same content under another name
    other = engine.compile("Bye {{ x }}", name="a")
    assert first is again
    assert other is not first
    assert engine.cache_stats().size == 2
    assert engine.cache_stats().hits == 1


def test_engine_cache_is_bounded() -> None:
    engine = TemplateEngine(settings=Settings(), cache_size=3)
    for i in range(10):
        engine.render(f"{{{{ {i} }}}}", name="t")
    assert engine.cache_stats().size == 3


def test_text_without_markup_renders_to_itself_without_compiling() -> None:
    engine = TemplateEngine(settings=Settings())
    text = "plain {text} with braces }} and 100% of it\r\n"
    assert engine.render(text, name="t") == text
    assert engine.cache_stats().size == 0


def test_text_without_markup_still_meets_the_output_cap_and_variable_checks() -> None:
    from prompt_tool.core import RenderLimits, TemplateLimitError, VariableError

    engine = TemplateEngine(settings=Settings(), limits=RenderLimits(max_output_bytes=10))
    with pytest.raises(TemplateLimitError):
        engine.render("x" * 11, name="t")
    with pytest.raises(VariableError):
        engine.render("x", {"a": 1}, name="t", declared_variables=[{"name": "b"}])
