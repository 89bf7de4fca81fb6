"""The template manager: orchestration templates stored as prompts of their own type.

A template lives in a scope (global, project, custom) and has immutable versions; labels
(``production``, ``latest``, ...) point at versions and every move is recorded, so the history
is the audit trail. Names resolve custom -> project -> global for a (project, user), through a
short-lived in-process cache, an optional shared Redis cache, then the database.

:class:`TemplateManager` is the one object callers hold; each of its methods is the method of
the same name on one of its parts, which own the work:

- :class:`~prompt_tool.templates.store.TemplateStore`: create, update, move_label, rollback
- :class:`~prompt_tool.templates.catalog.TemplateCatalog`: list_templates, show, history,
  versions, diff
- :class:`~prompt_tool.templates.resolution.TemplateResolver`: resolve, render,
  render_resolved, validate
- :class:`~prompt_tool.templates.projects.ProjectsAndRoles`: create_project, projects, grant,
  revoke, roles
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, overload

from prompt_tool.core import TemplateEngine
from prompt_tool.db.engine import Connectable, make_engine
from prompt_tool.settings import Settings, get_settings
from prompt_tool.templates.cache import NameCache, RedisSourceCache
from prompt_tool.templates.catalog import TemplateCatalog
from prompt_tool.templates.database import TemplateDatabase
from prompt_tool.templates.projects import ProjectsAndRoles
from prompt_tool.templates.resolution import NameKey, TemplateResolver
from prompt_tool.templates.store import TemplateStore
from prompt_tool.templates.types import ResolvedTemplate

__all__ = ["TemplateManager"]

_Part = TypeVar("_Part")
_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


class _PartMethod(Generic[_Part, _Params, _Result]):
    """A manager method that is the method of the same name on the part held in ``attribute``.

    Same signature and docstring as the part's. The first access on a manager stores the part's
    bound method on that manager (as ``functools.cached_property`` does), so a call costs what a
    plain method call costs: render and resolve are on every read path.
    """

    def __init__(
        self, attribute: str, method: Callable[Concatenate[_Part, _Params], _Result]
    ) -> None:
        self._attribute = attribute
        self._name = method.__name__
        self.__doc__ = method.__doc__

    @overload
    def __get__(self, manager: None, owner: type[TemplateManager]) -> Self: ...

    @overload
    def __get__(
        self, manager: TemplateManager, owner: type[TemplateManager]
    ) -> Callable[_Params, _Result]: ...

    def __get__(
        self, manager: TemplateManager | None, owner: type[TemplateManager]
    ) -> Self | Callable[_Params, _Result]:
        if manager is None:
            return self
        bound: Callable[_Params, _Result] = getattr(getattr(manager, self._attribute), self._name)
        vars(manager)[self._name] = bound
        return bound


class TemplateManager:
    """Store, resolve, render and audit orchestration templates."""

    def __init__(
        self,
        engine: Connectable,
        *,
        settings: Settings | None = None,
        template_engine: TemplateEngine | None = None,
        names: NameCache[NameKey, ResolvedTemplate] | None = None,
        shared_cache: RedisSourceCache | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.engine = engine
        self.template_engine = template_engine or TemplateEngine(settings=self.settings)
        database = TemplateDatabase(engine)
        self._resolver = TemplateResolver(
            database,
            self.template_engine,
            names if names is not None else NameCache(self.settings.name_cache_ttl_s),
            shared_cache
            if shared_cache is not None
            else RedisSourceCache.from_settings(self.settings),
        )
        self._store = TemplateStore(database, self._resolver)
        self._catalog = TemplateCatalog(database)
        self._projects = ProjectsAndRoles(database)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> TemplateManager:
        return cls(make_engine(url), **kwargs)

    create = _PartMethod("_store", TemplateStore.create)
    update = _PartMethod("_store", TemplateStore.update)
    move_label = _PartMethod("_store", TemplateStore.move_label)
    rollback = _PartMethod("_store", TemplateStore.rollback)

    list_templates = _PartMethod("_catalog", TemplateCatalog.list_templates)
    show = _PartMethod("_catalog", TemplateCatalog.show)
    history = _PartMethod("_catalog", TemplateCatalog.history)
    versions = _PartMethod("_catalog", TemplateCatalog.versions)
    diff = _PartMethod("_catalog", TemplateCatalog.diff)

    validate = _PartMethod("_resolver", TemplateResolver.validate)
    resolve = _PartMethod("_resolver", TemplateResolver.resolve)
    render = _PartMethod("_resolver", TemplateResolver.render)
    render_resolved = _PartMethod("_resolver", TemplateResolver.render_resolved)

    create_project = _PartMethod("_projects", ProjectsAndRoles.create_project)
    projects = _PartMethod("_projects", ProjectsAndRoles.projects)
    grant = _PartMethod("_projects", ProjectsAndRoles.grant)
    revoke = _PartMethod("_projects", ProjectsAndRoles.revoke)
    roles = _PartMethod("_projects", ProjectsAndRoles.roles)
