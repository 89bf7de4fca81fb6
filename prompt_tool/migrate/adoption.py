"""Imported templates left behind by a downgrade are taken back, not imported a second time.

``alembic downgrade -1`` drops the columns that make a row of ``prompts`` a template (type, scope,
content hash) but, touching no legacy row, keeps the rows the backfill imported (category
``imported``, name ``imported/<role>/<sha256>``, their version 1). After the next upgrade those
rows have a NULL scope: no lookup finds them, and a backfill would import every text again,
doubling ``prompts`` on each round trip. So before it walks the sessions, the backfill adopts
them back: the first row of each (project, name) that has no project-scope template of that
name yet becomes one again, in short keyset batches over ``prompts``. Rows created by a round
trip before this existed (duplicates of an adopted name) stay ordinary legacy rows.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import ColumnElement, Connection, and_, exists, literal_column, select, update
from sqlalchemy.orm import aliased

from prompt_tool.db.dialect import sha256_hex
from prompt_tool.db.engine import Connectable, begin, connect
from prompt_tool.db.models import Prompt, PromptType, PromptVersion, Scope

__all__ = ["adopt_orphaned_imports"]

_IMPORTED_CATEGORY = "imported"
_BATCH = 2_000


def _orphans(project_ids: Sequence[int], scoped: bool) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [
        Prompt.scope.is_(None),
        Prompt.category == _IMPORTED_CATEGORY,
        Prompt.name.like("imported/%"),
        Prompt.project_id.is_not(None),
    ]
    if scoped:
        conditions.append(Prompt.project_id.in_(list(project_ids)))
    return conditions


def _adoptable_ids(
    connection: Connection, after: int, project_ids: Sequence[int], scoped: bool
) -> tuple[dict[int, tuple[int, str, str]], int | None]:
    """The next batch of orphans: the ids to adopt, and the last id looked at."""
    batch = connection.execute(
        select(Prompt.id, Prompt.project_id, Prompt.name)
        .where(Prompt.id > after, *_orphans(project_ids, scoped))
        .order_by(Prompt.id)
        .limit(_BATCH)
    ).all()
    if not batch:
        return {}, None
    adopted = aliased(Prompt)
    first_of_name: dict[tuple[int, str], int] = {}
    for prompt_id, project_id, name in batch:
        if project_id is not None:
            first_of_name.setdefault((project_id, name), prompt_id)
    taken = {
        (project_id, name)
        for project_id, name in connection.execute(
            select(adopted.project_id, adopted.name).where(
                adopted.scope == literal_column("'project'"),
                adopted.project_id.in_({p for p, _ in first_of_name}),
                adopted.name.in_({n for _, n in first_of_name}),
            )
        )
    }
    adoptable = {}
    for (project_id, name), prompt_id in first_of_name.items():
        if (project_id, name) not in taken:
            _, role, digest = name.split("/", 2)
            adoptable[prompt_id] = (project_id, role, digest)
    return adoptable, batch[-1][0]


def adopt_orphaned_imports(
    engine: Connectable, project_ids: Sequence[int], scoped: bool, *, dry_run: bool
) -> set[tuple[int, str, str]]:
    """Make imported rows left by a downgrade templates again: the (project id, role, text
    hash) of each one (that would be) adopted."""
    with connect(engine) as connection:
        orphans = exists().where(and_(*_orphans(project_ids, scoped)))
        if not connection.execute(select(orphans)).scalar():
            return set()
    adopted: set[tuple[int, str, str]] = set()
    after = 0
    while True:
        with begin(engine) as connection:
            ids, last = _adoptable_ids(connection, after, project_ids, scoped)
            if last is None:
                return adopted
            after = last
            adopted.update(ids.values())
            if ids and not dry_run:
                connection.execute(
                    update(Prompt)
                    .where(Prompt.id.in_(list(ids)))
                    .values(
                        prompt_type=PromptType.ORCHESTRATION_TEMPLATE.value,
                        scope=Scope.PROJECT.value,
                        content_hash=sha256_hex(Prompt.content),
                        tags=[_IMPORTED_CATEGORY],
                        declared_variables=[],
                    )
                )
                connection.execute(
                    update(PromptVersion)
                    .where(
                        PromptVersion.prompt_id.in_(list(ids)), PromptVersion.content_hash.is_(None)
                    )
                    .values(content_hash=sha256_hex(PromptVersion.content))
                )
