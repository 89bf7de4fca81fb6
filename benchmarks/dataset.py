"""A realistic legacy data set at scale, loaded with COPY: N sessions over P projects, prompt
texts of 200 B to 8 KiB drawn from a few thousand distinct texts per role (so deduplication
matters), some NULLs, some Jinja-looking texts. Cloned per measured path with
``CREATE DATABASE ... TEMPLATE`` so every path starts from the same bytes."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from prompt_tool.db import schema

ROLES = ("system_prompt", "planner_prompt", "synthesis_prompt")
WORDS = (
    "plan", "answer", "customer", "invoice", "summarise", "careful", "policy", "refund",
    "context", "step", "verify", "tone", "brief", "research", "sources", "cite", "the", "and",
)
JINJA_LOOKING = ("{{ user }}", "{% if x %}", "{# note #}", "{% raw %}", "{ lone", "}} end")


def _text(rng: random.Random, role: str, number: int) -> str:
    # Mostly a few hundred bytes, a long tail up to 8 KiB.
    size = rng.randint(200, 800) if rng.random() < 0.8 else rng.randint(800, 8192)
    words = [f"{role.split('_')[0]} text {number}."]
    length = len(words[0])
    while length < size:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    if rng.random() < 0.05:
        words.insert(rng.randint(0, len(words)), rng.choice(JINJA_LOOKING))
    return " ".join(words)[:size]


def _admin(url: str) -> str:
    return make_url(url).set(database="postgres", drivername="postgresql").render_as_string(
        hide_password=False
    )


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def generate(url: str, *, sessions: int, projects: int, distinct: int = 3000, seed: int = 42) -> None:
    """Load the legacy data set into the empty database at ``url`` and upgrade it to head."""
    rng = random.Random(seed)  # noqa: S311 - reproducible benchmark data
    schema.upgrade(url, "0001")
    pools = {role: [_text(rng, role, i) for i in range(distinct)] for role in ROLES}
    with psycopg.connect(_libpq(url)) as connection:
        with connection.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO projects (slug, name) VALUES (%s, %s)",
                [(f"project-{i}", f"Project {i}") for i in range(1, projects + 1)],
            )
            cursor.execute("SELECT id FROM projects ORDER BY id")
            project_ids = [row[0] for row in cursor.fetchall()]
            columns = "project_id, name, status, system_prompt, planner_prompt, synthesis_prompt, variables"
            with cursor.copy(f"COPY orchestration_sessions ({columns}) FROM STDIN") as copy:
                for number in range(sessions):
                    copy.write_row(
                        (
                            rng.choice(project_ids),
                            f"session-{number}",
                            "completed",
                            *(
                                None if rng.random() < 0.03 else rng.choice(pools[role])
                                for role in ROLES
                            ),
                            json.dumps({"user": f"user-{number % 97}"}),
                        )
                    )
        connection.commit()
        connection.execute("ANALYZE orchestration_sessions")
        connection.commit()
    schema.upgrade(url)


@contextmanager
def clone(template_url: str, label: str) -> Iterator[str]:
    """A byte-identical copy of the data set database, dropped afterwards."""
    name = f"pt_bench_{label}_{uuid.uuid4().hex[:8]}"
    source = make_url(template_url).database
    with psycopg.connect(_admin(template_url), autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(str(source))
            )
        )
    try:
        yield make_url(template_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_admin(template_url), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
