"""The isolated renderer's cost (PROMPT_TOOL_RENDER_ISOLATION=process): one warm render and a
batch of 1,000 renders through the worker pool, against the same renders in process. No
database: the cost measured is the process boundary (pipe round trip, JSON both ways)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.harness import Measurement, timed
from benchmarks.template_loading import VARIABLES
from prompt_tool.core import TemplateEngine
from prompt_tool.settings import Settings

IN_PROCESS = "in-process render"
BATCH = 1_000
ROUNDS = 3
SOURCE = (
    "You are the planner for {{ project }}. Goal: {{ goal }}.\n"
    "{% for step in steps %}{{ loop.index }}. {{ step }}\n{% endfor %}"
    "{% if steps|length > 2 %}Be thorough.{% else %}Be brief.{% endif %}"
)


def run(*, workers: int = 2) -> list[Measurement]:
    local = TemplateEngine(settings=Settings())
    started = time.perf_counter()
    isolated = TemplateEngine(
        settings=Settings(render_isolation="process", render_isolation_workers=workers)
    )
    expected = local.render(SOURCE, VARIABLES, name="bench")
    assert isolated.render(SOURCE, VARIABLES, name="bench") == expected, "paths must agree"
    startup_s = time.perf_counter() - started

    def batch(engine: TemplateEngine) -> None:
        for _ in range(BATCH):
            engine.render(SOURCE, VARIABLES, name="bench")

    def parallel_batch(engine: TemplateEngine) -> None:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda _: engine.render(SOURCE, VARIABLES, name="bench"), range(BATCH)))

    try:
        parallel_batch(isolated)  # start every worker and warm its compiled cache
        ours = timed(lambda: batch(isolated), repeat=ROUNDS)
        theirs = timed(lambda: batch(local), repeat=ROUNDS)
        ours_parallel = timed(lambda: parallel_batch(isolated), repeat=ROUNDS)
    finally:
        assert isolated.isolation is not None
        isolated.isolation.close()
    return [
        Measurement(
            section="isolated rendering",
            what="one warm render in a worker process (per render)",
            ours_per_s=BATCH / ours,
            baselines={IN_PROCESS: BATCH / theirs},
            extra={
                "isolated_us_per_render": ours / BATCH * 1e6,
                "in_process_us_per_render": theirs / BATCH * 1e6,
                "first_render_with_startup_s": startup_s,
            },
        ),
        Measurement(
            section="isolated rendering",
            what=f"batch of {BATCH:,} renders over {workers} workers",
            ours_per_s=BATCH / ours_parallel,
            baselines={IN_PROCESS: BATCH / theirs},
            extra={"isolated_batch_s": ours_parallel, "in_process_batch_s": theirs},
        ),
    ]
