"""Backfill and verify at scale against their baselines, measured on clones of one data set."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from benchmarks.dataset import clone
from benchmarks.harness import Measurement
from prompt_tool.db.engine import make_engine


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def run_path(name: str, url: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.paths", name, url],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


CEILING_TEXTS = """
WITH b AS (
    SELECT id, project_id, system_prompt, planner_prompt, synthesis_prompt
    FROM orchestration_sessions WHERE id > %(lo)s AND id <= %(hi)s
), t AS (
    SELECT id, project_id, 'system' AS role, system_prompt AS txt FROM b
        WHERE system_prompt IS NOT NULL
    UNION ALL SELECT id, project_id, 'planner', planner_prompt FROM b
        WHERE planner_prompt IS NOT NULL
    UNION ALL SELECT id, project_id, 'synthesis', synthesis_prompt FROM b
        WHERE synthesis_prompt IS NOT NULL
)
SELECT id, project_id, role, txt, encode(sha256(convert_to(txt, 'UTF8')), 'hex') AS hx FROM t
"""
CEILING_TEMPLATES = f"""
WITH h AS ({CEILING_TEXTS}), new_prompts AS (
    INSERT INTO prompts (project_id, name, content, prompt_type, scope, is_template)
    SELECT DISTINCT ON (project_id, role, hx) project_id, 'imported/' || role || '/' || hx, txt,
           'orchestration_template', 'project', true
    FROM h
    ON CONFLICT (project_id, name) WHERE scope = 'project' DO NOTHING
    RETURNING id, content
)
INSERT INTO prompt_versions (prompt_id, version, content) SELECT id, 1, content FROM new_prompts
"""
CEILING_REFERENCES = f"""
WITH h AS ({CEILING_TEXTS})
INSERT INTO session_prompt_refs (session_id, role, prompt_version_id, legacy_hash, source)
SELECT h.id, h.role, v.id, h.hx, 'backfill'
FROM h
JOIN prompts p ON p.project_id = h.project_id AND p.scope = 'project'
    AND p.name = 'imported/' || h.role || '/' || h.hx
JOIN prompt_versions v ON v.prompt_id = p.id AND v.version = 1
"""


def sql_ceiling(url: str) -> float:
    """Hand-written SQL, no Python per row: keyset batches of 5,000. Returns seconds."""
    start = time.perf_counter()
    with psycopg.connect(_libpq(url), autocommit=True) as connection:
        (upper,) = connection.execute("SELECT max(id) FROM orchestration_sessions").fetchone() or (0,)
        lo = 0
        while lo < upper:
            (hi,) = connection.execute(
                "SELECT max(id) FROM (SELECT id FROM orchestration_sessions WHERE id > %s "
                "ORDER BY id LIMIT 5000) b",
                (lo,),
            ).fetchone() or (upper,)
            with connection.transaction():
                connection.execute(CEILING_TEMPLATES, {"lo": lo, "hi": hi})
                connection.execute(CEILING_REFERENCES, {"lo": lo, "hi": hi})
            lo = hi
    return time.perf_counter() - start


def orm_loop(url: str, sample: int) -> float:
    """What a user would write: per session, per role, look up or create, insert, commit."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from prompt_tool.core import content_hash
    from prompt_tool.db.models import (
        OrchestrationSession,
        Prompt,
        PromptRole,
        PromptVersion,
        SessionPromptRef,
    )

    engine = make_engine(url)
    start = time.perf_counter()
    with Session(engine) as session:
        ids = session.scalars(
            select(OrchestrationSession.id).order_by(OrchestrationSession.id).limit(sample)
        ).all()
        for session_id in ids:
            row = session.get_one(OrchestrationSession, session_id)
            for role in PromptRole:
                legacy = getattr(row, role.legacy_column)
                if legacy is None:
                    continue
                name = f"imported/{role.value}/{content_hash(legacy)}"
                prompt = session.scalars(
                    select(Prompt).where(Prompt.project_id == row.project_id, Prompt.name == name)
                ).first()
                if prompt is None:
                    prompt = Prompt(project_id=row.project_id, name=name, content=legacy,
                                    prompt_type="orchestration_template", scope="project",
                                    is_template=True)
                    session.add(prompt)
                    session.flush()
                    session.add(PromptVersion(prompt_id=prompt.id, version=1, content=legacy))
                    session.flush()
                version = session.scalars(
                    select(PromptVersion).where(PromptVersion.prompt_id == prompt.id)
                ).first()
                assert version is not None
                session.add(SessionPromptRef(session_id=session_id, role=role.value,
                                             prompt_version_id=version.id,
                                             legacy_hash=content_hash(legacy), source="orm"))
            session.commit()
    engine.dispose()
    return time.perf_counter() - start


def lock_holds(url: str, run_id: int) -> dict[str, float]:
    """How long each batch held its locks, from the database's own clock (ms)."""
    engine = make_engine(url)
    with engine.connect() as connection:
        holds = [
            float(ms)
            for (ms,) in connection.execute(
                text(
                    "SELECT EXTRACT(EPOCH FROM (finished_at - started_at)) * 1000 "
                    "FROM migration_batches WHERE run_id = :run"
                ),
                {"run": run_id},
            )
        ]
    engine.dispose()
    holds.sort()
    if not holds:
        return {}
    return {
        "p50_ms": statistics.median(holds),
        "p99_ms": holds[min(len(holds) - 1, int(len(holds) * 0.99))],
        "max_ms": holds[-1],
        "batches": len(holds),
    }


def backfill_section(dataset_url: str, sessions: int) -> Measurement:
    with clone(dataset_url, "ours") as url:
        ours = run_path("backfill", url)
        holds = lock_holds(url, ours["run_id"])
        verified = run_path("verify", url)
    with clone(dataset_url, "ceiling") as url:
        ceiling_s = sql_ceiling(url)
    sample = min(2_000, sessions)
    with clone(dataset_url, "orm") as url:
        orm_s = orm_loop(url, sample)
    ours_rate = sessions / ours["elapsed_s"]
    ceiling_rate = sessions / ceiling_s
    orm_rate = sample / orm_s
    return Measurement(
        section="backfill",
        what=f"orch-migrate backfill, {sessions:,} sessions (default settings)",
        ours_per_s=ours_rate,
        baselines={"SQL ceiling (INSERT ... SELECT, batches of 5,000)": ceiling_rate,
                   "per-row ORM loop": orm_rate},
        targets={"SQL ceiling (INSERT ... SELECT, batches of 5,000)": ">= 0.70",
                 "per-row ORM loop": ">= 50x"},
        verdicts={
            "SQL ceiling (INSERT ... SELECT, batches of 5,000)": ours_rate / ceiling_rate >= 0.70,
            "per-row ORM loop": ours_rate / orm_rate >= 50,
        },
        peak_rss_mib=ours["peak_rss_mib"],
        extra={"lock_hold": holds, "verify_after": verified},
    )
