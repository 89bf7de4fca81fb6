"""The template manager: scopes, versions, labels, permissions and name caches.

The public face: :class:`TemplateManager` for everything that keeps state (caches, units of
work), and the plain lookups of :mod:`prompt_tool.templates.lookup` for code that already holds
a transaction (verify, matching, compat, ab_testing).
"""

from prompt_tool.templates.catalog import TemplateDetail
from prompt_tool.templates.lookup import (
    VERSION_COLUMNS,
    find_template,
    find_version,
    load_versions,
    resolved_from_row,
)
from prompt_tool.templates.manager import TemplateManager
from prompt_tool.templates.permissions import Action, Grant, grant_role, list_grants, revoke_role
from prompt_tool.templates.projects import ProjectInfo
from prompt_tool.templates.types import (
    DEFAULT_LABEL,
    LATEST_LABEL,
    HistoryEntry,
    LabelMove,
    PublishResult,
    RenderedTemplate,
    ResolvedTemplate,
    TemplateAddress,
    TemplateSummary,
    VersionInfo,
)

__all__ = [
    "DEFAULT_LABEL",
    "LATEST_LABEL",
    "VERSION_COLUMNS",
    "Action",
    "Grant",
    "HistoryEntry",
    "LabelMove",
    "ProjectInfo",
    "PublishResult",
    "RenderedTemplate",
    "ResolvedTemplate",
    "TemplateAddress",
    "TemplateDetail",
    "TemplateManager",
    "TemplateSummary",
    "VersionInfo",
    "find_template",
    "find_version",
    "grant_role",
    "list_grants",
    "load_versions",
    "resolved_from_row",
    "revoke_role",
]
