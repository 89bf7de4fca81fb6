"""The backfill quarantine (``migration_quarantine``, revision 0003): the session roles whose
legacy text cannot be imported, with the reason.

A text cannot be imported when its literal template (:func:`prompt_tool.core.literal_template`)
is over the template size limit, or is not a template the sandboxed engine compiles and that
gives the text back byte for byte. Such a (session, role) is not linked: readers keep serving its
legacy text. It is recorded here, in the batch's own transaction, and counted; a run stops once
more than ``--max-errors`` rows were newly quarantined (:func:`check_error_budget`). Every later
batch over the session screens it again (cheaply: only texts without an imported template are
screened), so a fixed setting (a raised limit) imports it, and a (session, role) linked since is
released from the quarantine. ``--retry-quarantined`` walks only the quarantined sessions
(:func:`quarantined_condition`). ``orch-migrate status`` and ``verify`` count them per project.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Text,
    delete,
    func,
    select,
    tuple_,
)

from prompt_tool.core import TemplateEngine, TemplateError, literal_template
from prompt_tool.db.dialect import BulkInsert, one_of
from prompt_tool.db.models import MigrationQuarantine, OrchestrationSession, Project, PromptRole
from prompt_tool.errors import PromptToolError
from prompt_tool.migrate.backfill.types import BackfillRun, BackfillSummary, TextKey
from prompt_tool.settings import Settings

__all__ = [
    "LIMIT_SETTING",
    "OUTPUT_SETTING",
    "QUARANTINE",
    "ImportLimits",
    "QuarantineLimitError",
    "QuarantinedRow",
    "by_project",
    "check_error_budget",
    "held",
    "named",
    "quarantined_condition",
    "record",
    "release",
    "screen",
]

QUARANTINE = MigrationQuarantine.__table__
LIMIT_SETTING = "PROMPT_TOOL_TEMPLATE_MAX_STORED_SOURCE_BYTES"
OUTPUT_SETTING = "PROMPT_TOOL_TEMPLATE_MAX_OUTPUT_BYTES"
_SESSIONS = OrchestrationSession.__table__


class QuarantineLimitError(PromptToolError):
    """A run quarantined more rows than ``--max-errors``: it stopped, what it committed stands."""

    exit_code = 1


@dataclass(frozen=True, slots=True)
class ImportLimits:
    """What an imported text must fit: the largest template source the engine compiles, and
    the largest output it renders (an imported version renders to its text)."""

    max_source_bytes: int
    max_output_bytes: int = 1024 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> ImportLimits:
        # The engine takes a stored version up to the larger of the two source limits.
        return cls(
            max(settings.template_max_source_bytes, settings.template_max_stored_source_bytes),
            settings.template_max_output_bytes,
        )


class QuarantinedRow(NamedTuple):
    """One (session, role) that cannot be imported, and why."""

    session_id: int
    project_id: int
    role: str
    legacy_hash: str | None
    reason: str


@functools.lru_cache(maxsize=4)
def _engine(limits: ImportLimits) -> TemplateEngine:
    """A sandboxed engine with ``limits`` (in this process, whatever the settings say)."""
    size = limits.max_source_bytes
    settings = Settings(
        template_max_source_bytes=size,
        template_max_stored_source_bytes=size,
        template_max_output_bytes=limits.max_output_bytes,
    )
    return TemplateEngine(settings=settings, cache_size=1)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _problem(text: str, limits: ImportLimits) -> str | None:
    """Why ``text`` cannot be imported, or None when its literal template is fine."""
    source = literal_template(text)
    size = len(source.encode("utf-8"))
    if size > limits.max_source_bytes:
        grown = "" if source == text else " once its braces are escaped"
        return (
            f"text of {size:,} bytes{grown} is over the template limit of "
            f"{limits.max_source_bytes:,} bytes ({LIMIT_SETTING})"
        )
    output = len(text.encode("utf-8"))
    if output > limits.max_output_bytes:  # verify and `templates render` would refuse it
        return (
            f"text of {output:,} bytes is over the render output limit of "
            f"{limits.max_output_bytes:,} bytes ({OUTPUT_SETTING})"
        )
    # The engine renders a literal source without compiling it (see core.engine): this costs
    # an unescape and a comparison, not a compile (67 ms for a 9 KB text with 900 escapes).
    try:
        rendered = _engine(limits).render(source, {}, name="imported")
    except TemplateError as error:
        return f"its literal template does not render: {_one_line(error)}"
    if rendered != text:
        return "its literal template does not render back to the text byte for byte"
    return None


def screen(texts: Mapping[TextKey, str], limits: ImportLimits) -> dict[TextKey, str]:
    """The keys whose legacy text cannot be imported, each with the reason (one line): its
    literal template over the size limit, or not rendering back to it in the sandboxed engine
    (over the output limit, say). Cheap: nothing is compiled (see :func:`_problem`)."""
    found: dict[TextKey, str] = {}
    for key, text in texts.items():
        try:
            reason = _problem(text, limits)
        except UnicodeEncodeError as error:  # a lone surrogate: no UTF-8 template holds it
            reason = f"the text is not valid UTF-8 (position {error.start})"
        if reason is not None:
            found[key] = reason
    return found


_ROWS = BulkInsert(
    QUARANTINE,
    [
        ("run_id", BigInteger()),
        ("session_id", BigInteger()),
        ("project_id", BigInteger()),
        ("role", Text()),
        ("legacy_hash", Text()),
        ("reason", Text()),
    ],
    finish=lambda statement: statement.on_conflict_do_update(
        index_elements=["session_id", "role"],
        set_={
            "run_id": statement.excluded.run_id,
            "legacy_hash": statement.excluded.legacy_hash,
            "reason": statement.excluded.reason,
        },
    ),
)


def held(connection: Connection, after: int, last: int) -> set[tuple[int, str]]:
    """The (session, role) pairs quarantined in the key range (after, last]: one range scan of
    the (session_id, role) unique index."""
    rows = connection.execute(
        select(QUARANTINE.c.session_id, QUARANTINE.c.role).where(
            QUARANTINE.c.session_id > after, QUARANTINE.c.session_id <= last
        )
    )
    return {(int(session_id), str(role)) for session_id, role in rows}


def record(connection: Connection, run_id: int | None, rows: Sequence[QuarantinedRow]) -> int:
    """Quarantine ``rows`` (a (session, role) already there gets the new reason, hash and run),
    in the caller's transaction; how many were not quarantined before."""
    unique = {(row.session_id, row.role): row for row in rows}
    if not unique:
        return 0
    sessions = sorted({session_id for session_id, _ in unique})
    before = {
        (int(session_id), str(role))
        for session_id, role in connection.execute(
            select(QUARANTINE.c.session_id, QUARANTINE.c.role).where(
                one_of(connection, QUARANTINE.c.session_id, sessions)
            )
        )
    }
    _ROWS.execute(
        connection,
        [
            (run_id, row.session_id, row.project_id, row.role, row.legacy_hash, row.reason)
            for _, row in sorted(unique.items())
        ],
    )
    return len(unique.keys() - before)


def release(connection: Connection, pairs: Collection[tuple[int, str]]) -> int:
    """Take (session, role) pairs out of the quarantine (linked now, or nothing to link)."""
    if not pairs:
        return 0
    result = connection.execute(
        delete(MigrationQuarantine).where(
            tuple_(QUARANTINE.c.session_id, QUARANTINE.c.role).in_(sorted(pairs))
        )
    )
    return int(result.rowcount or 0)


def by_project(connection: Connection, project_ids: Sequence[int] = ()) -> dict[str, int]:
    """Quarantined sessions per project slug (of ``project_ids``, else every project)."""
    query = (
        select(Project.slug, func.count(func.distinct(QUARANTINE.c.session_id)))
        .join(Project, Project.id == QUARANTINE.c.project_id)
        .group_by(Project.slug)
    )
    if project_ids:
        query = query.where(QUARANTINE.c.project_id.in_(list(project_ids)))
    return {str(slug): int(count) for slug, count in connection.execute(query)}


def named(
    connection: Connection, project_ids: Sequence[int] = (), limit: int = 10
) -> list[tuple[str, str]]:
    """The first ``limit`` quarantined rows, as (project slug, "orchestration_sessions id N
    column: reason"), by session."""
    query = (
        select(Project.slug, QUARANTINE.c.session_id, QUARANTINE.c.role, QUARANTINE.c.reason)
        .join(Project, Project.id == QUARANTINE.c.project_id)
        .order_by(QUARANTINE.c.session_id, QUARANTINE.c.role)
        .limit(limit)
    )
    if project_ids:
        query = query.where(QUARANTINE.c.project_id.in_(list(project_ids)))
    table = OrchestrationSession.__tablename__
    return [
        (str(slug), f"{table} id {session_id} {PromptRole(role).legacy_column}: {reason}")
        for slug, session_id, role, reason in connection.execute(query)
    ]


def quarantined_condition() -> ColumnElement[bool]:
    """The condition on ``orchestration_sessions`` that keeps the quarantined sessions
    (``--retry-quarantined``)."""
    return _SESSIONS.c.id.in_(select(QUARANTINE.c.session_id))


def check_error_budget(run: BackfillRun, summary: BackfillSummary) -> None:
    """Stop the run once it has quarantined more rows than ``--max-errors`` (call it after each
    committed batch: what is committed stands, and a rerun carries on from its checkpoint)."""
    limit = run.options.max_errors
    if summary.quarantined > limit:
        rows = "row" if summary.quarantined == 1 else "rows"
        raise QuarantineLimitError(
            f"backfill stopped: {summary.quarantined:,} {rows} quarantined, over --max-errors "
            f"{limit:,}; what is committed stands; see `orch-migrate status` for the reasons, "
            "fix them (or raise --max-errors) and run again"
        )
