"""Content hashing and the in-memory cache of compiled templates.

The cache is keyed by the source text itself, so an entry can never be stale: the same text
always compiles to the same code, and a text changed behind our back (in the database, say) is
a different key. Looking a text up costs a dict probe (Python keeps a string's hash with it, and
an identical object compares by identity) where a digest would cost a SHA-256 per render. Only
the size bound (LRU) ever evicts anything.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["CompiledCache", "CompiledCacheStats", "content_hash"]

T = TypeVar("T")


def content_hash(text: str) -> str:
    """SHA-256 hex digest of ``text``'s UTF-8 bytes: the identity of a template version."""
    # surrogatepass keeps this total: a lone surrogate gets *a* stable hash here and is
    # refused by validation, rather than crashing whoever merely wanted a key.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class CompiledCacheStats:
    """The compiled cache's lookups (hits, misses) and fill (size of maxsize), a snapshot."""

    hits: int
    misses: int
    size: int
    maxsize: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class CompiledCache(Generic[T]):
    """A bounded, thread-safe LRU mapping source text -> compiled template, with counters.

    Compilation happens outside the lock: two threads missing the same key at once both
    compile and one result wins, which is harmless because both are identical.
    """

    def __init__(self, maxsize: int = 2048) -> None:
        if maxsize < 1:
            raise ValueError(f"CompiledCache maxsize must be at least 1, got {maxsize}")
        self.maxsize = maxsize
        self._entries: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def get(self, key: str) -> T | None:
        value = self.find(key)
        if value is None:
            with self._lock:
                self._misses += 1
        return value

    def find(self, key: str) -> T | None:
        """Like :meth:`get`, but a miss is not counted: the caller may have no use for the
        entry (a literal text is never compiled), and counts it by calling :meth:`get`."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                self._hits += 1
            return value

    def put(self, key: str, value: T) -> T:
        """Store ``value`` and return the entry now cached under ``key`` (first writer wins)."""
        with self._lock:
            existing = self._entries.get(key)
            if existing is not None:
                self._entries.move_to_end(key)
                return existing
            self._entries[key] = value
            if len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
            return value

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._hits = 0
            self._misses = 0

    def stats(self) -> CompiledCacheStats:
        with self._lock:
            return CompiledCacheStats(
                hits=self._hits,
                misses=self._misses,
                size=len(self._entries),
                maxsize=self.maxsize,
            )
