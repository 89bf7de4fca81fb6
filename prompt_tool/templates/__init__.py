"""The template manager: scopes, versions, labels, permissions and name caches."""

from prompt_tool.templates.manager import (
    VERSION_COLUMNS,
    TemplateDetail,
    TemplateManager,
    find_template,
    load_versions,
    resolved_from_row,
)
from prompt_tool.templates.permissions import Action, Grant, grant_role, list_grants, revoke_role
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
    "PublishResult",
    "RenderedTemplate",
    "ResolvedTemplate",
    "TemplateAddress",
    "TemplateDetail",
    "TemplateManager",
    "TemplateSummary",
    "VersionInfo",
    "find_template",
    "grant_role",
    "list_grants",
    "load_versions",
    "resolved_from_row",
    "revoke_role",
]
