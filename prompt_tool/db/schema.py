"""The schema history as a library: upgrade, downgrade, stamp, current, history.

`orch-migrate db ...` calls these; so can an application at start-up. They work from a checkout
(the ``alembic/`` folder at the repo root) and from an installed wheel (which carries the same
scripts as ``prompt_tool/_alembic``).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, inspect
from sqlalchemy.exc import DBAPIError, OperationalError

import prompt_tool
from prompt_tool.db.drift import drift, expand_objects_present
from prompt_tool.db.engine import check_connection, make_engine, transactional_ddl
from prompt_tool.db.revisions import BASELINE
from prompt_tool.db.url import normalize_url, redact, require_existing_sqlite_file
from prompt_tool.errors import (
    DatabaseUnavailableError,
    PromptToolError,
    SchemaError,
    UnknownRevisionError,
)

__all__ = [
    "HEAD",
    "Revision",
    "RevisionDetail",
    "SchemaCheck",
    "SchemaState",
    "alembic_config",
    "alembic_ini",
    "check",
    "current",
    "downgrade",
    "downgrade_sql",
    "generation",
    "heads",
    "history",
    "known_revisions",
    "migrate_on",
    "recorded_revisions",
    "revision_problem",
    "script_location",
    "show",
    "stamp",
    "upgrade",
    "upgrade_sql",
]

HEAD = "head"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Revision:
    revision: str
    down_revision: str | None
    description: str
    is_head: bool


@dataclass(frozen=True, slots=True)
class RevisionDetail:
    """`db show REV`: one revision, with its whole docstring and where its script is."""

    revision: str
    down_revision: str | None
    is_head: bool
    is_base: bool
    description: str
    doc: str
    path: str


@dataclass(frozen=True, slots=True)
class SchemaState:
    """Where a database stands, before and after a schema command."""

    database: str
    previous: str | None
    current: str | None
    head: str
    # A downgrade of 0002: where what people made was archived (or that it was discarded),
    # and the rows taken back out of the legacy and new tables, by table.
    archive: str | None = None
    discarded: bool = False
    removed: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    # How long locks were held: the longest of the short batches, and the last transaction.
    batches: int = 0
    longest_batch_ms: float = 0.0
    last_transaction_ms: float = 0.0
    exclusive_lock_ms: float = 0.0
    # Set when this prompt-tool does not know the revision recorded (or several are): what to do.
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class SchemaCheck:
    """`db check`: the recorded revision against the schema actually there."""

    database: str
    current: str | None
    head: str
    drift: list[str]

    @property
    def consistent(self) -> bool:
        return not self.drift


def script_location() -> Path:
    """The migration scripts: inside the installed package, else the checkout's ``alembic/``."""
    for candidate in (_PACKAGE_DIR / "_alembic", _PACKAGE_DIR.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise SchemaError(
        f"migration scripts not found next to {_PACKAGE_DIR}; reinstall prompt-tool "
        "(the wheel carries them as prompt_tool/_alembic)"
    )


def alembic_ini() -> Path:
    """An ini for the plain ``alembic`` CLI, beside the scripts (in the wheel and a checkout):
    ``alembic -c "$(orch-migrate db alembic-ini)" upgrade head``."""
    ini = script_location() / "alembic.ini"
    if not ini.is_file():
        raise SchemaError(f"no alembic.ini beside the migration scripts in {ini.parent}")
    return ini


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.attributes["configure_logger"] = False
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the schema history has exactly one head"
    return head


def history() -> list[Revision]:
    """Every revision, oldest first."""
    scripts = ScriptDirectory.from_config(alembic_config())
    heads = set(scripts.get_heads())
    revisions = [
        Revision(
            revision=script.revision,
            down_revision=script.down_revision if isinstance(script.down_revision, str) else None,
            description=script.doc.splitlines()[0] if script.doc else "",
            is_head=script.revision in heads,
        )
        for script in scripts.walk_revisions()
    ]
    return list(reversed(revisions))


def heads() -> list[Revision]:
    """The head revision(s): one, unless the history branched."""
    return [revision for revision in history() if revision.is_head]


@cache
def known_revisions() -> tuple[str, ...]:
    """The revision ids this prompt-tool knows, oldest first (its scripts never change while it
    runs)."""
    return tuple(revision.revision for revision in history())


def recorded_revisions(connection: Connection) -> tuple[str, ...]:
    """What ``alembic_version`` holds, as it is: empty when the database is not under Alembic,
    several ids when it records several."""
    return tuple(MigrationContext.configure(connection).get_current_heads())


def revision_problem(database: str, recorded: Sequence[str], *, stamp_to: str = "") -> str | None:
    """What is wrong with ``recorded`` (the rows of ``alembic_version``) for this prompt-tool,
    and what to do about it, in one line; ``None`` when it is one revision it knows, or none.
    ``stamp_to``: the revision the advice names (default: any it knows)."""
    known = known_revisions()
    matches = stamp_to or f"one of the revisions it knows ({', '.join(known)})"
    recover = (
        f"if you know the schema matches {matches}, record it alone with "
        f"`orch-migrate db stamp {stamp_to or 'REV'} --purge`"
    )
    if len(recorded) > 1:
        return (
            f"{database} records several revisions at once ({', '.join(sorted(recorded))}), "
            f"which this prompt-tool ({prompt_tool.__version__}) cannot work on; {recover}"
        )
    if recorded and recorded[0] not in known:
        return (
            f"{database} is at revision {recorded[0]}, which this prompt-tool "
            f"({prompt_tool.__version__}) does not know: a newer prompt-tool upgraded it; use "
            f"that version, or, {recover}"
        )
    return None


_generation = [0]
_generation_lock = threading.Lock()


def generation() -> int:
    """How many schema commands (upgrade, downgrade, stamp) this process has run: a revision
    checked at an older generation may have changed since."""
    return _generation[0]


def _changed() -> None:
    with _generation_lock:
        _generation[0] += 1


def show(revision: str) -> RevisionDetail:
    """One revision: an id (or a unique prefix of one), ``head`` or ``base``."""
    scripts = ScriptDirectory.from_config(alembic_config())
    try:
        number = scripts.as_revision_number(revision)
        script = scripts.get_revision(number) if isinstance(number, str) else None
    except CommandError as error:
        raise SchemaError(
            f"no revision {revision!r} ({error}); `orch-migrate db history` lists them"
        ) from None
    if script is None:  # "base": before the first revision
        raise SchemaError(
            f"{revision!r} is before the first revision, not a revision; "
            "`orch-migrate db history` lists them"
        )
    return RevisionDetail(
        revision=script.revision,
        down_revision=script.down_revision if isinstance(script.down_revision, str) else None,
        is_head=script.is_head,
        is_base=script.is_base,
        description=script.doc.splitlines()[0] if script.doc else "",
        doc=(script.module.__doc__ or script.doc or "").strip(),
        path=str(Path(script.path).resolve()),
    )


# What `db downgrade --sql` cannot do: printed at the top of its script.
_OFFLINE_DOWNGRADE_NOTE = (
    "-- Offline downgrade script: the schema steps only. The online `orch-migrate db downgrade`\n"
    "-- also archives what people made (--archive) and takes the rows the new system wrote back\n"
    "-- out of the legacy tables before these statements; this script does neither, so run it\n"
    "-- only on a database with no such rows (or after `orch-migrate export`).\n"
)


def _offline(
    url: str, action: str, revisions: str, options: Mapping[str, Any] | None = None
) -> str:
    """The SQL ``action`` to ``revisions`` would run, as text; nothing connects."""
    parsed = normalize_url(url)
    if action == "downgrade" and ":" not in revisions:
        raise SchemaError(
            f"downgrade --sql needs a range FROM:TO, not {revisions!r} (offline there is no "
            "database to take the current revision from): e.g. `db downgrade --sql 0002:0001`"
        )
    start, _, end = revisions.rpartition(":")
    if any(part.startswith(("-", "+")) for part in (start, end)):
        raise SchemaError(
            f"--sql needs revision ids (or head/base), not relative steps: {revisions!r}; "
            "e.g. `db upgrade --sql 0001:0002`, `db downgrade --sql 0002:0001`"
        )
    buffer = io.StringIO()
    config = Config(output_buffer=buffer)
    config.set_main_option("script_location", str(script_location()))
    # ConfigParser interpolates %; a URL-encoded password would otherwise break it.
    config.set_main_option(
        "sqlalchemy.url", parsed.render_as_string(hide_password=False).replace("%", "%%")
    )
    config.attributes["configure_logger"] = False
    config.attributes.update(options or {})
    try:
        getattr(command, action)(config, revisions, sql=True)
    except PromptToolError:
        raise
    except CommandError as error:
        raise SchemaError(
            f"{action} --sql {revisions!r} failed: {error}; `orch-migrate db history` lists the "
            "revisions"
        ) from None
    sql = buffer.getvalue()
    return _OFFLINE_DOWNGRADE_NOTE + sql if action == "downgrade" else sql


def upgrade_sql(url: str, revisions: str = HEAD) -> str:
    """`db upgrade --sql`: the upgrade as SQL for ``url``'s dialect, ``[FROM:]TO`` (no FROM:
    from an empty database). Nothing connects to the database."""
    return _offline(url, "upgrade", revisions)


def downgrade_sql(url: str, revisions: str, *, drop_legacy_tables: bool = False) -> str:
    """`db downgrade --sql FROM:TO`: the downgrade's schema steps as SQL; see the note it
    starts with. Going below 0001 is refused unless ``drop_legacy_tables``. Nothing connects
    to the database."""
    target = revisions.rpartition(":")[2]
    if target == "base" and not drop_legacy_tables:
        # Alembic lets every step through offline; this one is refused here, as online.
        raise SchemaError(
            f"refused: {revisions!r} goes below 0001, whose script drops the legacy tables "
            "(projects, prompts, every orchestration session); if you really mean it, add "
            "--i-understand-this-drops-legacy-tables"
        )
    options = {"i-understand-this-drops-legacy-tables": "yes"} if drop_legacy_tables else {}
    return _offline(url, "downgrade", revisions, options)


def _current_on(connection: Connection) -> str | None:
    """The one revision recorded (``None``: none); several are joined by commas (see
    :func:`revision_problem`)."""
    recorded = recorded_revisions(connection)
    return ",".join(sorted(recorded)) if recorded else None


def _refuse_unknown(url: str, refusal: str, connection: Connection) -> None:
    problem = revision_problem(redact(url), recorded_revisions(connection))
    if problem is not None:
        raise UnknownRevisionError(f"{refusal}: {problem}")


def _require_existing_sqlite_file(url: str) -> None:
    require_existing_sqlite_file(normalize_url(url))


@contextmanager
def _connected(url: str) -> Iterator[Connection]:
    engine = transactional_ddl(make_engine(url))
    try:
        check_connection(engine)
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def current(url: str) -> SchemaState:
    """The revision ``url`` is at (``None``: not under Alembic)."""
    _require_existing_sqlite_file(url)
    with _connected(url) as connection:
        recorded = recorded_revisions(connection)
    revision = ",".join(sorted(recorded)) if recorded else None
    problem = revision_problem(redact(url), recorded)
    return SchemaState(redact(url), revision, revision, _head(), problem=problem)


def check(url: str) -> SchemaCheck:
    """Compare the recorded revision with the objects the schema holds."""
    _require_existing_sqlite_file(url)
    with _connected(url) as connection:
        _refuse_unknown(url, "db check cannot compare the schema with its revision", connection)
        revision = _current_on(connection)
        problems = drift(connection, revision)
    return SchemaCheck(redact(url), revision, _head(), problems)


def _refuse_undoing_a_partial_upgrade(url: str, connection: Connection, before: str | None) -> None:
    if before == BASELINE and expand_objects_present(connection).present:
        raise SchemaError(
            f"{redact(url)} records 0001 but holds part of 0002 (an upgrade was interrupted); "
            "finish it with `orch-migrate db upgrade`, then `orch-migrate db downgrade` takes "
            "it back whole"
        )


def _interruptible(step: Callable[[], object]) -> None:
    """Run ``step``; a Ctrl-C stays a Ctrl-C even when cleaning up after it failed too (an
    interrupted statement leaves the connection unusable, and Alembic's cleanup then raises)."""
    try:
        step()
    except BaseException as error:
        cause: BaseException | None = error
        while cause is not None:
            if isinstance(cause, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            cause = cause.__context__
        raise


def _run(
    url: str,
    action: str,
    revision: str,
    *,
    allow_unversioned: bool,
    options: Mapping[str, Any] | None = None,
) -> SchemaState:
    with _connected(url) as connection:
        _refuse_unknown(url, f"db {action} refused, nothing was changed", connection)
        before = _current_on(connection)
        if before is None and not allow_unversioned:
            raise SchemaError(
                f"{redact(url)} is not under Alembic (no alembic_version table); nothing to "
                "downgrade. Run `orch-migrate db upgrade` first"
            )
        if before is None and action == "upgrade" and inspect(connection).has_table("projects"):
            raise SchemaError(
                f"{redact(url)} already has the legacy tables but no alembic_version; if they "
                "match the legacy schema, run `orch-migrate db stamp 0001`, then `db upgrade`"
            )
        if action == "downgrade":
            _refuse_undoing_a_partial_upgrade(url, connection, before)
        connection.commit()
        config = alembic_config(connection)
        config.attributes.update(options or {})
        try:
            _interruptible(lambda: getattr(command, action)(config, revision))
        except PromptToolError:
            raise
        except CommandError as error:
            raise SchemaError(
                f"{action} to {revision!r} failed: {error}; `orch-migrate db history` lists the "
                "revisions"
            ) from None
        except DBAPIError as error:
            _raise_database_error(url, action, error)
        finally:
            _changed()
        connection.commit()
        committed = time.perf_counter()
        after = _current_on(connection)
    retraction = config.attributes.get("retraction")
    if retraction is None:
        return SchemaState(redact(url), before, after, _head())
    return SchemaState(
        redact(url),
        before,
        after,
        _head(),
        archive=retraction.archive,
        discarded=retraction.discarded,
        removed={table: rows for table, rows in retraction.removed.items() if rows},
        dropped=dict(retraction.dropped),
        batches=retraction.batches,
        longest_batch_ms=round(retraction.longest_batch_ms, 1),
        last_transaction_ms=round(
            (committed - (retraction.last_transaction_started or committed)) * 1e3, 1
        ),
        exclusive_lock_ms=round((committed - (retraction.exclusive_started or committed)) * 1e3, 1),
    )


_PARTLY_UNDONE = (
    " The schema is as it was (each step commits whole); a downgrade may already have removed "
    "rows a backfill re-creates."
)


def _raise_database_error(url: str, action: str, error: DBAPIError) -> None:
    sqlstate = getattr(error.orig, "sqlstate", None)
    first_line = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
    if sqlstate == "55P03":  # lock_not_available: lock_timeout expired
        raise SchemaError(
            f"{action} gave up waiting for a table lock ({first_line}): a long transaction holds "
            f"it.{_PARTLY_UNDONE} Run it again when that transaction ends, or raise "
            "PROMPT_TOOL_LOCK_TIMEOUT_MS"
        ) from None
    # deadlock_detected, or foreign_key_violation: a row a concurrent writer (a backfill)
    # committed points at one the downgrade removes.
    if sqlstate in ("40P01", "23503"):
        raise SchemaError(
            f"{action} met a concurrent writer ({first_line}).{_PARTLY_UNDONE} Stop running "
            "backfills and run it again"
        ) from None
    if "database is locked" in first_line:  # SQLite: another writer (a backfill) holds the file
        raise SchemaError(
            f"{action} waited for another writer on {redact(url)} and gave up ({first_line})."
            f"{_PARTLY_UNDONE} Run it again when the other writer (a backfill?) has finished"
        ) from None
    if isinstance(error, OperationalError):
        raise DatabaseUnavailableError(f"{action} on {redact(url)} failed: {first_line}") from None
    raise SchemaError(f"{action} on {redact(url)} failed: {first_line}") from None


def migrate_on(
    connection: Connection, action: str, revision: str, options: Mapping[str, Any] | None = None
) -> str | None:
    """Run ``upgrade``/``downgrade`` on a connection inside the caller's transaction.

    Nothing commits: the caller decides (``rehearse --rollback`` rolls everything back, which
    PostgreSQL's transactional DDL makes exact). Returns the revision reached.
    """
    if action not in {"upgrade", "downgrade"}:
        raise ValueError(action)
    config = alembic_config(connection)
    config.attributes.update(options or {})
    config.attributes["single_transaction"] = True
    try:
        getattr(command, action)(config, revision)
    except PromptToolError:
        raise
    except CommandError as error:
        raise SchemaError(f"{action} to {revision!r} failed: {error}") from None
    finally:
        _changed()
    return _current_on(connection)


def upgrade(url: str, revision: str = HEAD) -> SchemaState:
    """Bring ``url`` up to ``revision`` (default: head); creates a SQLite file if needed."""
    return _run(url, "upgrade", revision, allow_unversioned=True)


def downgrade(
    url: str,
    revision: str = "-1",
    *,
    archive: Path | str | None = None,
    discard_user_templates: bool = False,
    drop_legacy_tables: bool = False,
) -> SchemaState:
    """Step ``url`` back to ``revision`` (default: one step).

    Going below 0002 takes back every row the new system wrote into the legacy tables; what
    people made (templates, labels, A/B tests of templates, sessions' links) must go to
    ``archive`` (a directory ``orch-migrate restore`` reads) or be discarded explicitly, else the
    downgrade is refused before it changes anything. Going below 0001 (the legacy tables
    themselves) is refused unless ``drop_legacy_tables``.
    """
    _require_existing_sqlite_file(url)
    options: dict[str, Any] = {}
    if archive is not None:
        options["archive"] = str(Path(archive).absolute())
    if discard_user_templates:
        options["discard"] = "user-templates"
    if drop_legacy_tables:
        options["i-understand-this-drops-legacy-tables"] = "yes"
    return _run(url, "downgrade", revision, allow_unversioned=False, options=options)


def stamp(url: str, revision: str, *, purge: bool = False) -> SchemaState:
    """Record ``revision`` as current without running anything (adopting an existing database).

    ``purge`` empties ``alembic_version`` first: the only way to record a revision over one this
    prompt-tool does not know (a newer one upgraded the database), or over several.
    """
    _require_existing_sqlite_file(url)
    with _connected(url) as connection:
        recorded = recorded_revisions(connection)
        before = ",".join(sorted(recorded)) if recorded else None
        problem = revision_problem(redact(url), recorded, stamp_to=revision)
        if problem is not None and not purge:
            raise UnknownRevisionError(
                f"stamp {revision!r} refused, nothing was changed: {problem}"
            )
        connection.commit()
        try:
            command.stamp(alembic_config(connection), revision, purge=purge)
        except CommandError as error:
            raise SchemaError(
                f"stamp {revision!r} failed: {error}; `orch-migrate db history` lists the revisions"
            ) from None
        finally:
            _changed()
        connection.commit()
        after = _current_on(connection)
    return SchemaState(redact(url), before, after, _head())
