"""The flag's state in the database: ``feature_flag_states`` (a global default row with
``project_id`` NULL, plus one override row per project) and ``feature_flag_events`` (every change,
with who and when).

Writes (:func:`write_change`; the public ones, which first check that readers read these rows,
are in :mod:`prompt_tool.flags.writes`) take the row lock, record the event in the same
transaction, and then bump this process's *generation* of the database, which is how every
in-process flag cache learns at once that its snapshot is out of date.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from prompt_tool.db.dialect import database_key
from prompt_tool.db.engine import connected, make_session_factory, session_scope
from prompt_tool.db.models import FeatureFlagEvent, FeatureFlagState, Project
from prompt_tool.db.projects import get_project, list_projects
from prompt_tool.db.revision_guard import require_known_revision
from prompt_tool.db.revisions import EXPAND
from prompt_tool.errors import InvalidInputError
from prompt_tool.flags.types import (
    BUILTIN_DEFAULT,
    FLAG_KEY,
    FlagChange,
    FlagEvent,
    FlagListing,
    FlagState,
    Guard,
    PendingChange,
    parse_sample_rate,
    parse_variant,
)
from prompt_tool.settings import Settings, get_settings

__all__ = [
    "Database",
    "Snapshot",
    "StoredRow",
    "database_key",
    "flag_history",
    "generation",
    "list_flags",
    "load_snapshot",
    "project_ids",
    "read_states",
    "write_change",
]

Database = Engine | str
"""An engine, or a URL for a one-off call (the engine is made and disposed of here)."""


# --- invalidation ---------------------------------------------------------------------------

_generations: dict[str, int] = {}
_generations_lock = threading.Lock()


def generation(key: str) -> int:
    """How many writes this process made to the flag of database ``key``."""
    return _generations.get(key, 0)


def _bump(engine: Engine) -> None:
    key = database_key(engine)
    with _generations_lock:
        _generations[key] = _generations.get(key, 0) + 1


# --- the snapshot the hot path reads ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredRow:
    variant: str
    shadow_sample_rate: float | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The default and every override of one flag, read in one query."""

    default: StoredRow | None
    by_id: dict[int, StoredRow] = field(default_factory=dict)
    by_slug: dict[str, StoredRow] = field(default_factory=dict)


def load_snapshot(engine: Engine, flag_key: str = FLAG_KEY) -> Snapshot:
    query = (
        select(
            FeatureFlagState.project_id,
            Project.slug,
            FeatureFlagState.variant,
            FeatureFlagState.shadow_sample_rate,
        )
        .outerjoin(Project, Project.id == FeatureFlagState.project_id)
        .where(FeatureFlagState.flag_key == flag_key)
    )
    default: StoredRow | None = None
    by_id: dict[int, StoredRow] = {}
    by_slug: dict[str, StoredRow] = {}
    with engine.connect() as connection:
        for project_id, slug, variant, rate in connection.execute(query):
            row = StoredRow(variant, rate)
            if project_id is None:
                default = row
            else:
                by_id[project_id] = row
                if slug is not None:
                    by_slug[slug] = row
    return Snapshot(default, by_id, by_slug)


# --- reads for the operator ------------------------------------------------------------------


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; CURRENT_TIMESTAMP is UTC there.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _state(row: FeatureFlagState, slug: str | None) -> FlagState:
    return FlagState(
        project_slug=slug,
        project_id=row.project_id,
        variant=row.variant,
        shadow_sample_rate=row.shadow_sample_rate,
        updated_by=row.updated_by,
        updated_at=_utc(row.updated_at),
    )


def _row(session: Session, flag_key: str, project_id: int | None) -> FeatureFlagState | None:
    where = (
        FeatureFlagState.project_id.is_(None)
        if project_id is None
        else FeatureFlagState.project_id == project_id
    )
    # FOR UPDATE on PostgreSQL serialises two operators changing the same row; SQLite has one
    # writer at a time anyway and SQLAlchemy leaves the clause out there.
    return session.scalars(
        select(FeatureFlagState)
        .where(FeatureFlagState.flag_key == flag_key, where)
        .with_for_update()
    ).one_or_none()


def read_states(
    db: Database, project_slug: str, flag_key: str = FLAG_KEY
) -> tuple[int, FlagState | None, FlagState | None]:
    """A project's id, its stored override and the stored default (NotFoundError if unknown)."""
    with connected(db) as engine, session_scope(make_session_factory(engine)) as session:
        project = get_project(session, project_slug)
        rows = session.scalars(
            select(FeatureFlagState).where(
                FeatureFlagState.flag_key == flag_key,
                (FeatureFlagState.project_id == project.id) | FeatureFlagState.project_id.is_(None),
            )
        )
        override: FlagState | None = None
        default: FlagState | None = None
        for row in rows:
            if row.project_id is None:
                default = _state(row, None)
            else:
                override = _state(row, project.slug)
        return project.id, override, default


def project_ids(db: Database) -> dict[str, int]:
    """Every project's id, by slug, in slug order."""
    with connected(db) as engine, session_scope(make_session_factory(engine)) as session:
        return {p.slug: p.id for p in sorted(list_projects(session), key=lambda p: p.slug)}


def list_flags(
    db: Database, *, settings: Settings | None = None, flag_key: str = FLAG_KEY
) -> FlagListing:
    """The default, every override and every project without an override, by slug."""
    settings = settings or get_settings()
    with connected(db) as engine, session_scope(make_session_factory(engine)) as session:
        slugs = {p.id: p.slug for p in list_projects(session)}
        default: FlagState | None = None
        overrides: list[FlagState] = []
        for row in session.scalars(
            select(FeatureFlagState).where(FeatureFlagState.flag_key == flag_key)
        ):
            if row.project_id is None:
                default = _state(row, None)
            else:
                overrides.append(_state(row, slugs.get(row.project_id)))
        overridden = {state.project_id for state in overrides}
        return FlagListing(
            flag_key=flag_key,
            builtin_default=BUILTIN_DEFAULT.value,
            kill_switch=not settings.templates_enabled,
            default=default,
            overrides=sorted(overrides, key=lambda s: s.project_slug or ""),
            without_override=sorted(
                slug for project_id, slug in slugs.items() if project_id not in overridden
            ),
        )


def flag_history(
    db: Database,
    project_slug: str | None = None,
    *,
    limit: int | None = None,
    flag_key: str = FLAG_KEY,
) -> list[FlagEvent]:
    """Recorded changes, oldest first: of one project's override, or of everything.

    ``limit`` keeps the most recent ``limit`` events (still oldest first).
    """
    if limit is not None and limit < 1:
        raise InvalidInputError(f"--limit {limit} must be at least 1")
    with connected(db) as engine, session_scope(make_session_factory(engine)) as session:
        query = (
            select(FeatureFlagEvent, Project.slug)
            .outerjoin(Project, Project.id == FeatureFlagEvent.project_id)
            .where(FeatureFlagEvent.flag_key == flag_key)
            .order_by(FeatureFlagEvent.id.desc())
        )
        if project_slug is not None:
            query = query.where(
                FeatureFlagEvent.project_id == get_project(session, project_slug).id
            )
        if limit is not None:
            query = query.limit(limit)
        events = [
            FlagEvent(
                id=event.id,
                flag_key=event.flag_key,
                project_slug=slug,
                project_id=event.project_id,
                old_variant=event.old_variant,
                new_variant=event.new_variant,
                actor=event.actor,
                at=_utc(event.created_at),
            )
            for event, slug in session.execute(query).all()
        ]
        return list(reversed(events))


# --- writes ----------------------------------------------------------------------------------


def _check_actor(actor: str) -> str:
    actor = actor.strip()
    if not actor or len(actor) > 100:
        raise InvalidInputError(f"actor {actor!r} must be 1-100 characters; pass --as USER")
    return actor


def _record(
    session: Session,
    *,
    flag_key: str,
    project_id: int | None,
    old: str | None,
    new: str | None,
    actor: str,
) -> FeatureFlagEvent:
    event = FeatureFlagEvent(
        flag_key=flag_key, project_id=project_id, old_variant=old, new_variant=new, actor=actor
    )
    session.add(event)
    session.flush()
    # The time is the database's, so events written from different hosts order consistently.
    session.refresh(event, ["created_at"])
    return event


def _retrying_once(engine: Engine, work: _Work) -> FlagChange:
    """Run ``work`` in a transaction; once more if a concurrent first write won the insert.

    Two operators setting a project that has no row yet both see "no row" and both insert; the
    partial unique index lets one through and the other gets an IntegrityError. The retry then
    sees the winner's row and updates it, so neither command fails.
    """
    factory = make_session_factory(engine)
    try:
        with session_scope(factory) as session:
            change = work(session)
    except IntegrityError:
        with session_scope(factory) as session:
            change = work(session)
    if change.changed:
        _bump(engine)
    return change


class _Work:
    """One set or unset, re-runnable from scratch in a new transaction."""

    def __init__(
        self,
        *,
        flag_key: str,
        project_slug: str | None,
        variant: str | None,
        sample_rate: float | None,
        actor: str,
        guard: Guard | None,
    ) -> None:
        self.flag_key = flag_key
        self.project_slug = project_slug
        self.variant = None if variant is None else parse_variant(variant)
        self.sample_rate = (
            None if self.variant is None else parse_sample_rate(sample_rate, self.variant)
        )
        self.actor = _check_actor(actor)
        self.guard = guard

    def __call__(self, session: Session) -> FlagChange:
        project_id = (
            None if self.project_slug is None else get_project(session, self.project_slug).id
        )
        row = _row(session, self.flag_key, project_id)
        old = row.variant if row is not None else None
        old_rate = row.shadow_sample_rate if row is not None else None
        if self.variant is None:
            return self._unset(session, row, project_id, old, old_rate)
        # An unchanged rate is kept: switching shadow -> templates -> shadow comes back at the
        # rate the operator chose, not at the (much more expensive) default of every read.
        rate = old_rate if self.sample_rate is None else self.sample_rate
        if old == self.variant.value and rate == old_rate:
            return self._unchanged(project_id, old, old_rate)
        if self.guard is not None:
            self.guard(
                PendingChange(
                    flag_key=self.flag_key,
                    project_slug=self.project_slug,
                    project_id=project_id,
                    old_variant=old,
                    new_variant=self.variant,
                    shadow_sample_rate=rate,
                    actor=self.actor,
                )
            )
        if row is None:
            row = FeatureFlagState(flag_key=self.flag_key, project_id=project_id)
            session.add(row)
        else:
            row.updated_at = func.now()
        row.variant = self.variant.value
        row.shadow_sample_rate = rate
        row.updated_by = self.actor
        event = _record(
            session,
            flag_key=self.flag_key,
            project_id=project_id,
            old=old,
            new=self.variant.value,
            actor=self.actor,
        )
        return self._change(project_id, old, self.variant.value, rate, event)

    def _unset(
        self,
        session: Session,
        row: FeatureFlagState | None,
        project_id: int | None,
        old: str | None,
        old_rate: float | None,
    ) -> FlagChange:
        if row is None:
            return self._unchanged(project_id, None, None)
        session.delete(row)
        event = _record(
            session,
            flag_key=self.flag_key,
            project_id=project_id,
            old=old,
            new=None,
            actor=self.actor,
        )
        return self._change(project_id, old, None, old_rate, event)

    def _unchanged(self, project_id: int | None, old: str | None, rate: float | None) -> FlagChange:
        return FlagChange(
            flag_key=self.flag_key,
            project_slug=self.project_slug,
            project_id=project_id,
            old_variant=old,
            new_variant=old,
            shadow_sample_rate=rate,
            actor=self.actor,
            changed=False,
            at=None,
            event_id=None,
        )

    def _change(
        self,
        project_id: int | None,
        old: str | None,
        new: str | None,
        rate: float | None,
        event: FeatureFlagEvent,
    ) -> FlagChange:
        return FlagChange(
            flag_key=self.flag_key,
            project_slug=self.project_slug,
            project_id=project_id,
            old_variant=old,
            new_variant=new,
            shadow_sample_rate=rate,
            actor=self.actor,
            changed=True,
            at=_utc(event.created_at),
            event_id=event.id,
        )


def write_change(
    db: Database,
    project_slug: str | None,
    variant: str | None,
    *,
    actor: str,
    sample_rate: float | None = None,
    guard: Guard | None = None,
    flag_key: str = FLAG_KEY,
) -> FlagChange:
    """Write one change to the flag's rows: ``project_slug`` None is the default, ``variant``
    None removes the row. The database only: whether readers read these rows is checked by the
    public writes (:mod:`prompt_tool.flags.writes`), which call this.

    ``guard`` sees the change before anything is written and refuses it by raising: the one
    place where a readiness check (before ``templates``) plugs in.
    """
    work = _Work(
        flag_key=flag_key,
        project_slug=project_slug,
        variant=variant,
        sample_rate=sample_rate,
        actor=actor,
        guard=guard,
    )
    with connected(db) as engine:
        require_known_revision(engine, "change the flag", needs=EXPAND)
        return _retrying_once(engine, work)
