"""What the template manager hands back: plain, frozen data the CLI prints as a table or JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prompt_tool.db.models import Scope

__all__ = [
    "DEFAULT_LABEL",
    "LATEST_LABEL",
    "HistoryEntry",
    "LabelMove",
    "PublishResult",
    "RenderedTemplate",
    "ResolvedTemplate",
    "TemplateAddress",
    "TemplateSummary",
    "VersionInfo",
]

DEFAULT_LABEL = "production"
LATEST_LABEL = "latest"


@dataclass(frozen=True, slots=True)
class TemplateAddress:
    """Where one template lives: its scope, project (slug) and owner, and its name."""

    name: str
    scope: Scope
    project: str | None = None
    owner: str | None = None

    def describe(self) -> str:
        where = {
            Scope.GLOBAL: "global",
            Scope.PROJECT: f"project {self.project}",
            Scope.CUSTOM: f"custom of {self.owner} in project {self.project}",
        }[self.scope]
        return f"template {self.name!r} ({where})"


@dataclass(frozen=True, slots=True)
class ResolvedTemplate:
    """A name resolved for (project, user, label): which template and which immutable version."""

    name: str
    scope: str
    template_id: int
    version_id: int
    version: int
    source: str
    content_hash: str
    declared_variables: tuple[dict[str, Any], ...] = ()

    def to_cache(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scope": self.scope,
            "template_id": self.template_id,
            "version_id": self.version_id,
            "version": self.version,
            "source": self.source,
            "content_hash": self.content_hash,
            "declared_variables": list(self.declared_variables),
        }

    @classmethod
    def from_cache(cls, data: dict[str, Any]) -> ResolvedTemplate:
        return cls(
            name=str(data["name"]),
            scope=str(data["scope"]),
            template_id=int(data["template_id"]),
            version_id=int(data["version_id"]),
            version=int(data["version"]),
            source=str(data["source"]),
            content_hash=str(data["content_hash"]),
            declared_variables=tuple(data.get("declared_variables") or ()),
        )


@dataclass(frozen=True, slots=True)
class RenderedTemplate:
    text: str
    template: ResolvedTemplate


@dataclass(frozen=True, slots=True)
class VersionInfo:
    version: int
    version_id: int
    content_hash: str
    created_by: str | None
    created_at: datetime
    change_note: str | None


@dataclass(frozen=True, slots=True)
class PublishResult:
    """The outcome of storing a template's text: a new version, or nothing (unchanged)."""

    address: TemplateAddress
    version: int
    version_id: int
    created: bool
    labels: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.created:
            return (
                f"{self.address.describe()}: unchanged, identical to version {self.version}; "
                "nothing new was stored"
            )
        moved = ", ".join(
            f"{label} -> v{version}" for label, version in sorted(self.labels.items())
        )
        return f"{self.address.describe()}: stored version {self.version} ({moved})"


@dataclass(frozen=True, slots=True)
class LabelMove:
    """A label pointed at another version (a move or a rollback)."""

    address: TemplateAddress
    label: str
    from_version: int | None
    to_version: int
    rollback: bool = False

    def describe(self) -> str:
        verb = "rolled back" if self.rollback else "moved"
        before = f"v{self.from_version}" if self.from_version is not None else "nothing"
        return f"{self.address.describe()}: {verb} {self.label} from {before} to v{self.to_version}"


@dataclass(frozen=True, slots=True)
class TemplateSummary:
    template_id: int
    name: str
    scope: str
    project: str | None
    owner: str | None
    category: str | None
    tags: tuple[str, ...]
    description: str | None
    declared_variables: tuple[dict[str, Any], ...]
    labels: dict[str, int]
    latest_version: int


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One line of the audit trail: a version published, a label moved, a rollback."""

    at: datetime
    action: str
    actor: str | None
    label: str | None
    from_version: int | None
    to_version: int | None
    note: str | None
