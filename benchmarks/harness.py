"""What every benchmark section shares: a scratch PostgreSQL database, timers, peak memory,
and the result rows that end up in the Markdown table and the JSON file."""

from __future__ import annotations

import gc
import os
import resource
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class Measurement:
    """One row of the report: our path, its baselines, and how it compares with them."""

    section: str
    what: str
    ours_per_s: float
    baselines: dict[str, float]
    targets: dict[str, str] = field(default_factory=dict)
    verdicts: dict[str, bool] = field(default_factory=dict)
    peak_rss_mib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def ratio(self, baseline: str) -> float:
        return self.ours_per_s / self.baselines[baseline]


def server_url() -> str:
    return os.environ.get("PROMPT_TOOL_BENCH_DATABASE_URL") or DEFAULT_SERVER


@contextmanager
def scratch_database(label: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one run, dropped afterwards."""
    admin = make_url(server_url()).set(drivername="postgresql")
    name = f"pt_bench_{label}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
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
