"""Template loading: resolve + render N stored templates through the manager, cold and warm,
against plain precompiled ``jinja2.Template.render`` (the ceiling) and compiling on every call
(what a naive loader does)."""

from __future__ import annotations

from typing import Any

import jinja2
from sqlalchemy import text

from benchmarks.harness import Measurement, Target, peak_rss_mib, timed
from prompt_tool.core import TemplateEngine
from prompt_tool.db import schema
from prompt_tool.db.engine import make_engine
from prompt_tool.settings import Settings
from prompt_tool.templates import TemplateManager

CEILING = "precompiled jinja2.Template.render (ceiling)"
NAIVE = "compile per call"
WARM_ROUNDS = 5
VARIABLES: dict[str, Any] = {
    "project": "acme",
    "goal": "answer the customer's billing question",
    "steps": ["read the ticket", "look up the invoice", "draft a reply"],
}
SOURCE_SQL = (
    "'You are planner ' || i || ' for {{ project }}. Goal: {{ goal }}.' || chr(10) || "
    "'{% for step in steps %}{{ loop.index }}. {{ step }}' || chr(10) || '{% endfor %}' || "
    "'{% if steps|length > 2 %}Be thorough.{% else %}Be brief.{% endif %} Ref ' || i"
)


def _load_templates(url: str, count: int) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO prompts (name, content, prompt_type, scope, is_template) "
                    f"SELECT 'bench-' || i, {SOURCE_SQL}, 'orchestration_template', 'global', true "
                    "FROM generate_series(1, :count) AS i"
                ),
                {"count": count},
            )
            connection.execute(
                text(
                    "INSERT INTO prompt_versions (prompt_id, version, content, content_hash) "
                    "SELECT id, 1, content, encode(sha256(convert_to(content, 'UTF8')), 'hex') "
                    "FROM prompts"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO template_labels (prompt_id, label, prompt_version_id) "
                    "SELECT v.prompt_id, l.label, v.id FROM prompt_versions v "
                    "CROSS JOIN (VALUES ('production'), ('latest')) AS l(label)"
                )
            )
            connection.execute(text("ANALYZE"))
    finally:
        engine.dispose()


def run(url: str, count: int) -> list[Measurement]:
    schema.upgrade(url)
    _load_templates(url, count)
    names = [f"bench-{i}" for i in range(1, count + 1)]
    settings = Settings(database_url=url, redis_url=None)
    # The compiled cache is sized to the working set, as an operator would size it.
    engine = make_engine(url)
    manager = TemplateManager(
        engine,
        settings=settings,
        template_engine=TemplateEngine(settings=settings, cache_size=count),
    )

    def ours() -> None:
        for name in names:
            manager.render(name, VARIABLES, project=None)

    cold = timed(ours)
    outputs = [manager.render(name, VARIABLES, project=None).text for name in names]
    sources = [manager.resolve(name, project=None).source for name in names]

    # Plain text prompts, never HTML: autoescape off, as the product's engine has it.
    environment = jinja2.Environment(keep_trailing_newline=True)  # noqa: S701
    precompiled = [environment.from_string(source) for source in sources]

    def ceiling() -> None:
        for template in precompiled:
            template.render(VARIABLES)

    naive_sample = sources[: max(1, count // 10)]

    def naive() -> None:
        for source in naive_sample:
            environment.from_string(source).render(VARIABLES)

    assert [t.render(VARIABLES) for t in precompiled] == outputs, "paths must agree byte for byte"
    # Alternated, best of WARM_ROUNDS each, as the batch read is: a drift of the shared
    # machine's speed then weighs on both sides alike instead of on whichever ran second.
    warm = ceiling_time = float("inf")
    for _ in range(WARM_ROUNDS):
        warm = min(warm, timed(ours))
        ceiling_time = min(ceiling_time, timed(ceiling))
    naive_time = timed(naive) * (count / len(naive_sample))
    engine.dispose()

    warm_rate, cold_rate = count / warm, count / cold
    ceiling_rate, naive_rate = count / ceiling_time, count / naive_time
    return [
        Measurement(
            section="template loading",
            what=f"resolve + render {count:,} templates, warm",
            ours_per_s=warm_rate,
            baselines={CEILING: ceiling_rate, NAIVE: naive_rate},
            targets={
                CEILING: Target(1 / 1.5, "time within 1.5x (>= 0.67x)"),
                NAIVE: Target(20, ">= 20x"),
            },
            peak_rss_mib=peak_rss_mib(),
        ),
        Measurement(
            section="template loading",
            what=f"resolve + render {count:,} templates, cold (database + compile)",
            ours_per_s=cold_rate,
            baselines={CEILING: ceiling_rate, NAIVE: naive_rate},
            peak_rss_mib=peak_rss_mib(),
        ),
    ]
