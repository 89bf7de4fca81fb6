"""Our heavy paths, each run in a fresh process so its peak RSS is its own:
``python -m benchmarks.paths backfill|verify|export URL [ARG]`` writes one JSON line."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import peak_rss_mib
from prompt_tool.db import schema
from prompt_tool.db.engine import make_engine
from prompt_tool.migrate.backfill import BackfillOptions, backfill
from prompt_tool.migrate.export import export
from prompt_tool.migrate.verify import verify
from prompt_tool.settings import Settings
from prompt_tool.templates import TemplateManager


def _backfill(url: str, workers: str = "1") -> dict[str, Any]:
    engine = make_engine(url)
    start = time.perf_counter()
    summary = backfill(engine, BackfillOptions(workers=int(workers)))
    elapsed = time.perf_counter() - start
    engine.dispose()
    return {
        "elapsed_s": elapsed,
        "rows": summary.sessions_scanned,
        "run_id": summary.run_id,
        "batches": summary.batches,
        "templates": summary.templates_created,
        "references": summary.references_created,
    }


def _verify(url: str) -> dict[str, Any]:
    engine = make_engine(url)
    manager = TemplateManager(engine, settings=Settings(database_url=url, redis_url=None))
    start = time.perf_counter()
    report = verify(engine, manager=manager)
    elapsed = time.perf_counter() - start
    engine.dispose()
    totals = report.totals()
    return {
        "elapsed_s": elapsed,
        "passed": report.passed,
        "checked": totals.checked,
        "matched": totals.matched,
    }


def _export(url: str, target: str) -> dict[str, Any]:
    engine = make_engine(url)
    start = time.perf_counter()
    result = export(engine, Path(target))
    elapsed = time.perf_counter() - start
    engine.dispose()
    return {
        "elapsed_s": elapsed,
        "rows": result.rows,
        "bytes": result.bytes,
        "tables": result.row_counts,
    }


def _downgrade(url: str, archive: str) -> dict[str, Any]:
    start = time.perf_counter()
    state = schema.downgrade(url, archive=archive)
    elapsed = time.perf_counter() - start
    schema.upgrade(url)  # the data set stays usable for what runs after
    return {
        "elapsed_s": elapsed,
        "removed": state.removed,
        "batches": state.batches,
        "longest_batch_ms": state.longest_batch_ms,
        "last_transaction_ms": state.last_transaction_ms,
        "exclusive_lock_ms": state.exclusive_lock_ms,
    }


PATHS: dict[str, Callable[..., dict[str, Any]]] = {
    "downgrade": _downgrade,
    "backfill": _backfill,
    "verify": _verify,
    "export": _export,
}


if __name__ == "__main__":
    outcome = PATHS[sys.argv[1]](*sys.argv[2:])
    outcome["peak_rss_mib"] = peak_rss_mib()
    sys.stdout.write(json.dumps(outcome) + "\n")
