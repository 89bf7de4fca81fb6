"""`scripts/bench`: run the benchmark sections, print a Markdown table, write JSON.

Exit status: 0 when every ratio meets at least half its target (the smoke check CI runs with
--quick), 1 otherwise or on any error. Absolute times never fail a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import template_loading
from benchmarks.harness import Measurement, scratch_database


def _markdown(measurements: Sequence[Measurement]) -> str:
    lines = [
        "| section | what | ours (/s) | baseline | baseline (/s) | ratio | target | met |",
        "|---|---|---:|---|---:|---:|---|---|",
    ]
    for m in measurements:
        for baseline, rate in m.baselines.items():
            target = m.targets.get(baseline, "")
            met = {True: "yes", False: "NO"}.get(m.verdicts.get(baseline), "") if target else ""
            lines.append(
                f"| {m.section} | {m.what} | {m.ours_per_s:,.0f} | {baseline} | {rate:,.0f} | "
                f"{m.ours_per_s / rate:.2f} | {target} | {met} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: the CI smoke check")
    parser.add_argument("--templates", type=int, help="templates to load (default 10,000)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    templates = args.templates or (2_000 if args.quick else 10_000)

    measurements: list[Measurement] = []
    with scratch_database("templates") as url:
        measurements.extend(template_loading.run(url, templates))

    print(_markdown(measurements))
    report = {
        "when": datetime.now(UTC).isoformat(),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "quick": args.quick,
        "measurements": [dataclasses.asdict(m) for m in measurements],
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    # The smoke check: fail only when a ratio falls below half its target.
    failing = [
        f"{m.what} vs {baseline}"
        for m in measurements
        for baseline, met in m.verdicts.items()
        if not met and _below_half(m, baseline)
    ]
    if failing:
        print("below half the target: " + "; ".join(failing), file=sys.stderr)
        return 1
    return 0


def _below_half(measurement: Measurement, baseline: str) -> bool:
    ratio = measurement.ratio(baseline)
    target = measurement.targets[baseline]
    if "within 1.5x" in target:
        return ratio < (1 / 1.5) / 2
    if ">= 20x" in target:
        return ratio < 10
    return False


if __name__ == "__main__":
    sys.exit(main())
