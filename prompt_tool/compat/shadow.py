"""Shadow mode: the legacy text is returned; the template path runs beside it and is compared,
the way GitHub's Scientist runs a candidate beside the control. Mismatches and render errors are
counted per project and handed to a pluggable publisher; they never change what is returned.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

from prompt_tool.core import content_hash

__all__ = [
    "LogPublisher",
    "ShadowCounters",
    "ShadowEvent",
    "ShadowPublisher",
    "is_sampled",
    "short_diff",
    "text_hash",
]

logger = logging.getLogger("prompt_tool.compat.shadow")

_DIFF_LINES = 8
_DIFF_LINE_CHARS = 120


@dataclass(frozen=True, slots=True)
class ShadowEvent:
    """One shadow comparison that did not match: no full prompt text, only hashes and a diff."""

    project: str
    session_id: int
    role: str
    kind: str  # "mismatch" or "render_error"
    version_id: int
    legacy_hash: str | None
    rendered_hash: str | None
    diff: str
    error: str | None = None


class ShadowPublisher(Protocol):
    def publish(self, event: ShadowEvent) -> None: ...


class LogPublisher:
    """The default publisher: one structured (JSON) warning line per event."""

    def publish(self, event: ShadowEvent) -> None:
        logger.warning(
            "template read %s %s",
            event.kind,
            json.dumps(
                {
                    "project": event.project,
                    "session_id": event.session_id,
                    "role": event.role,
                    "version_id": event.version_id,
                    "legacy_sha256": event.legacy_hash,
                    "rendered_sha256": event.rendered_hash,
                    "diff": event.diff,
                    "error": event.error,
                },
                ensure_ascii=False,
            ),
        )


class ShadowCounters:
    """Per-project counts of shadow comparisons, safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, Counter[str]] = {}

    def add(self, project: str, outcome: str) -> None:
        with self._lock:
            self._counts.setdefault(project, Counter())[outcome] += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {project: dict(counts) for project, counts in self._counts.items()}


def is_sampled(session_id: int, rate: float) -> bool:
    """Whether this session is compared at ``rate``: stable per session, the same everywhere."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(str(session_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


def short_diff(expected: str | None, actual: str | None) -> str:
    """A few lines of unified diff, each cut short: enough to see what differs, not the prompt."""
    lines = difflib.unified_diff(
        (expected or "").splitlines(keepends=True),
        (actual or "").splitlines(keepends=True),
        "legacy",
        "template",
        n=0,
    )
    kept = [line.rstrip("\n")[:_DIFF_LINE_CHARS] for line in islice(lines, _DIFF_LINES)]
    return "\n".join(kept)


def text_hash(text: str | None) -> str | None:
    return None if text is None else content_hash(text)
