"""Where an export is written before it is published: ``.NAME.incomplete-XXXX`` beside the
target, with a lock file beside it held for as long as the export runs.

A killed export (SIGKILL, a lost machine) cannot remove its staging directory, and those are as
big as the export. The lock is what tells a dead writer's leftovers from a live writer's work:
the operating system releases it when the process dies, whatever killed it. The next export to
the same place removes what dead writers left; a live writer's directory is never touched.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Leftovers", "remove_leftovers", "staging_directory"]

_LOCK_SUFFIX = ".lock"
# Staging directories written before exports held a lock: taken as dead once nothing in them
# has changed for this long (a live export writes a block every few milliseconds).
_UNLOCKED_IDLE_S = 3600.0


@dataclass
class Leftovers:
    """What :func:`remove_leftovers` removed: directory names and their size in bytes."""

    removed: list[str] = field(default_factory=list)
    bytes: int = 0

    def describe(self) -> str:
        count = len(self.removed)
        return (
            f"removed {count} leftover{'s' if count != 1 else ''} of killed exports "
            f"({self.bytes / 1e6:,.1f} MB): {', '.join(self.removed)}"
        )


def _incomplete_prefix(target: Path) -> str:
    return f".{target.name}.incomplete-"


def _size(directory: Path) -> int:
    total = 0
    for path in directory.rglob("*"):
        with suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def _last_change(directory: Path) -> float:
    latest = directory.stat().st_mtime
    for path in directory.rglob("*"):
        with suppress(OSError):
            latest = max(latest, path.stat().st_mtime)
    return latest


def _writer_gone(lock: Path) -> bool:
    """Whether nobody holds ``lock``: its writer ended, one way or another."""
    try:
        handle = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(handle)  # closing releases the lock taken just now, if any
    return True


def remove_leftovers(target: Path) -> Leftovers:
    """Remove the staging directories of exports to ``target`` whose writer is gone."""
    leftovers = Leftovers()
    if not target.parent.is_dir():
        return leftovers
    prefix = _incomplete_prefix(target)
    for candidate in sorted(target.parent.glob(f"{prefix}*")):
        if not candidate.is_dir() or candidate.is_symlink():
            continue
        lock = candidate.with_name(candidate.name + _LOCK_SUFFIX)
        if lock.exists():
            dead = _writer_gone(lock)
        else:
            dead = time.time() - _last_change(candidate) > _UNLOCKED_IDLE_S
        if not dead:
            continue
        size = _size(candidate)
        shutil.rmtree(candidate, ignore_errors=True)
        lock.unlink(missing_ok=True)
        leftovers.removed.append(candidate.name)
        leftovers.bytes += size
    return leftovers


@contextmanager
def staging_directory(target: Path) -> Iterator[Path]:
    """A new, empty staging directory for an export to ``target``, locked while it is written;
    removed on the way out if it is still there (an export that fails or is interrupted)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_incomplete_prefix(target), dir=target.parent))
    lock = staging.with_name(staging.name + _LOCK_SUFFIX)
    handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(handle)
