"""What the database server says about its own health, read for a backfill that must not hurt
it: replica replay lag, WAL written, vacuums running, sessions blocked behind the run, the
oldest open transaction, and an operator's own throttle query. PostgreSQL has each of these;
SQLite has none of them, and each function says so with ``None`` (the throttle query runs on
both).

A run's connections carry its ``application_name`` (:func:`tag_connections`): that is how
"blocked behind the run" finds the run's backends on the server.

The server's activity views are a snapshot taken once per transaction: read each sample in a
transaction of its own (as the backfill's health monitor does), not in a long one.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import overload

from sqlalchemy import Connection, Engine, text

from prompt_tool.db.engine import on_every_begin
from prompt_tool.errors import PromptToolError

__all__ = [
    "StatisticsHiddenError",
    "oldest_transaction_s",
    "replica_lag_ms",
    "run_throttle_query",
    "sessions_blocked_by",
    "tag_connections",
    "vacuums_running",
    "wal_position",
]

# Granted these, a role sees every backend's activity, its replicas and every vacuum.
_GRANT = "grant it pg_monitor (or pg_read_all_stats), or run as a superuser"


class StatisticsHiddenError(PromptToolError):
    """The server keeps what a signal needs from this role (another role's backends show with
    their columns empty): the signal cannot be read, and reading 0 would be a lie."""


def _postgresql(connection: Connection) -> bool:
    return connection.dialect.name == "postgresql"


def replica_lag_ms(connection: Connection) -> float | None:
    """The replay lag of the most lagging replica, in milliseconds (``pg_stat_replication``);
    0.0 with no replica, or with replicas that are caught up (their lag reads NULL once they
    have nothing left to replay). Streaming replicas only: a logical replication consumer (a
    subscription, change data capture) is not a replica reads are served from. None on SQLite.

    Raises :class:`StatisticsHiddenError` when replicas are there but the server hides their
    state from this role.
    """
    if not _postgresql(connection):
        return None
    row = connection.execute(
        text(
            "SELECT count(*) FILTER (WHERE r.state IS NULL),"
            " coalesce(max(extract(epoch FROM r.replay_lag)) * 1000, 0)"
            " FROM pg_stat_replication r WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots s"
            "  WHERE s.active_pid = r.pid AND s.slot_type = 'logical')"
        )
    ).one()
    if row[0]:
        raise StatisticsHiddenError(
            f"{row[0]} replica(s) connected, but the server hides their replay lag from "
            f"{_current_user(connection)}; {_GRANT}"
        )
    return float(row[1])


def wal_position(connection: Connection) -> int | None:
    """How far the server has written its WAL, in bytes since its beginning: two readings a
    second apart give the bytes written per second. None on a standby (it writes none of its
    own) and on SQLite."""
    if not _postgresql(connection):
        return None
    position = connection.execute(
        text(
            "SELECT CASE WHEN pg_is_in_recovery() THEN NULL"
            " ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0') END"
        )
    ).scalar_one()
    return None if position is None else int(position)


def vacuums_running(connection: Connection, tables: Sequence[str]) -> list[str] | None:
    """Those of ``tables`` (in this database, on the search path) a vacuum is working on now,
    autovacuum's or anyone's ``VACUUM`` (``pg_stat_progress_vacuum``; a vacuum of a table's
    TOAST table counts as the table's), sorted. None on SQLite.

    Raises :class:`StatisticsHiddenError` when none of ``tables`` is seen being vacuumed but a
    vacuum in this database hides its table from this role (autovacuum runs as a superuser).
    """
    if not _postgresql(connection):
        return None
    names = [
        str(name)
        for name in connection.execute(
            text(
                "SELECT DISTINCT t.relname FROM pg_stat_progress_vacuum p"
                " JOIN pg_class t ON p.relid IN (t.oid, t.reltoastrelid)"
                " WHERE p.datname = current_database()"
                " AND t.relname = ANY (CAST(:tables AS text[]))"
                " AND t.relnamespace IN (SELECT n.oid FROM pg_namespace n"
                "  WHERE n.nspname = ANY (current_schemas(false)))"
                " ORDER BY t.relname"
            ),
            {"tables": list(tables)},
        ).scalars()
    ]
    if names:
        return names
    hidden = connection.execute(
        text(
            "SELECT count(*) FROM pg_stat_progress_vacuum"
            " WHERE datname = current_database() AND relid IS NULL"
        )
    ).scalar_one()
    if hidden:
        raise StatisticsHiddenError(
            f"a vacuum is running in this database but the server hides its table from "
            f"{_current_user(connection)}; {_GRANT}"
        )
    return []


def sessions_blocked_by(connection: Connection, application_name: str) -> int | None:
    """How many sessions of this database wait on a lock held by (or queued ahead of them
    behind) a backend whose ``application_name`` is ``application_name`` — the run's backends,
    see :func:`tag_connections`. The run's own backends waiting on one another are not
    counted. None on SQLite, which has one writer and no one to block."""
    if not _postgresql(connection):
        return None
    # pg_blocking_pids() visits the whole lock table: only for sessions waiting on a lock (the
    # wait is hidden from a role without pg_read_all_stats for other roles' sessions: those are
    # asked too).
    return int(
        connection.execute(
            text(
                "WITH run AS (SELECT array_agg(pid) AS pids FROM pg_stat_activity"
                "  WHERE datname = current_database() AND application_name = :name)"
                " SELECT count(*) FROM pg_stat_activity w, run"
                " WHERE run.pids IS NOT NULL AND w.datname = current_database()"
                " AND w.pid <> pg_backend_pid()"
                " AND w.application_name IS DISTINCT FROM :name"
                " AND (w.wait_event_type IS NULL OR w.wait_event_type = 'Lock')"
                " AND pg_blocking_pids(w.pid) && run.pids"
            ),
            {"name": application_name},
        ).scalar_one()
    )


def oldest_transaction_s(
    connection: Connection, excluding_application: str | None = None
) -> float | None:
    """The age in seconds of the oldest transaction open in this database (it keeps the dead
    rows of every table here from vacuum): client sessions' and prepared transactions', not
    the calling session's nor, given ``excluding_application``, those of the backends that
    carry that ``application_name`` (the run's own); 0.0 when there is none. None on SQLite.

    This database, not the whole server: a transaction elsewhere holds back no vacuum here.
    Without pg_read_all_stats a role sees only its own sessions' transactions.
    """
    if not _postgresql(connection):
        return None
    age = connection.execute(
        text(
            "SELECT extract(epoch FROM clock_timestamp() - min(started)) FROM ("
            " SELECT xact_start AS started FROM pg_stat_activity"
            "  WHERE datname = current_database() AND pid <> pg_backend_pid()"
            "  AND backend_type = 'client backend' AND xact_start IS NOT NULL"
            "  AND application_name IS DISTINCT FROM CAST(:excluded AS text)"
            " UNION ALL SELECT prepared FROM pg_prepared_xacts"
            "  WHERE database = current_database()) AS open_transactions"
        ),
        {"excluded": excluding_application},
    ).scalar_one()
    return 0.0 if age is None else max(float(age), 0.0)


def run_throttle_query(connection: Connection, sql: str) -> bool:
    """Run an operator's throttle query as they wrote it (no parameters: a ``%`` or a ``:name``
    in it is plain text) and say whether the first column of its first row is true (a query
    that returns no row says false). Database errors propagate as they are."""
    if _postgresql(connection):
        sql = sql.replace("%", "%%")  # psycopg reads % as a placeholder; %% is a plain %
    result = connection.exec_driver_sql(sql)
    if not result.returns_rows:
        raise ValueError("it is not a query: it returns no rows")
    row = result.first()
    if row is None or len(row) == 0 or row[0] is None:
        return False
    value = row[0]
    # true/false, or a number (SQLite has no boolean): anything else ('no', 'false' as text)
    # would read as true and hold the run for ever.
    if isinstance(value, bool | int | float | Decimal):
        return bool(value)
    raise ValueError(f"it returned {type(value).__name__} {str(value)[:40]!r}, not true or false")


def _current_user(connection: Connection) -> str:
    return f'role "{connection.execute(text("SELECT current_user")).scalar_one()}"'


@overload
def tag_connections(db: Engine, application_name: str) -> Engine: ...
@overload
def tag_connections(db: Connection, application_name: str) -> Connection: ...
@overload
def tag_connections(db: Engine | Connection, application_name: str) -> Engine | Connection: ...
def tag_connections(db: Engine | Connection, application_name: str) -> Engine | Connection:
    """``db`` with every transaction it begins carrying ``application_name`` on the server
    (PostgreSQL ``set_config('application_name', ..., true)``, i.e. ``SET LOCAL``), so other
    sessions can tell the run's backends (``pg_stat_activity``, :func:`sessions_blocked_by`).

    As :func:`prompt_tool.db.engine.bounded_waits`: the Engine is a copy sharing the pool, and
    the name lasts as long as each transaction, so a connection going back to the pool carries
    no trace of it (a backend holds the locks that block others only inside a transaction).
    The two compose in either order: ``tag_connections(bounded_waits(engine, ...), name)`` and
    ``bounded_waits(tag_connections(engine, name), ...)`` both bound and tag every transaction.
    A caller's Connection is inside the caller's transaction: it is tagged for the rest of it.
    SQLite has no such thing: ``db`` comes back as it is.
    """
    if db.dialect.name != "postgresql":
        return db

    def tag(connection: Connection) -> None:
        connection.execute(
            text("SELECT set_config('application_name', :name, true)"), {"name": application_name}
        )

    if isinstance(db, Connection):
        tag(db)
        return db
    return on_every_begin(db, tag)
