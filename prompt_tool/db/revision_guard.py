"""The one check every command makes before it touches the data: that the database is at a
revision this prompt-tool knows, and at least at the one the command needs.

A database a newer prompt-tool upgraded (``alembic_version`` holds a revision these scripts do
not have) or that records several revisions at once is refused with a one-line
:class:`~prompt_tool.errors.UnknownRevisionError` before anything is read or written: its tables
may mean something else now. The library entry points that write (backfill, restore, export,
flag writes, template writes) and verify call :func:`require_known_revision` first, so the
library is as safe as the CLI.

An Engine's answer is remembered (a revision it knows, per Engine object) until this process
runs a schema command (:func:`prompt_tool.db.schema.generation`): the hot paths (template
writes, flag writes) pay one query per engine, not one per operation. A caller's Connection is
asked every time (it may be inside a rehearsal that upgrades and downgrades).
"""

from __future__ import annotations

import threading
from weakref import WeakKeyDictionary

from sqlalchemy import Engine

from prompt_tool.db import schema
from prompt_tool.db.engine import Connectable, connect
from prompt_tool.db.revisions import EXPAND, QUARANTINE, QUARANTINE_TABLE
from prompt_tool.db.url import redact, require_existing_sqlite_file
from prompt_tool.errors import SchemaError, UnknownRevisionError

__all__ = ["require_known_revision"]

# Engine -> (schema.generation() when checked, the revision it was at: one this tool knows).
_checked: WeakKeyDictionary[Engine, tuple[int, str]] = WeakKeyDictionary()
_checked_lock = threading.Lock()
# What a revision after the templates tables adds, as a refusal names it.
_ADDS = {QUARANTINE: f"the backfill quarantine table {QUARANTINE_TABLE}"}


def _recorded(db: Connectable) -> tuple[str, ...]:
    # Connecting would create an empty file for a mistyped SQLite path.
    require_existing_sqlite_file(db.engine.url)
    with connect(db) as connection:
        return schema.recorded_revisions(connection)


def _require_at_least(database: str, action: str, revision: str | None, needs: str) -> None:
    known = schema.known_revisions()
    if revision is not None and known.index(revision) >= known.index(needs):
        return
    if revision is None:
        raise SchemaError(
            f"cannot {action}: it needs schema revision {needs} but {database} is not under "
            "Alembic (no alembic_version); run `orch-migrate db upgrade` (or `orch-migrate db "
            "stamp 0001` first for a legacy deployment); nothing was written"
        )
    missing = (
        "the templates tables"
        if known.index(revision) < known.index(EXPAND)
        else f"what {needs} adds ({_ADDS.get(needs, 'its schema')})"
    )
    raise SchemaError(
        f"cannot {action}: it needs schema revision {needs} but {database} is at {revision}, "
        f"before {missing}; run `orch-migrate db upgrade` first; nothing was written"
    )


def require_known_revision(db: Connectable, action: str, *, needs: str | None = None) -> str | None:
    """The revision ``db`` is at (``None``: not under Alembic), after making sure this
    prompt-tool knows it and, with ``needs``, that it is at least that revision.

    ``action`` names what is refused, as the message's verb ("backfill", "export").
    Raises :class:`UnknownRevisionError` for a revision it does not know or several recorded,
    :class:`SchemaError` for one before ``needs`` (or none, when ``needs`` is given).
    """
    database = redact(db.engine.url)
    generation = schema.generation()
    engine = db if isinstance(db, Engine) else None
    if engine is not None:
        with _checked_lock:
            cached = _checked.get(engine)
        if cached is not None and cached[0] == generation:
            if needs is not None:
                _require_at_least(database, action, cached[1], needs)
            return cached[1]
    recorded = _recorded(db)
    problem = schema.revision_problem(database, recorded)
    if problem is not None:
        raise UnknownRevisionError(f"cannot {action}, nothing was written: {problem}")
    revision = recorded[0] if recorded else None
    if needs is not None:
        _require_at_least(database, action, revision, needs)
    if engine is not None and revision is not None:
        with _checked_lock:
            _checked[engine] = (generation, revision)
    return revision
