"""The application's hot paths on a backfilled data set: batch reads through the compat shim
with flag ``templates``, dual-written session creation, and one flag evaluation."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, select, text

from benchmarks.harness import Measurement, Target, peak_rss_mib, timed
from prompt_tool import flags
from prompt_tool.compat import SessionReader, create_session
from prompt_tool.db.dialect import one_of
from prompt_tool.db.engine import make_engine, make_session_factory, session_scope
from prompt_tool.db.models import OrchestrationSession, Project, Scope
from prompt_tool.settings import Settings
from prompt_tool.templates import TemplateAddress, TemplateManager

LEGACY_COLUMNS = "reading the legacy columns of the same sessions"
PLAIN_INSERT = "plain legacy insert of a session"
DICT_LOOKUP = "a dict lookup"
BATCH = 1_000
BATCH_ROUNDS = 10  # best of 10 of each, warm


def _legacy_read(engine: Engine, ids: list[int]) -> Sequence[Any]:
    """What a legacy reader does: the TEXT columns of the sessions, with their project, the
    keys bound the fastest way this dialect allows (the same lookup the shim uses, so the ratio
    measures the templates path, not how the keys are passed)."""
    with engine.connect() as connection:
        query = (
            select(
                OrchestrationSession.id,
                OrchestrationSession.project_id,
                Project.slug,
                OrchestrationSession.system_prompt,
                OrchestrationSession.planner_prompt,
                OrchestrationSession.synthesis_prompt,
            )
            .join(Project, Project.id == OrchestrationSession.project_id)
            .where(one_of(connection, OrchestrationSession.id, ids))
        )
        return connection.execute(query).all()


def batch_read(engine: Engine, settings: Settings, sessions: int) -> Measurement:
    flags.set_default(engine, "templates", actor="bench")
    with engine.connect() as connection:
        ids = list(
            connection.execute(
                text("SELECT id FROM orchestration_sessions ORDER BY id OFFSET :o LIMIT :n"),
                {"o": max(0, sessions // 2 - BATCH // 2), "n": BATCH},
            ).scalars()
        )
    service = flags.FlagService(engine, settings)
    manager = TemplateManager(engine, settings=settings)
    reader = SessionReader(engine, flags=service, manager=manager)
    try:
        first = reader.read_many(ids)  # cold: compiles what it renders
        legacy = {row.id: (row.system_prompt, row.planner_prompt, row.synthesis_prompt)
                  for row in _legacy_read(engine, ids)}  # fmt: skip
        read = {i: (p.system.text, p.planner.text, p.synthesis.text) for i, p in first.items()}
        if read != legacy:
            raise AssertionError("templates read differs from the legacy columns")
        sources = {role.source.value for p in first.values() for role in (p.system, p.planner)}
        # Alternated, as for the dual write: a drift of the shared machine's speed during the
        # measurement then weighs on both sides alike instead of on whichever ran second.
        ours_s = legacy_s = float("inf")
        for _ in range(BATCH_ROUNDS):
            ours_s = min(ours_s, timed(lambda: reader.read_many(ids)))
            legacy_s = min(legacy_s, timed(lambda: _legacy_read(engine, ids)))
    finally:
        service.close()
    return Measurement(
        section="batch read",
        what=f"compat read_many of {BATCH:,} sessions, flag templates (warm)",
        ours_per_s=len(ids) / ours_s,
        baselines={LEGACY_COLUMNS: len(ids) / legacy_s},
        targets={LEGACY_COLUMNS: Target(0.5, "time within 2x (>= 0.50x)")},
        peak_rss_mib=peak_rss_mib(),
        extra={"sources": sorted(sources)},
    )


def dual_write(engine: Engine, settings: Settings, count: int) -> Measurement:
    manager = TemplateManager(engine, settings=settings)
    with engine.begin() as connection:  # a global admin to own the templates
        connection.execute(
            text(
                "INSERT INTO template_permissions (user_name, role, project_id, granted_by) "
                "SELECT 'bench', 'admin', NULL, 'bench' WHERE NOT EXISTS "
                "(SELECT 1 FROM template_permissions WHERE user_name = 'bench')"
            )
        )
    suffix = uuid.uuid4().hex[:8]  # a database may be measured twice
    templates = {role: f"bench-{role}-{suffix}" for role in ("system", "planner", "synthesis")}
    for role, template in templates.items():
        manager.create(
            TemplateAddress(template, Scope.GLOBAL),
            f"You are the {role} for {{{{ topic }}}}. Be brief, cite sources, check the invoice.",
            actor="bench",
        )
    variables = {"topic": "billing"}
    texts = {
        f"{role}_prompt": manager.render(name, variables, project="project-1").text
        for role, name in templates.items()
    }
    with engine.connect() as connection:
        project_id = connection.execute(
            text("SELECT id FROM projects WHERE slug = 'project-1'")
        ).scalar_one()
    factory = make_session_factory(engine)
    create_session(manager, "project-1", templates, variables, name="warm-up")

    def ours() -> None:
        for number in range(count):
            create_session(manager, "project-1", templates, variables, name=f"dual-{number}")

    def plain() -> None:
        for number in range(count):
            with session_scope(factory) as session:
                session.add(
                    OrchestrationSession(
                        project_id=project_id, name=f"plain-{number}", variables=variables, **texts
                    )
                )

    # Interleaved, best of three each: the machine is shared.
    ours_s, plain_s = float("inf"), float("inf")
    for _ in range(3):
        ours_s = min(ours_s, timed(ours))
        plain_s = min(plain_s, timed(plain))
    return Measurement(
        section="dual write",
        what="compat create_session (3 templates: references + rendered legacy text)",
        ours_per_s=count / ours_s,
        baselines={PLAIN_INSERT: count / plain_s},
        targets={PLAIN_INSERT: Target(1 / 1.5, "time under 1.5x (>= 0.67x)")},
        peak_rss_mib=peak_rss_mib(),
        extra={"sessions_per_repeat": count},
    )


def flag_evaluation(engine: Engine, settings: Settings, count: int) -> Measurement:
    with flags.FlagService(engine, settings) as service:
        service.variant_for("project-1")  # warm
        table = {"project-1": service.variant_for("project-1")}

        def ours() -> None:
            for _ in range(count):
                service.variant_for("project-1")

        def lookup() -> None:
            for _ in range(count):
                _ = table["project-1"]

        ours_s = timed(ours, repeat=3)
        lookup_s = timed(lookup, repeat=3)
    return Measurement(
        section="flag evaluation",
        what="one orchestration-templates evaluation (warm)",
        ours_per_s=count / ours_s,
        baselines={DICT_LOOKUP: count / lookup_s},
        peak_rss_mib=peak_rss_mib(),
        extra={"evaluations": count, "us_per_evaluation": ours_s / count * 1e6},
    )


def run(url: str, sessions: int, *, dual_writes: int) -> list[Measurement]:
    settings = Settings(database_url=url, redis_url=None)
    engine = make_engine(url)
    started = time.perf_counter()
    try:
        measurements = [
            batch_read(engine, settings, sessions),
            dual_write(engine, settings, dual_writes),
            flag_evaluation(engine, settings, 10_000),
        ]
    finally:
        engine.dispose()
    measurements[0].extra["section_s"] = time.perf_counter() - started
    return measurements
