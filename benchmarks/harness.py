"""What every benchmark section shares: a scratch PostgreSQL database, timers, peak memory,
and the result rows that end up in the Markdown table and the JSON file."""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass(frozen=True)
class Target:
    """``ours / baseline`` (rates) must be at least ``minimum``; ``text`` says it for people."""

    minimum: float
    text: str


@dataclass
class Measurement:
    """One row of the report: our path, its baselines, and how it compares with them."""

    section: str
    what: str
    ours_per_s: float
    baselines: dict[str, float]
    targets: dict[str, Target] = field(default_factory=dict)
    peak_rss_mib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Targets that are met when any one of them is (verify: a rate per core OR a ratio).
    either: bool = False
    absolute_target: tuple[float, str] | None = None  # (minimum rows/s, text); never fails CI

    def ratio(self, baseline: str) -> float:
        return self.ours_per_s / self.baselines[baseline]

    def met(self, baseline: str) -> bool:
        return self.ratio(baseline) >= self.targets[baseline].minimum

    def below_half(self, baseline: str) -> bool:
        """The smoke check: a ratio below half its target (rates, so half the minimum)."""
        return self.ratio(baseline) < self.targets[baseline].minimum / 2

    def verdict(self) -> bool | None:
        checks = [self.met(b) for b in self.targets]
        if self.absolute_target is not None:
            checks.append(self.ours_per_s >= self.absolute_target[0])
        if not checks:
            return None
        return any(checks) if self.either else all(checks)

    def as_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "what": self.what,
            "ours_per_s": self.ours_per_s,
            "baselines": {
                name: {
                    "per_s": rate,
                    "ratio": self.ratio(name),
                    "target": self.targets[name].text if name in self.targets else None,
                    "met": self.met(name) if name in self.targets else None,
                }
                for name, rate in self.baselines.items()
            },
            "absolute_target": self.absolute_target[1] if self.absolute_target else None,
            "met": self.verdict(),
            "peak_rss_mib": self.peak_rss_mib,
            "extra": self.extra,
        }


def server_url() -> str:
    return os.environ.get("PROMPT_TOOL_BENCH_DATABASE_URL") or DEFAULT_SERVER


def libpq(url: str) -> str:
    """The URL as psycopg wants it (no SQLAlchemy driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def admin_url(url: str) -> str:
    return libpq(make_url(url).set(database="postgres").render_as_string(hide_password=False))


@contextmanager
def scratch_database(label: str, template: str | None = None) -> Iterator[str]:
    """A fresh PostgreSQL database (a copy of ``template``'s when given), dropped afterwards."""
    base = make_url(template or server_url()).set(drivername="postgresql")
    name = f"pt_bench_{label}_{uuid.uuid4().hex[:8]}"
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(str(make_url(template).database))
        )
    with psycopg.connect(admin_url(str(base)), autocommit=True) as conn:
        conn.execute(statement)
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url(str(base)), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def timed(function: Callable[[], Any], *, repeat: int = 1) -> float:
    """The best wall time of ``repeat`` runs: the least disturbed by the rest of the machine."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_path(name: str, *args: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run one of our heavy paths (benchmarks.paths) in a fresh process: its RSS is its own.
    ``env`` is added to this process's environment for it."""
    done = subprocess.run(  # noqa: S603 - our own interpreter running our own module
        [sys.executable, "-m", "benchmarks.paths", name, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env} if env else None,
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark path {name} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": ordered[-1], "n": len(ordered)}


def log(message: str) -> None:
    """Progress on stderr, so stdout stays the report."""
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()
