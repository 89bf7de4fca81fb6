"""`scripts/bench`: generate a legacy data set in a scratch PostgreSQL database, measure every
section against baselines measured in the same run, print a Markdown table, write JSON.

Exit status: 0 unless a section errors or a ratio falls below half its target (the smoke check
CI runs with --quick); absolute times never fail a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import backfill_control, dataset, isolation, migration_paths, template_loading
from benchmarks.harness import Measurement, admin_url, libpq, log, scratch_database, server_url
from prompt_tool.db.url import redact

MEMORY_BASE = 100_000  # the size the flat-memory check compares against
MEMORY_LIMIT_MIB = 200.0
MEMORY_GROWTH = 1.2


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _server_version(url: str) -> str:
    with psycopg.connect(libpq(url)) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


def _yes(value: bool | None) -> str:
    return {True: "yes", False: "**NO**", None: ""}[value]


def markdown(report: dict[str, Any], measurements: Sequence[Measurement]) -> str:
    lines = [
        f"Data set: {report['dataset']['sessions']:,} sessions over "
        f"{report['dataset']['projects']} projects; machine: {report['machine']['cpus']} cores, "
        f"{report['machine']['cpu']}, PostgreSQL {report['machine']['postgresql']}.",
        "",
        "| section | what | ours (/s) | baseline | baseline (/s) | ratio | target | met |",
        "|---|---|---:|---|---:|---:|---|---|",
    ]
    for m in measurements:
        for baseline, rate in m.baselines.items():
            target = m.targets.get(baseline)
            lines.append(
                f"| {m.section} | {m.what} | {m.ours_per_s:,.0f} | {baseline} | {rate:,.0f} | "
                f"{m.ratio(baseline):.2f}x | {target.text if target else 'report'} | "
                f"{_yes(m.met(baseline)) if target else ''} |"
            )
        if m.absolute_target is not None:
            lines.append(
                f"| {m.section} | {m.what} | {m.ours_per_s:,.0f} | (absolute) | | | "
                f"{m.absolute_target[1]} | {_yes(m.ours_per_s >= m.absolute_target[0])} |"
            )
    lines += ["", "| section | peak RSS (MiB) |", "|---|---:|"]
    lines += [
        f"| {m.section}: {m.what} | {m.peak_rss_mib:,.0f} |"
        for m in measurements
        if m.peak_rss_mib is not None
    ]
    backfill = next((m for m in measurements if m.section == "backfill"), None)
    if backfill is not None:
        holds = backfill.extra["lock_hold"]
        lines += [
            "",
            f"Backfill lock hold per batch (database clock, {holds.get('n', 0):,} batches): "
            f"p50 {holds.get('p50_ms', 0):.0f} ms, p99 {holds.get('p99_ms', 0):.0f} ms, "
            f"max {holds.get('max_ms', 0):.0f} ms; target p99 < 250 ms: "
            f"{_yes(backfill.extra['lock_hold_met'])}.",
        ]
        parallel = backfill.extra.get("workers_2")
        if parallel:
            lines.append(
                f"Backfill --workers 2: {parallel['elapsed_s']:.1f} s vs "
                f"{backfill.extra['backfill']['elapsed_s']:.1f} s with one worker: "
                f"{parallel['speed_up']:.2f}x speed-up; same templates and references: "
                f"{_yes(parallel['identical_to_single_worker'])}."
            )
    control = next((m for m in measurements if m.section == backfill_control.SECTION), None)
    if control is not None:
        lines += backfill_control.markdown(control.extra)
    downgrade = next((m for m in measurements if m.section == "downgrade"), None)
    if downgrade is not None:
        taken = downgrade.extra["downgrade"]
        lines.append(
            f"Downgrade: {taken['elapsed_s']:.1f} s ({downgrade.ratio('the backfill'):.2f}x the "
            f"backfill's speed); {taken['batches']:,} batches, the longest "
            f"{taken['longest_batch_ms']:.0f} ms; the last transaction (people's work, schema) "
            f"{taken['last_transaction_ms']:.0f} ms, of which its ACCESS EXCLUSIVE locks "
            f"{taken.get('exclusive_lock_ms', 0):.0f} ms."
        )
    memory = report.get("memory")
    if memory:
        lines += ["", "| path | " + " | ".join(f"{size} sessions (MiB)" for size in memory["sizes"])
                  + " | growth | target | met |", "|---|" + "---:|" * (len(memory["sizes"]) + 1)
                  + "---|---|"]  # fmt: skip
        for path, check in memory["paths"].items():
            values = " | ".join(f"{value:,.0f}" for value in check["rss_mib"])
            lines.append(
                f"| {path} | {values} | {check['growth']:.2f}x | "
                f"<= {MEMORY_GROWTH}x and < {MEMORY_LIMIT_MIB:.0f} MiB | {_yes(check['met'])} |"
            )
    return "\n".join(lines)


def _memory_report(sizes: list[int], per_size: list[dict[str, float]]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path in per_size[-1]:
        values = [rss[path] for rss in per_size]
        growth = values[-1] / values[0]
        paths[path] = {
            "rss_mib": values,
            "growth": growth,
            "met": growth <= MEMORY_GROWTH and max(values) < MEMORY_LIMIT_MIB,
            # The smoke check's "half the target": twice the limit.
            "failing": max(values) > 2 * MEMORY_LIMIT_MIB,
        }
    return {"sizes": [f"{size:,}" for size in sizes], "paths": paths}


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum of {minimum:,}")
        return value

    return parse


def _server_reachable() -> str | None:
    """None, or why the benchmark server cannot be used (one line)."""
    try:
        with psycopg.connect(admin_url(server_url()), connect_timeout=10):
            return None
    except psycopg.Error as error:
        reason = str(error).strip().splitlines()[0]
        return (
            f"cannot connect to PostgreSQL at {redact(server_url())} ({reason}); set "
            "PROMPT_TOOL_BENCH_DATABASE_URL to a server where this user may create databases"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    # The batch read reads 1,000 sessions: fewer would measure a smaller batch than it says.
    parser.add_argument(
        "--sessions", type=_at_least(1_000), help="sessions (default 1,000,000; quick 100,000)"
    )
    parser.add_argument("--projects", type=_at_least(1), default=50, help="projects (default 50)")
    parser.add_argument("--quick", action="store_true", help="the CI smoke check (~100,000)")
    parser.add_argument(
        "--templates", type=_at_least(10), help="templates to load (default 10,000; quick 2,000)"
    )
    parser.add_argument("--out", type=Path, help="write JSON here, and Markdown next to it (.md)")
    parser.add_argument(
        "--no-workers",
        action="store_true",
        help="skip the backfill --workers 2 measurement (always skipped with --quick)",
    )
    args = parser.parse_args(argv)
    sessions = args.sessions or (100_000 if args.quick else 1_000_000)
    templates = args.templates or (2_000 if args.quick else 10_000)
    unreachable = _server_reachable()
    if unreachable is not None:
        sys.stderr.write(f"scripts/bench: error: {unreachable}\n")
        return 2
    started = time.perf_counter()

    measurements: list[Measurement] = []
    memory_sizes: list[int] = []
    memory_rss: list[dict[str, float]] = []
    with scratch_database("data") as data_url:
        if sessions > MEMORY_BASE and not args.quick:
            log(f"memory baseline: {MEMORY_BASE:,} sessions")
            with scratch_database("data_small") as small_url:
                dataset.generate(small_url, sessions=MEMORY_BASE, projects=args.projects)
                memory_rss.append(migration_paths.memory_only(small_url))
                memory_sizes.append(MEMORY_BASE)
        log(f"generating {sessions:,} sessions over {args.projects} projects")
        generated = dataset.generate(data_url, sessions=sessions, projects=args.projects)
        log(f"data set ready: {generated['database_bytes'] / 2**30:.2f} GiB")
        figures = migration_paths.run(
            data_url,
            sessions,
            orm_sample=250 if args.quick else 2_000,
            naive_sample=250 if args.quick else 2_000,
            dual_writes=100 if args.quick else 300,
            # The speed-up is a figure for PERFORMANCE.md, not a target: not in the smoke check.
            workers=not (args.no_workers or args.quick),
        )
        measurements.extend(figures.measurements)
        measurements.extend(backfill_control.run(data_url, sessions).measurements)
        memory_sizes.append(sessions)
        memory_rss.append(figures.rss)
        version = _server_version(data_url)
    log(f"template loading: {templates:,} templates")
    with scratch_database("templates") as url:
        measurements.extend(template_loading.run(url, templates))
    log("isolated rendering: worker pool vs in process")
    measurements.extend(isolation.run())

    report: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(),
        "quick": args.quick,
        "elapsed_s": time.perf_counter() - started,
        "dataset": generated,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "postgresql": version,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "memory": _memory_report(memory_sizes, memory_rss),
        "measurements": [m.as_json() for m in measurements],
    }
    table = markdown(report, measurements)
    sys.stdout.write(table + "\n")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")
    # The smoke check: fail only when a ratio falls below half its target.
    failing = [
        f"{m.section}: {m.what} vs {baseline} ({m.ratio(baseline):.2f}x, target "
        f"{m.targets[baseline].text})"
        for m in measurements
        for baseline in m.targets
        if m.below_half(baseline)
        # Either-or targets (verify): only when every one of them is below half.
        and not (m.either and not all(m.below_half(other) for other in m.targets))
    ]
    failing += [
        line
        for m in measurements
        if m.section == backfill_control.SECTION
        for line in backfill_control.failing(m.extra)
    ]
    failing += [
        f"memory: {path} peaked at {max(check['rss_mib']):.0f} MiB"
        for path, check in report["memory"]["paths"].items()
        if check["failing"]
    ]
    log(f"done in {report['elapsed_s']:.0f} s")
    if failing:
        sys.stderr.write("below half the target:\n  " + "\n  ".join(failing) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
