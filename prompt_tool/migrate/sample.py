"""A realistic legacy data set, as deployments have it before templates: for the demo, the tests,
rehearsals on a scratch database, and the benchmark.

The texts are what makes a migration hard: NULL and empty prompts, texts that look like Jinja
(``{{ }}``, ``{% %}``, ``{# #}``, ``{% raw %}``, lone braces), unicode, CRLF line ends and very
long texts, drawn from a pool so that many sessions share a text (as real ones do).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from sqlalchemy import Connection, func, insert, inspect, select

from prompt_tool.db.engine import make_engine
from prompt_tool.db.models import (
    ABTest,
    ABTestVariant,
    Base,
    OrchestrationSession,
    Project,
    Prompt,
    PromptVersion,
)
from prompt_tool.db.url import redact
from prompt_tool.errors import InvalidInputError

__all__ = [
    "TRICKY_TEXTS",
    "LoadedSample",
    "legacy_text_pool",
    "load_legacy_sample",
    "tables_with_rows",
]

TRICKY_TEXTS: tuple[str, ...] = (
    "",
    "{{ not_a_variable }}",
    'Answer with {{ "json" }} only.',
    "{% if x %}literal block{% endif %}",
    "{# this was never a comment #} keep me",
    "{% raw %}{{ raw }}{% endraw %} and {% endraw %} alone",
    "{{",
    "}}",
    "a lone { brace and a lone } brace",
    "{%- trim -%} {{- x -}}",
    "line one\r\nline two\r\n",
    "trailing newline\n",
    "\n\nleading blank lines",
    "ünïcödé — 日本語 — emoji 🚀 — עברית — combining e\u0301",
    "tab\tseparated\tvalues",
    "percent % and hash # and dash -",
)

_ROLES_OPENERS = {
    "system_prompt": "You are a careful assistant for {}.",
    "planner_prompt": "Plan the steps to handle {} before acting.",
    "synthesis_prompt": "Combine the findings about {} into one answer.",
}
_TOPICS = ("billing", "support", "research", "triage", "search", "summaries", "onboarding")
_STATUSES = ("pending", "running", "completed", "failed")


@dataclass(frozen=True, slots=True)
class LoadedSample:
    database: str
    projects: int
    prompts: int
    prompt_versions: int
    sessions: int
    ab_tests: int


def legacy_text_pool(rng: random.Random, column: str, size: int) -> list[str]:
    """``size`` distinct texts for one prompt column, with the tricky ones mixed in."""
    opener = _ROLES_OPENERS[column]
    pool = [
        f"{opener.format(rng.choice(_TOPICS))} Variant {i}. "
        + " ".join(rng.choice(_TOPICS) for _ in range(rng.randint(10, 120)))
        for i in range(size)
    ]
    pool.extend(TRICKY_TEXTS)
    pool.append("long text " + "x" * 100_000)
    return pool


def _session_rows(
    rng: random.Random, project_ids: Sequence[int], count: int, pools: dict[str, list[str]]
) -> Iterator[dict[str, Any]]:
    for number in range(count):
        row: dict[str, Any] = {
            "project_id": rng.choice(project_ids),
            "name": f"session-{number}",
            "status": rng.choice(_STATUSES),
        }
        for column, pool in pools.items():
            # About 5% NULL: a role the session never used.
            row[column] = None if rng.random() < 0.05 else rng.choice(pool)
        row["variables"] = (
            None
            if rng.random() < 0.2
            else {"topic": rng.choice(_TOPICS), "user": f"user-{rng.randint(1, 50)}"}
        )
        yield row


def _chunks(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    while chunk := list(islice(rows, size)):
        yield chunk


def _load(connection: Connection, rng: random.Random, sessions: int, projects: int) -> None:
    first = connection.execute(select(func.count()).select_from(Project)).scalar_one()
    project_ids = [
        connection.execute(
            insert(Project)
            .values(slug=f"project-{first + i + 1}", name=f"Project {first + i + 1}")
            .returning(Project.id)
        ).scalar_one()
        for i in range(projects)
    ]
    prompt_owners: list[int | None] = [None, *project_ids]
    for owner in prompt_owners:
        for role in ("system", "planner", "synthesis"):
            prompt_id = connection.execute(
                insert(Prompt)
                .values(
                    project_id=owner,
                    name=f"{role}-prompt",
                    content=f"The {role} prompt of {owner or 'everyone'}.",
                    category="orchestration",
                    is_template=False,
                )
                .returning(Prompt.id)
            ).scalar_one()
            version_ids = [
                connection.execute(
                    insert(PromptVersion)
                    .values(
                        prompt_id=prompt_id,
                        version=version,
                        content=f"The {role} prompt, take {version}.\r\n{rng.choice(TRICKY_TEXTS)}",
                        created_by="legacy-admin",
                        change_note=None if version == 1 else "reworded",
                    )
                    .returning(PromptVersion.id)
                ).scalar_one()
                for version in (1, 2)
            ]
            if owner is not None and role == "planner":
                test_id = connection.execute(
                    insert(ABTest)
                    .values(project_id=owner, prompt_id=prompt_id, name="planner wording")
                    .returning(ABTest.id)
                ).scalar_one()
                connection.execute(
                    insert(ABTestVariant),
                    [
                        {
                            "ab_test_id": test_id,
                            "prompt_version_id": vid,
                            "name": name,
                            "weight": 50,
                        }
                        for vid, name in zip(version_ids, ("control", "candidate"), strict=True)
                    ],
                )
    pools = {
        column: legacy_text_pool(rng, column, max(3, min(200, sessions // 20)))
        for column in _ROLES_OPENERS
    }
    for chunk in _chunks(_session_rows(rng, project_ids, sessions, pools), 1_000):
        connection.execute(insert(OrchestrationSession), chunk)


def tables_with_rows(connection: Connection) -> list[str]:
    """prompt-tool's tables (legacy and new) that hold at least one row, in schema order."""
    present = set(inspect(connection).get_table_names())
    return [
        table.name
        for table in Base.metadata.sorted_tables
        if table.name in present
        and connection.execute(select(1).select_from(table).limit(1)).first() is not None
    ]


def load_legacy_sample(
    url: str, *, sessions: int, projects: int, seed: int = 7, force: bool = False
) -> LoadedSample:
    """Add ``projects`` projects with their prompts, A/B tests and ``sessions`` sessions.

    Works at revision 0001 and later: it writes only legacy columns. The same seed gives the same
    rows on an empty database. A database that already holds data (projects, prompts, sessions,
    templates, grants, flags, at any revision) is refused with :class:`InvalidInputError` and
    nothing written, unless ``force``: sample data must never land in a real deployment.
    """
    rng = random.Random(seed)  # noqa: S311 - reproducible sample data, not secrets
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            if not force and (populated := tables_with_rows(connection)):
                raise InvalidInputError(
                    f"{redact(url)} already holds data ({', '.join(populated[:4])}"
                    f"{', ...' if len(populated) > 4 else ''}); sample data goes into an empty "
                    "database only, nothing written (pass --force to add it anyway)"
                )
            _load(connection, rng, sessions, projects)
    finally:
        engine.dispose()
    owners = projects + 1
    return LoadedSample(
        database=redact(url),
        projects=projects,
        prompts=owners * 3,
        prompt_versions=owners * 6,
        sessions=sessions,
        ab_tests=projects,
    )
