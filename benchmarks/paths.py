"""Our heavy paths, each run in a fresh process so its peak RSS is its own:
``python -m benchmarks.paths backfill|verify|export URL [ARG]`` prints one JSON line."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import peak_rss_mib
from prompt_tool.db.engine import make_engine


def _backfill(url: str) -> dict[str, Any]:
    from prompt_tool.migrate.backfill import backfill

    engine = make_engine(url)
    start = time.perf_counter()
    summary = backfill(engine)
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "rows": summary.sessions_scanned, "run_id": summary.run_id}


def _verify(url: str) -> dict[str, Any]:
    from prompt_tool.migrate.verify import verify

    engine = make_engine(url)
    start = time.perf_counter()
    report = verify(engine)
    elapsed = time.perf_counter() - start
    return {
        "elapsed_s": elapsed,
        "rows": sum(1 for _ in ()) or report.totals().checked // 3,
        "passed": report.passed,
        "checked": report.totals().checked,
    }


def _export(url: str) -> dict[str, Any]:
    from prompt_tool.migrate import export as export_module

    engine = make_engine(url)
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "export"
        start = time.perf_counter()
        result = export_module.export(engine, target)  # type: ignore[attr-defined]
        elapsed = time.perf_counter() - start
    rows = getattr(result, "row_counts", {}) or {}
    return {"elapsed_s": elapsed, "rows": rows.get("orchestration_sessions", 0)}


PATHS = {"backfill": _backfill, "verify": _verify, "export": _export}


if __name__ == "__main__":
    outcome = PATHS[sys.argv[1]](sys.argv[2])
    outcome["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(outcome))
