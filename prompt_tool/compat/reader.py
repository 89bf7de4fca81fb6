"""The read shim: every reader of session prompts goes through here.

The project's flag decides: ``legacy`` returns the legacy TEXT columns; ``templates`` renders the
referenced template versions with their stored variables (a role not yet backfilled, or whose
legacy text changed after it was backfilled, falls back to the legacy text); ``shadow`` returns
the legacy text and compares the template path beside it. A batch of sessions costs a constant
number of SQL statements, and each distinct (version, variables) pair is rendered once.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Generic, NamedTuple, TypeVar, TypeVarTuple, cast

from sqlalchemy import ColumnElement, Connection, Row, Select, func, select

from prompt_tool.compat.shadow import (
    LogPublisher,
    ShadowCounters,
    ShadowEvent,
    ShadowPublisher,
    is_sampled,
    short_diff,
    text_hash,
)
from prompt_tool.compat.types import (
    PromptSource,
    RolePrompt,
    SessionPrompts,
    new_role_prompt,
    new_session_prompts,
)
from prompt_tool.core import literal_text
from prompt_tool.core.errors import TemplateError
from prompt_tool.db.dialect import dialect_of, ids_parameter, one_of_ids
from prompt_tool.db.engine import Connectable, connect
from prompt_tool.db.models import (
    OrchestrationSession,
    Project,
    PromptRole,
    SessionPromptRef,
)
from prompt_tool.errors import NotFoundError
from prompt_tool.flags import FlagDecision, FlagService, Variant
from prompt_tool.templates import ResolvedTemplate, TemplateManager, load_versions

__all__ = ["SessionReader"]

_Key = TypeVar("_Key")
_Value = TypeVar("_Value")
_Columns = TypeVarTuple("_Columns")

logger = logging.getLogger("prompt_tool.compat")

# (position, role, its value): the references are keyed by the stored value, and an enum's
# ``.value`` is a property lookup, paid per role per session otherwise. In the order of
# SessionPrompts' fields (system, planner, synthesis), which is also the legacy rows' order.
_ROLE_KEYS = tuple((position, role, role.value) for position, role in enumerate(PromptRole))
# A legacy row is (session_id, project_id, project, system, planner, synthesis): the driver's
# row as read. A batch reads thousands of rows, and every object built per row (or per role)
# is also one more for the garbage collector, whose passes over the process's heap were a
# sixth of a warm read.
# Read by position in the hot loop: a Row's attribute lookup by name costs several times more.
_SESSION_ID: Final = 0
_PROJECT_ID: Final = 1
_PROJECT: Final = 2
_TEXTS: Final = 3  # then the texts, in role position order
_VERSION_ID: Final = 2  # in a _StoredReference
# Versions are immutable; what a cached one may go stale on is its template's name, scope and
# declared variables, so entries live as long as resolved names do (settings.name_cache_ttl_s).
_VERSION_CACHE_SIZE = 20_000
# The links of a session that has no reference: no version for any role.
_NO_LINKS: tuple[None, ...] = (None,) * (1 + len(_ROLE_KEYS))
# Per role position: what a role the session never used reads as. Immutable, so shared.
_NEVER_USED = tuple(new_role_prompt(role, None, PromptSource.LEGACY) for _, role, _ in _ROLE_KEYS)


# A references row as read (session_id, role, prompt_version_id, variables, legacy_hash), kept
# as the driver's row: a warm read looks at its version id only.
_StoredReference = Row[int, str, int, dict[str, Any] | None, str | None]


class _Version(NamedTuple):
    """A cached version, with what a warm templates read of it needs at hand."""

    template: ResolvedTemplate
    # What it renders to whatever the variables, when known without rendering it
    # (_literal_source), else None.
    literal: str | None
    # Per role position: the RolePrompt a read returns when ``literal`` is the legacy text.
    # Immutable, so every session served from this version shares them.
    served: tuple[RolePrompt, ...]


_LegacyRow = Row[int, int, str, str | None, str | None, str | None]
# A session's links as read: (session_id, then the version id of each role, in role position
# order, or None).
_Links = Row[int, int | None, int | None, int | None]
_LINKED: Final = 1  # where the version ids start in a _Links


# Named tuples, not frozen dataclasses: a frozen dataclass's __init__ (object.__setattr__ per
# field) costs several times a tuple's, and a batch may build thousands of these.
class _Reference(NamedTuple):
    version: _Version
    variables: dict[str, Any]
    legacy_hash: str | None


def _literal_source(template: ResolvedTemplate) -> str | None:
    """What the version renders to whatever the variables, when that is known without
    rendering it: with no declared variable, a source without a brace is its own rendering
    (most imported texts), and a source that ``literal_template`` made of a text renders to
    that text (imported texts with braces). None otherwise."""
    if template.declared_variables:
        return None
    return literal_text(template.source)


def _pinned(
    role: PromptRole, text: str | None, source: PromptSource, template: ResolvedTemplate
) -> RolePrompt:
    """A role whose session references ``template``'s version, whichever text is served: the
    version's id, template name and number come along, so no reader looks them up again."""
    return new_role_prompt(role, text, source, template.version_id, template.name, template.version)


def _cached_version(template: ResolvedTemplate) -> _Version:
    literal = _literal_source(template)
    served = tuple(
        _pinned(role, literal, PromptSource.TEMPLATE, template) for _, role, _ in _ROLE_KEYS
    )
    return _Version(template, literal, served)


class _Recent(Generic[_Key, _Value]):
    """At most ``size`` entries, each kept ``ttl_s`` seconds (0: none kept); thread-safe."""

    def __init__(self, ttl_s: float, size: int) -> None:
        self._ttl_s = ttl_s
        self._size = size
        self._entries: OrderedDict[_Key, tuple[float, _Value]] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, keys: Iterable[_Key], now: float) -> dict[_Key, _Value]:
        """The fresh entries of ``keys``, under one hold of the lock."""
        oldest = now - self._ttl_s
        with self._lock:
            get = self._entries.get
            return {
                key: entry[1]
                for key in keys
                if (entry := get(key)) is not None and entry[0] > oldest
            }

    def put(self, key: _Key, value: _Value, now: float) -> None:
        if self._ttl_s <= 0:
            return
        with self._lock:
            self._entries[key] = (now, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


class _Rendered:
    """Render each distinct (project, version, variables) once per batch.

    The project is part of the key: an ``include`` resolves through the project's hierarchy, so
    one global version can render differently in two projects. Not kept across batches: what
    an ``include`` resolves to changes as soon as the template manager says so.
    """

    def __init__(self, manager: TemplateManager) -> None:
        self._manager = manager
        self._done: dict[tuple[str, int, str], str | TemplateError] = {}

    def __call__(self, project: str, reference: _Reference) -> str | TemplateError:
        version = reference.version
        if version.literal is not None:
            return version.literal
        key = (
            project,
            version.template.version_id,
            json.dumps(reference.variables, sort_keys=True, default=str)
            if reference.variables
            else "",
        )
        if key not in self._done:
            try:
                self._done[key] = self._manager.render_resolved(
                    version.template, reference.variables, project=project
                )
            except TemplateError as error:
                self._done[key] = error
        return self._done[key]


# The queries of a batch, built once per dialect: SQLAlchemy then neither builds them nor
# computes their cache keys again for every batch.
@functools.cache
def _legacy_query(dialect: str) -> Select[int, int, str, str | None, str | None, str | None]:
    return (
        select(
            OrchestrationSession.id.label("session_id"),
            OrchestrationSession.project_id,
            Project.slug.label("project"),
            OrchestrationSession.system_prompt,
            OrchestrationSession.planner_prompt,
            OrchestrationSession.synthesis_prompt,
        )
        .join(Project, Project.id == OrchestrationSession.project_id)
        .where(one_of_ids(dialect, OrchestrationSession.id, "ids"))
    )


@functools.cache
def _links_query(dialect: str) -> Select[int, int, int, int]:
    """One row per session that has references: the version of each role, in role position
    order (NULL for a role without one). Grouped by the database: a third of the rows of
    one per reference, and one lookup per session, not per role, in the hot loop."""

    def version_of(role: PromptRole) -> ColumnElement[int]:
        column = SessionPromptRef.prompt_version_id
        return func.max(column).filter(SessionPromptRef.role == role.value)

    return (
        select(
            SessionPromptRef.session_id,
            version_of(PromptRole.SYSTEM),
            version_of(PromptRole.PLANNER),
            version_of(PromptRole.SYNTHESIS),
        )
        .where(one_of_ids(dialect, SessionPromptRef.session_id, "ids"))
        .group_by(SessionPromptRef.session_id)
    )


@functools.cache
def _references_query(dialect: str) -> Select[int, str, int, dict[str, Any] | None, str | None]:
    return select(
        SessionPromptRef.session_id,
        SessionPromptRef.role,
        SessionPromptRef.prompt_version_id,
        SessionPromptRef.variables,
        SessionPromptRef.legacy_hash,
    ).where(one_of_ids(dialect, SessionPromptRef.session_id, "ids"))


def _of_sessions(
    connection: Connection,
    query_for: Callable[[str], Select[*_Columns]],
    session_ids: list[int],
) -> Sequence[Row[*_Columns]]:
    """One of the queries above, for these sessions."""
    dialect = dialect_of(connection)
    parameters = {"ids": ids_parameter(dialect, session_ids)}
    # .all(): one fetchall, not a fetchone per row as iterating the result does.
    return connection.execute(query_for(dialect), parameters).all()


def _needs_references(row: _LegacyRow, decision: FlagDecision) -> bool:
    """Whether reading this session needs its references in full: with the flag
    ``templates`` (it was not served from its versions alone), or ``shadow`` and sampled."""
    variant = decision.variant
    if variant is Variant.TEMPLATES:
        return True
    return variant is Variant.SHADOW and is_sampled(row[_SESSION_ID], decision.sample_rate)


def _served_from_versions(
    rows: list[_LegacyRow],
    decisions: Mapping[str, FlagDecision],
    links: Mapping[int, _Links],
    versions: Mapping[int, _Version],
) -> tuple[dict[int, SessionPrompts], list[_LegacyRow]]:
    """The common case of a warm read, served from the links alone: a session read with the
    flag ``templates`` whose every role either links to a version whose known rendering is its
    legacy text (the RolePrompt is the version's shared one, no object built) or links to
    nothing (its legacy text). The other rows, to be read with their references in full."""
    served: dict[int, SessionPrompts] = {}
    rest: list[_LegacyRow] = []
    templates = Variant.TEMPLATES
    variant_name = templates.value
    links_of = links.get
    # Per role: what the loop needs, looked up once per batch rather than per session.
    roles = [
        (position, role, _TEXTS + position, _LINKED + position, _NEVER_USED[position])
        for position, role, _ in _ROLE_KEYS
    ]
    for row in rows:
        if decisions[row[_PROJECT]].variant is not templates:
            rest.append(row)
            continue
        session_id = row[_SESSION_ID]
        linked = links_of(session_id, _NO_LINKS)
        prompts: list[RolePrompt] = []
        for position, role, text_at, link_at, never_used in roles:
            legacy = cast("str | None", row[text_at])
            version_id = linked[link_at]
            if version_id is None:
                # NULL stays NULL: a role the session never used has nothing to migrate.
                prompts.append(
                    never_used
                    if legacy is None
                    else new_role_prompt(role, legacy, PromptSource.UNMIGRATED)
                )
                continue
            version = versions[version_id]
            literal = version.literal
            if literal is None or literal != legacy:
                break
            prompts.append(version.served[position])
        else:
            system, planner, synthesis = prompts
            served[session_id] = new_session_prompts(
                session_id, row[_PROJECT], variant_name, system, planner, synthesis
            )
            continue
        rest.append(row)
    return served, rest


class SessionReader:
    """Reads session prompts the way the project's flag says; never breaks because of it."""

    def __init__(
        self,
        engine: Connectable,
        *,
        flags: FlagService | None = None,
        manager: TemplateManager | None = None,
        publisher: ShadowPublisher | None = None,
    ) -> None:
        self.engine = engine
        self.manager = manager if manager is not None else TemplateManager(engine)
        if flags is None:
            # Flags are read on their own connections, outside any caller's transaction.
            flag_engine = engine.engine if isinstance(engine, Connection) else engine
            flags = FlagService(flag_engine, self.manager.settings)
        self.flags = flags
        self.publisher: ShadowPublisher = publisher if publisher is not None else LogPublisher()
        self.shadow_counts = ShadowCounters()
        self._versions: _Recent[int, _Version] = _Recent(
            self.manager.settings.name_cache_ttl_s, _VERSION_CACHE_SIZE
        )

    # --- queries -----------------------------------------------------------------------

    def _legacy_rows(self, connection: Connection, session_ids: list[int]) -> list[_LegacyRow]:
        return list(_of_sessions(connection, _legacy_query, session_ids))

    def _links(
        self, connection: Connection, session_ids: list[int]
    ) -> tuple[dict[int, _Links], dict[int, _Version]]:
        """The versions each session's roles link to, by session; and those versions, from
        the cache or one query for those not in it (a version never changes). Only the ids:
        a link's variables and digest are read for the few sessions whose versions do not
        settle them (:meth:`_references`)."""
        if not session_ids:
            return {}, {}
        rows = _of_sessions(connection, _links_query, session_ids)
        version_ids = {
            version_id for row in rows for version_id in row[_LINKED:] if version_id is not None
        }
        return {row[0]: row for row in rows}, self._versions_of(connection, version_ids)

    def _references(
        self, connection: Connection, session_ids: list[int]
    ) -> tuple[dict[str, dict[int, _StoredReference]], dict[int, _Version]]:
        """The sessions' references in full, by role and then session, and their versions."""
        if not session_ids:
            return {key: {} for _, _, key in _ROLE_KEYS}, {}
        rows = _of_sessions(connection, _references_query, session_ids)
        references = {
            key: {row[0]: row for row in rows if row[1] == key} for _, _, key in _ROLE_KEYS
        }
        return references, self._versions_of(connection, {row[_VERSION_ID] for row in rows})

    def _versions_of(self, connection: Connection, version_ids: set[int]) -> dict[int, _Version]:
        now = time.monotonic()
        found = self._versions.get_many(version_ids, now)
        missing = version_ids - found.keys()
        if not missing:
            return found
        for version_id, template in load_versions(connection, missing).items():
            found[version_id] = version = _cached_version(template)
            self._versions.put(version_id, version, now)
        return found

    # --- reading -----------------------------------------------------------------------

    def read(self, session_id: int, *, connection: Connection | None = None) -> SessionPrompts:
        """One session's prompts (see :meth:`read_many`); NotFoundError if there is none."""
        found = self.read_many([session_id], connection=connection)
        if session_id not in found:
            raise NotFoundError(f"no orchestration session with id {session_id}")
        return found[session_id]

    def read_many(
        self, session_ids: Iterable[int], *, connection: Connection | None = None
    ) -> dict[int, SessionPrompts]:
        """The prompts of many sessions, by id, in a constant number of SQL statements.

        On ``connection`` when given (a caller that reads more of the same sessions beside
        them, as ``sessions show`` its steps, needs no second one), else on one of the reader's
        engine. Flags are read apart, on the flag service's own connections.
        """
        wanted = list(dict.fromkeys(session_ids))
        # One connection for every query, as a legacy reader uses for its one: a second
        # checkout costs a pool round trip (and a reset on return) per batch.
        with connect(self.engine if connection is None else connection) as reading:
            rows = self._legacy_rows(reading, wanted)
            decisions = self.flags.variants_for({(row[_PROJECT], row[_PROJECT_ID]) for row in rows})
            templated = [
                row[_SESSION_ID]
                for row in rows
                if decisions[row[_PROJECT]].variant is Variant.TEMPLATES
            ]
            links, versions = self._links(reading, templated)
            result, rest = _served_from_versions(rows, decisions, links, versions)
            in_full = [
                row[_SESSION_ID] for row in rest if _needs_references(row, decisions[row[_PROJECT]])
            ]
            references, more_versions = self._references(reading, in_full)
        versions.update(more_versions)
        render = _Rendered(self.manager)
        for row in rest:
            session_id = row[_SESSION_ID]
            project = row[_PROJECT]
            decision = decisions[project]
            system, planner, synthesis = [
                self._role(row, position, role, key, decision, references, versions, render)
                for position, role, key in _ROLE_KEYS
            ]
            result[session_id] = new_session_prompts(
                session_id, project, decision.variant.value, system, planner, synthesis
            )
        return result

    def _role(
        self,
        row: _LegacyRow,
        position: int,
        role: PromptRole,
        key: str,
        decision: FlagDecision,
        references: Mapping[str, Mapping[int, _StoredReference]],
        versions: Mapping[int, _Version],
        render: _Rendered,
    ) -> RolePrompt:
        legacy = cast("str | None", row[_TEXTS + position])
        variant = decision.variant
        if variant is Variant.LEGACY:
            return new_role_prompt(role, legacy, PromptSource.LEGACY)
        stored = references[key].get(row.session_id)
        reference = (
            None
            if stored is None
            else _Reference(
                versions[stored.prompt_version_id], stored.variables or {}, stored.legacy_hash
            )
        )
        if variant is Variant.SHADOW:
            if reference is not None and is_sampled(row.session_id, decision.sample_rate):
                self._compare(row, role, legacy, reference, render)
            return new_role_prompt(role, legacy, PromptSource.LEGACY)
        if reference is None:
            # NULL stays NULL: a role the session never used has nothing to migrate.
            source = PromptSource.LEGACY if legacy is None else PromptSource.UNMIGRATED
            return new_role_prompt(role, legacy, source)
        template = reference.version.template
        rendered = render(row.project, reference)
        if rendered == legacy:
            # The templates path gives the legacy text back: whatever the reference was made
            # for, this is the text (and no digest is needed to tell).
            return _pinned(role, rendered, PromptSource.TEMPLATE, template)
        if reference.legacy_hash != text_hash(legacy):
            return _pinned(role, legacy, PromptSource.STALE, template)
        if isinstance(rendered, TemplateError):
            self._publish(row, role, "render_error", reference, legacy, None, str(rendered))
            return _pinned(role, legacy, PromptSource.RENDER_ERROR, template)
        return _pinned(role, rendered, PromptSource.TEMPLATE, template)

    def _compare(
        self,
        row: _LegacyRow,
        role: PromptRole,
        legacy: str | None,
        reference: _Reference,
        render: _Rendered,
    ) -> None:
        rendered = render(row.project, reference)
        if isinstance(rendered, TemplateError):
            self.shadow_counts.add(row.project, "render_errors")
            self._publish(row, role, "render_error", reference, legacy, None, str(rendered))
        elif rendered == legacy:
            self.shadow_counts.add(row.project, "matched")
        else:
            self.shadow_counts.add(row.project, "mismatched")
            self._publish(row, role, "mismatch", reference, legacy, rendered, None)

    def _publish(
        self,
        row: _LegacyRow,
        role: PromptRole,
        kind: str,
        reference: _Reference,
        legacy: str | None,
        rendered: str | None,
        error: str | None,
    ) -> None:
        event = ShadowEvent(
            project=row.project,
            session_id=row.session_id,
            role=role.value,
            kind=kind,
            version_id=reference.version.template.version_id,
            legacy_hash=text_hash(legacy),
            rendered_hash=text_hash(rendered),
            diff=short_diff(legacy, rendered) if rendered is not None else "",
            error=error,
        )
        try:
            self.publisher.publish(event)
        except Exception:
            logger.exception("shadow publisher failed")
