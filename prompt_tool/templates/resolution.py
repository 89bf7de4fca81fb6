"""What a template name means, and rendering it.

A name resolves custom -> project -> global for a (project, user), through a short-lived
in-process cache, an optional shared Redis cache, then the database; the version found is
rendered (or a source validated) by the engine, with includes resolved the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple, TypeAlias

from sqlalchemy import and_, case, or_, select
from sqlalchemy.orm import Session

from prompt_tool.core import TemplateEngine, content_hash
from prompt_tool.core.errors import TemplateNotFound
from prompt_tool.db.models import Prompt, PromptVersion, Scope, TemplateLabel
from prompt_tool.templates.cache import NameCache, RedisSourceCache
from prompt_tool.templates.database import TemplateDatabase
from prompt_tool.templates.lookup import TEMPLATE_TYPE
from prompt_tool.templates.naming import check_address
from prompt_tool.templates.types import (
    DEFAULT_LABEL,
    RenderedTemplate,
    ResolvedTemplate,
    TemplateAddress,
)

__all__ = ["NameKey", "TemplateResolver"]

# Resolution order: the most specific scope wins.
_SCOPE_RANK = case(
    (Prompt.scope == Scope.CUSTOM.value, 0), (Prompt.scope == Scope.PROJECT.value, 1), else_=2
)

# The name cache's key: (project, user, name, label, version). A plain tuple, built, hashed
# and compared in C on every render; building a NamedTuple costs a Python-level call (~0.3 us,
# a tenth of a warm render's own overhead). The loader reads it as a _Wanted.
NameKey: TypeAlias = tuple[str | None, str | None, str, str, int | None]
_NAME: Final = 2


class _Wanted(NamedTuple):
    """What a name cache key asks for, by field."""

    project: str | None
    user: str | None
    name: str
    label: str
    version: int | None


class TemplateResolver:
    """Resolves names to versions through the caches, and renders and validates sources."""

    def __init__(
        self,
        database: TemplateDatabase,
        template_engine: TemplateEngine,
        names: NameCache[NameKey, ResolvedTemplate],
        shared_cache: RedisSourceCache | None,
    ) -> None:
        self._database = database
        self._engine = template_engine
        self._names = names
        self._shared = shared_cache

    def forget(self, address: TemplateAddress, project_id: int | None) -> None:
        """Forget cached resolutions at once in this process, and in others through Redis."""
        self._names.invalidate_where(lambda key: key[_NAME] == address.name)
        if self._shared is not None:
            self._shared.bump_epoch(None if address.scope is Scope.GLOBAL else project_id)

    # --- validation ----------------------------------------------------------------------

    def _include_loader(self, project: str | None, user: str | None) -> Callable[[str], str | None]:
        """Includes, imports and extends resolve through the same hierarchy as names do."""

        def load(name: str) -> str | None:
            try:
                return self.resolve(name, project=project, user=user).source
            except TemplateNotFound:
                return None

        return load

    def validate(
        self,
        address: TemplateAddress,
        source: str,
        declared_variables: Sequence[Mapping[str, Any]] | None = None,
    ) -> Any:
        """Check ``source`` as if it were stored at ``address``; raise on any problem."""
        check_address(address)
        return self._engine.validate(
            source,
            name=address.name,
            declared_variables=declared_variables,
            loader=self._include_loader(address.project, address.owner),
        )

    # --- resolution ----------------------------------------------------------------------

    def _load_resolution(self, name_key: NameKey) -> ResolvedTemplate:
        key = _Wanted(*name_key)
        project_id = self._database.project_id(key.project) if key.project else None
        cache_key = f"{key.user or ''}\x1f{key.name}\x1f{key.label}\x1f{key.version or ''}"
        # Redis first, outside any transaction: a shared hit costs no database round trip.
        if self._shared is not None:
            cached = self._shared.get(project_id, cache_key)
            if cached is not None:
                return ResolvedTemplate.from_cache(cached)
        with self._database.unit() as session:
            resolved = self._query_resolution(session, project_id, key)
        if self._shared is not None:
            self._shared.set(project_id, cache_key, resolved.to_cache())
        return resolved

    def _query_resolution(
        self, session: Session, project_id: int | None, key: _Wanted
    ) -> ResolvedTemplate:
        scopes = [Prompt.scope == Scope.GLOBAL.value]
        if project_id is not None:
            scopes.append(
                and_(Prompt.scope == Scope.PROJECT.value, Prompt.project_id == project_id)
            )
            if key.user:
                scopes.append(
                    and_(
                        Prompt.scope == Scope.CUSTOM.value,
                        Prompt.project_id == project_id,
                        Prompt.owner == key.user,
                    )
                )
        query = (
            select(Prompt.id, Prompt.scope, Prompt.declared_variables, PromptVersion)
            .where(Prompt.prompt_type == TEMPLATE_TYPE, Prompt.name == key.name, or_(*scopes))
            .order_by(_SCOPE_RANK)
            .limit(1)
        )
        if key.version is not None:
            query = query.join(PromptVersion, PromptVersion.prompt_id == Prompt.id).where(
                PromptVersion.version == key.version
            )
        else:
            query = query.join(
                TemplateLabel,
                and_(TemplateLabel.prompt_id == Prompt.id, TemplateLabel.label == key.label),
            ).join(PromptVersion, PromptVersion.id == TemplateLabel.prompt_version_id)
        row = session.execute(query).first()
        if row is None:
            wanted = f"version {key.version}" if key.version is not None else f"label {key.label!r}"
            where = f"project {key.project}" if key.project else "the global scope"
            raise TemplateNotFound(
                f"no template {key.name!r} with {wanted} in {where} (looked in custom, project and "
                "global scopes)",
                hint="`prompt-tool templates list` shows what exists",
            )
        prompt_id, scope, declared, version = row
        return ResolvedTemplate(
            name=key.name,
            scope=scope,
            template_id=prompt_id,
            version_id=version.id,
            version=version.version,
            source=version.content,
            content_hash=version.content_hash or content_hash(version.content),
            declared_variables=tuple(declared or ()),
        )

    def resolve(
        self,
        name: str,
        *,
        project: str | None,
        user: str | None = None,
        label: str = DEFAULT_LABEL,
        version: int | None = None,
        fallback: str | None = None,
    ) -> ResolvedTemplate:
        """Which version ``name`` means for (project, user): custom, then project, then global.

        ``fallback`` is used only when the database cannot be reached for a name never fetched
        before; a name fetched before is served from the cache even when expired.
        """
        key: NameKey = (project, user, name, label, version)
        fallback_load = None
        if fallback is not None:

            def fallback_load() -> ResolvedTemplate:
                return ResolvedTemplate(
                    name=name,
                    scope="fallback",
                    template_id=0,
                    version_id=0,
                    version=0,
                    source=fallback,
                    content_hash=content_hash(fallback),
                )

        return self._names.get(key, lambda: self._load_resolution(key), fallback=fallback_load)

    # --- rendering -----------------------------------------------------------------------

    def render(
        self,
        name: str,
        variables: Mapping[str, Any],
        *,
        project: str | None,
        user: str | None = None,
        label: str = DEFAULT_LABEL,
        version: int | None = None,
        fallback: str | None = None,
    ) -> RenderedTemplate:
        """Resolve ``name`` and render it with ``variables`` in the sandbox."""
        resolved = self.resolve(
            name, project=project, user=user, label=label, version=version, fallback=fallback
        )
        text = self.render_resolved(resolved, variables, project=project, user=user)
        return RenderedTemplate(text, resolved)

    def render_resolved(
        self,
        resolved: ResolvedTemplate,
        variables: Mapping[str, Any],
        *,
        project: str | None,
        user: str | None = None,
    ) -> str:
        # The compiled cache is keyed by the source text as read, never the stored digest: a
        # version whose text was changed in the database behind our back keeps its old digest,
        # and would be rendered as whichever version first filled that slot.
        return self._engine.render(
            resolved.source,
            variables,
            name=resolved.name,
            version=resolved.version,
            declared_variables=resolved.declared_variables or None,
            loader=self._include_loader(project, user),
        )
