"""The read shim: every reader of session prompts goes through here.

The project's flag decides: ``legacy`` returns the legacy TEXT columns; ``templates`` renders the
referenced template versions with their stored variables (a role not yet backfilled, or whose
legacy text changed after it was backfilled, falls back to the legacy text); ``shadow`` returns
the legacy text and compares the template path beside it. A batch of sessions costs a constant
number of SQL statements, and each distinct (version, variables) pair is rendered once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, Generic, NamedTuple, TypeVar

from sqlalchemy import Connection, Row, select

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
from prompt_tool.core.errors import TemplateError
from prompt_tool.db.dialect import one_of
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

logger = logging.getLogger("prompt_tool.compat")

# (position, role, its value): the references are keyed by the stored value, and an enum's
# ``.value`` is a property lookup, paid per role per session otherwise. In the order of
# SessionPrompts' fields (system, planner, synthesis), which is also _LegacyRow.texts' order.
_ROLE_KEYS = tuple((position, role, role.value) for position, role in enumerate(PromptRole))
# Versions are immutable; what a cached one may go stale on is its template's name, scope and
# declared variables, so entries live as long as resolved names do (settings.name_cache_ttl_s).
_VERSION_CACHE_SIZE = 20_000


# Named tuples, not frozen dataclasses: a batch builds thousands of each, and a frozen
# dataclass's __init__ (object.__setattr__ per field) costs several times a tuple's.
class _Reference(NamedTuple):
    template: ResolvedTemplate
    variables: dict[str, Any]
    legacy_hash: str | None


# A references row as read (session_id, role, prompt_version_id, variables, legacy_hash), kept
# as the driver's row: a warm read looks at its version id only.
_StoredReference = Row[tuple[int, str, int, dict[str, Any] | None, str | None]]


class _Version(NamedTuple):
    """A cached version, with what a warm templates read of it needs at hand."""

    template: ResolvedTemplate
    # The source when it is its own rendering whatever the variables (no brace, no declared
    # variable: most imported texts), else None.
    literal: str | None
    # Per role position: the RolePrompt a read returns when ``literal`` is the legacy text.
    # Immutable, so every session served from this version shares them.
    served: tuple[RolePrompt, ...]


class _LegacyRow(NamedTuple):
    session_id: int
    project_id: int
    project: str
    texts: tuple[str | None, str | None, str | None]  # system, planner, synthesis


def _literal_source(template: ResolvedTemplate) -> str | None:
    """The source, when it is its own rendering whatever the variables: not one brace and no
    declared variable (the engine hands such a text back unchanged). Most imported texts."""
    if not template.declared_variables and "{" not in template.source:
        return template.source
    return None


def _cached_version(template: ResolvedTemplate) -> _Version:
    literal = _literal_source(template)
    served = tuple(
        new_role_prompt(role, literal, PromptSource.TEMPLATE, template.version_id)
        for _, role, _ in _ROLE_KEYS
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
            entries = [(key, self._entries.get(key)) for key in keys]
        return {key: entry[1] for key, entry in entries if entry is not None and entry[0] > oldest}

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
        literal = _literal_source(reference.template)
        if literal is not None:
            return literal
        key = (
            project,
            reference.template.version_id,
            json.dumps(reference.variables, sort_keys=True, default=str)
            if reference.variables
            else "",
        )
        if key not in self._done:
            try:
                self._done[key] = self._manager.render_resolved(
                    reference.template, reference.variables, project=project
                )
            except TemplateError as error:
                self._done[key] = error
        return self._done[key]


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
        query = (
            select(
                OrchestrationSession.id,
                OrchestrationSession.project_id,
                Project.slug,
                OrchestrationSession.system_prompt,
                OrchestrationSession.planner_prompt,
                OrchestrationSession.synthesis_prompt,
            )
            .join(Project, Project.id == OrchestrationSession.project_id)
            .where(one_of(connection, OrchestrationSession.id, session_ids))
        )
        return [
            _LegacyRow(session_id, project_id, slug, (system, planner, synthesis))
            # .all(): one fetchall, not a fetchone per row as iterating the result does.
            for session_id, project_id, slug, system, planner, synthesis in connection.execute(
                query
            ).all()
        ]

    def _references(
        self, connection: Connection, session_ids: list[int]
    ) -> tuple[dict[tuple[int, str], _StoredReference], dict[int, _Version]]:
        """The sessions' references, by (session, role): one narrow query on the references
        table; and the versions they name, from the cache or one query for those not in it (a
        version never changes)."""
        if not session_ids:
            return {}, {}
        query = select(
            SessionPromptRef.session_id,
            SessionPromptRef.role,
            SessionPromptRef.prompt_version_id,
            SessionPromptRef.variables,
            SessionPromptRef.legacy_hash,
        ).where(one_of(connection, SessionPromptRef.session_id, session_ids))
        rows = connection.execute(query).all()
        references = {(row[0], row[1]): row for row in rows}
        return references, self._versions_of(connection, {row[2] for row in rows})

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

    def read(self, session_id: int) -> SessionPrompts:
        """One session's prompts (see :meth:`read_many`)."""
        found = self.read_many([session_id])
        if session_id not in found:
            raise NotFoundError(f"no orchestration session with id {session_id}")
        return found[session_id]

    def read_many(self, session_ids: Iterable[int]) -> dict[int, SessionPrompts]:
        """The prompts of many sessions, by id, in a constant number of SQL statements."""
        wanted = list(dict.fromkeys(session_ids))
        # One connection for both queries, as a legacy reader uses for its one: a second
        # checkout costs a pool round trip (and a reset on return) per batch.
        with connect(self.engine) as connection:
            rows = self._legacy_rows(connection, wanted)
            decisions = self.flags.variants_for({(row.project, row.project_id) for row in rows})
            needs_templates = [
                row.session_id
                for row in rows
                if decisions[row.project].variant is not Variant.LEGACY
            ]
            references, versions = self._references(connection, needs_templates)
        render = _Rendered(self.manager)
        result: dict[int, SessionPrompts] = {}
        role_prompt = self._role
        reference_of = references.get
        for row in rows:
            decision = decisions[row.project]
            variant = decision.variant
            if variant is Variant.TEMPLATES:
                # The common case inline, and no object built for it: a reference to a version
                # whose source is its own rendering and is the legacy text. The RolePrompt is
                # the version's shared one. Anything else takes the full path.
                session_id = row.session_id
                texts = row.texts
                system, planner, synthesis = [
                    version.served[position]
                    if (stored := reference_of((session_id, key))) is not None
                    and (version := versions[stored.prompt_version_id]).literal is not None
                    and version.literal == texts[position]
                    else role_prompt(
                        row, position, role, key, variant, decision, references, versions, render
                    )
                    for position, role, key in _ROLE_KEYS
                ]
            else:
                system, planner, synthesis = [
                    role_prompt(
                        row, position, role, key, variant, decision, references, versions, render
                    )
                    for position, role, key in _ROLE_KEYS
                ]
            result[row.session_id] = new_session_prompts(
                row.session_id, row.project, variant.value, system, planner, synthesis
            )
        return result

    def _role(
        self,
        row: _LegacyRow,
        position: int,
        role: PromptRole,
        key: str,
        variant: Variant,
        decision: FlagDecision,
        references: Mapping[tuple[int, str], _StoredReference],
        versions: Mapping[int, _Version],
        render: _Rendered,
    ) -> RolePrompt:
        legacy = row.texts[position]
        if variant is Variant.LEGACY:
            return new_role_prompt(role, legacy, PromptSource.LEGACY)
        stored = references.get((row.session_id, key))
        reference = (
            None
            if stored is None
            else _Reference(
                versions[stored.prompt_version_id].template,
                stored.variables or {},
                stored.legacy_hash,
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
        version_id = reference.template.version_id
        rendered = render(row.project, reference)
        if rendered == legacy:
            # The templates path gives the legacy text back: whatever the reference was made
            # for, this is the text (and no digest is needed to tell).
            return new_role_prompt(role, rendered, PromptSource.TEMPLATE, version_id)
        if reference.legacy_hash != text_hash(legacy):
            return new_role_prompt(role, legacy, PromptSource.STALE, version_id)
        if isinstance(rendered, TemplateError):
            self._publish(row, role, "render_error", reference, legacy, None, str(rendered))
            return new_role_prompt(role, legacy, PromptSource.RENDER_ERROR, version_id)
        return new_role_prompt(role, rendered, PromptSource.TEMPLATE, version_id)

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
            version_id=reference.template.version_id,
            legacy_hash=text_hash(legacy),
            rendered_hash=text_hash(rendered),
            diff=short_diff(legacy, rendered) if rendered is not None else "",
            error=error,
        )
        try:
            self.publisher.publish(event)
        except Exception:
            logger.exception("shadow publisher failed")
