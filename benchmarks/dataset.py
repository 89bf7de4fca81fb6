"""A realistic legacy data set at scale, loaded with COPY: N sessions over P projects, prompt
texts of 200 B to 8 KiB drawn from a few thousand distinct texts per role (so deduplication
matters), some NULLs, some Jinja-looking texts. Each measured path runs on a copy made with
``CREATE DATABASE ... TEMPLATE`` (see harness.scratch_database), so every path starts from the
same bytes."""

from __future__ import annotations

import json
import random

import psycopg

from benchmarks.harness import libpq
from prompt_tool.db import schema

ROLES = ("system_prompt", "planner_prompt", "synthesis_prompt")
WORDS = (
    "plan", "answer", "customer", "invoice", "summarise", "careful", "policy", "refund",
    "context", "step", "verify", "tone", "brief", "research", "sources", "cite", "the", "and",
)  # fmt: skip
JINJA_LOOKING = ("{{ user }}", "{% if x %}", "{# note #}", "{% raw %}", "{ lone", "}} end")
NULL_SHARE = 0.03
WINDOW_STEPS = 4  # a project's texts span this many projects' shares of the pool


def _text(rng: random.Random, role: str, number: int) -> str:
    # Mostly a few hundred bytes, a long tail up to 8 KiB.
    size = rng.randint(200, 800) if rng.random() < 0.85 else rng.randint(800, 8192)
    words = [f"{role.split('_', maxsplit=1)[0]} text {number}."]
    length = len(words[0])
    while length < size:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    if rng.random() < 0.05:
        words.insert(rng.randint(0, len(words)), rng.choice(JINJA_LOOKING))
    return " ".join(words)[:size]


def generate(
    url: str, *, sessions: int, projects: int, distinct: int = 3000, seed: int = 42
) -> dict[str, int]:
    """Load the legacy data set into the empty database at ``url`` and upgrade it to head."""
    rng = random.Random(seed)  # noqa: S311 - reproducible benchmark data, not a secret
    schema.upgrade(url, "0001")
    pools = {role: [_text(rng, role, i) for i in range(distinct)] for role in ROLES}
    columns = "project_id, name, status, system_prompt, planner_prompt, synthesis_prompt, variables"
    with psycopg.connect(libpq(url)) as connection:
        with connection.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO projects (slug, name) VALUES (%s, %s)",
                [(f"project-{i}", f"Project {i}") for i in range(1, projects + 1)],
            )
            cursor.execute("SELECT id FROM projects ORDER BY id")
            project_ids = [row[0] for row in cursor.fetchall()]
            # Each project uses its own window of each role's pool, overlapping its
            # neighbours' (a few texts are shared, as boilerplate is): deduplication per
            # project matters, and the pool is a few thousand distinct texts per role.
            step = max(1, distinct // len(project_ids))
            window = min(distinct, step * WINDOW_STEPS)
            windows = {
                project_id: [(index * step + k) % distinct for k in range(window)]
                for index, project_id in enumerate(project_ids)
            }
            with cursor.copy(f"COPY orchestration_sessions ({columns}) FROM STDIN") as copy:
                for number in range(sessions):
                    project_id = rng.choice(project_ids)
                    mine = windows[project_id]
                    copy.write_row(
                        (
                            project_id,
                            f"session-{number}",
                            "completed",
                            *(
                                None if rng.random() < NULL_SHARE else pools[role][rng.choice(mine)]
                                for role in ROLES
                            ),
                            json.dumps({"user": f"user-{number % 97}"}),
                        )
                    )
        connection.commit()
    schema.upgrade(url)
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")
        (size,) = connection.execute("SELECT pg_database_size(current_database())").fetchone() or (
            0,
        )
    return {"sessions": sessions, "projects": projects, "distinct_per_role": distinct,
            "database_bytes": int(size)}  # fmt: skip
