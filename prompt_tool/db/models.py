"""Typed models of every table, matching the Alembic history exactly.

Tables up to revision 0001 are the legacy schema that deployments run today; their names and
columns are fixed because operators' data and scripts depend on them. Everything else arrived in
0002 (the expand step) and only adds.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "ABAssignment",
    "ABTest",
    "ABTestVariant",
    "Base",
    "FeatureFlagEvent",
    "FeatureFlagState",
    "MigrationBatch",
    "MigrationQuarantine",
    "MigrationRun",
    "OrchestrationSession",
    "OrchestrationStep",
    "PermissionRole",
    "Project",
    "Prompt",
    "PromptRole",
    "PromptType",
    "PromptVersion",
    "Scope",
    "SessionPromptRef",
    "TemplateEvent",
    "TemplateLabel",
    "TemplatePermission",
]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-assigns INTEGER PRIMARY KEY (the rowid alias), not BIGINT.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")
NOW = text("CURRENT_TIMESTAMP")


class PromptType(enum.StrEnum):
    PROMPT = "prompt"
    ORCHESTRATION_TEMPLATE = "orchestration_template"


class Scope(enum.StrEnum):
    GLOBAL = "global"
    PROJECT = "project"
    CUSTOM = "custom"


class PromptRole(enum.StrEnum):
    """The three prompts of an orchestration session, in the order they run."""

    SYSTEM = "system"
    PLANNER = "planner"
    SYNTHESIS = "synthesis"

    @property
    def legacy_column(self) -> str:
        return f"{self.value}_prompt"


class PermissionRole(enum.StrEnum):
    VIEWER = "viewer"
    EDITOR = "editor"
    ADMIN = "admin"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


def _id() -> Mapped[int]:
    return mapped_column(BigIntId, Identity(), primary_key=True)


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=NOW)


# --- revision 0001: the legacy schema -------------------------------------------------------


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = _id()
    slug: Mapped[str] = mapped_column(String(100), nullable=False, unique=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    created_at: Mapped[datetime] = _created_at()


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (
        Index("ix_prompts_type_project", "prompt_type", "project_id"),
        Index("ix_prompts_scope_name", "scope", "name"),
        Index(
            "uq_prompts_global_name",
            "name",
            unique=True,
            postgresql_where=text("scope = 'global'"),
            sqlite_where=text("scope = 'global'"),
        ),
        Index(
            "uq_prompts_project_name",
            "project_id",
            "name",
            unique=True,
            postgresql_where=text("scope = 'project'"),
            sqlite_where=text("scope = 'project'"),
        ),
        Index(
            "uq_prompts_custom_name",
            "project_id",
            "owner",
            "name",
            unique=True,
            postgresql_where=text("scope = 'custom'"),
            sqlite_where=text("scope = 'custom'"),
        ),
    )

    id: Mapped[int] = _id()
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id"), nullable=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    category: Mapped[str | None] = mapped_column(String(50), nullable=True)
    is_template: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _created_at()
    # 0002: orchestration templates are prompts of another type, placed in a scope.
    prompt_type: Mapped[str] = mapped_column(
        String(30), nullable=False, server_default=PromptType.PROMPT.value
    )
    scope: Mapped[str | None] = mapped_column(String(20), nullable=True)
    owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    tags: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    declared_variables: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    content_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)

    project: Mapped[Project | None] = relationship()


class PromptVersion(Base):
    __tablename__ = "prompt_versions"
    __table_args__ = (
        UniqueConstraint("prompt_id", "version"),
        Index("ix_prompt_versions_content_hash", "content_hash"),
    )

    id: Mapped[int] = _id()
    prompt_id: Mapped[int] = mapped_column(
        ForeignKey("prompts.id", ondelete="CASCADE"), nullable=False
    )
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    created_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    change_note: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = _created_at()
    content_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)

    prompt: Mapped[Prompt] = relationship()


class OrchestrationSession(Base):
    __tablename__ = "orchestration_sessions"
    __table_args__ = (Index("ix_orchestration_sessions_project_id", "project_id"),)

    id: Mapped[int] = _id()
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False, server_default="pending")
    system_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    planner_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    synthesis_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    variables: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _created_at()

    project: Mapped[Project] = relationship()


class ABTest(Base):
    __tablename__ = "ab_tests"

    id: Mapped[int] = _id()
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), nullable=False)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False, server_default="draft")
    created_at: Mapped[datetime] = _created_at()
    # 0002: a test of an orchestration template names the session role it applies to.
    target_role: Mapped[str | None] = mapped_column(String(20), nullable=True)


class ABTestVariant(Base):
    __tablename__ = "ab_test_variants"

    id: Mapped[int] = _id()
    ab_test_id: Mapped[int] = mapped_column(
        ForeignKey("ab_tests.id", ondelete="CASCADE"), nullable=False
    )
    prompt_version_id: Mapped[int] = mapped_column(ForeignKey("prompt_versions.id"), nullable=False)
    name: Mapped[str] = mapped_column(String(50), nullable=False)
    weight: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")


# --- revision 0002: the expand step ---------------------------------------------------------


class TemplateLabel(Base):
    """A movable name (``production``, ``latest``, ...) pointing at one immutable version."""

    __tablename__ = "template_labels"
    __table_args__ = (Index("ix_template_labels_prompt_version_id", "prompt_version_id"),)

    prompt_id: Mapped[int] = mapped_column(
        ForeignKey("prompts.id", ondelete="CASCADE"), primary_key=True
    )
    label: Mapped[str] = mapped_column(String(50), primary_key=True)
    prompt_version_id: Mapped[int] = mapped_column(ForeignKey("prompt_versions.id"), nullable=False)
    moved_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    moved_at: Mapped[datetime] = _created_at()


class TemplateEvent(Base):
    """The audit trail of a template: versions published, labels moved, rollbacks."""

    __tablename__ = "template_events"
    __table_args__ = (Index("ix_template_events_prompt_id_id", "prompt_id", "id"),)

    id: Mapped[int] = _id()
    prompt_id: Mapped[int] = mapped_column(
        ForeignKey("prompts.id", ondelete="CASCADE"), nullable=False
    )
    action: Mapped[str] = mapped_column(String(30), nullable=False)
    label: Mapped[str | None] = mapped_column(String(50), nullable=True)
    from_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("prompt_versions.id"), nullable=True
    )
    to_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("prompt_versions.id"), nullable=True
    )
    actor: Mapped[str | None] = mapped_column(String(100), nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = _created_at()


class TemplatePermission(Base):
    """A user's role in one project, or globally when ``project_id`` is NULL."""

    __tablename__ = "template_permissions"
    __table_args__ = (
        Index(
            "uq_template_permissions_global_user",
            "user_name",
            unique=True,
            postgresql_where=text("project_id IS NULL"),
            sqlite_where=text("project_id IS NULL"),
        ),
        Index(
            "uq_template_permissions_project_user",
            "project_id",
            "user_name",
            unique=True,
            postgresql_where=text("project_id IS NOT NULL"),
            sqlite_where=text("project_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = _id()
    project_id: Mapped[int | None] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), nullable=True
    )
    user_name: Mapped[str] = mapped_column(String(100), nullable=False)
    role: Mapped[str] = mapped_column(String(20), nullable=False)
    granted_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    granted_at: Mapped[datetime] = _created_at()


class SessionPromptRef(Base):
    """Which template version a session uses for one role, and the variables to render it with."""

    __tablename__ = "session_prompt_refs"
    __table_args__ = (Index("ix_session_prompt_refs_prompt_version_id", "prompt_version_id"),)

    session_id: Mapped[int] = mapped_column(
        ForeignKey("orchestration_sessions.id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[str] = mapped_column(String(20), primary_key=True)
    prompt_version_id: Mapped[int] = mapped_column(ForeignKey("prompt_versions.id"), nullable=False)
    variables: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # sha256 of the legacy text when the reference was made: a later edit of the legacy column
    # shows up as a different hash, so the session is known to be stale.
    legacy_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    source: Mapped[str] = mapped_column(String(20), nullable=False)
    created_at: Mapped[datetime] = _created_at()


class ABAssignment(Base):
    """A session enrolled in an A/B test: its variant and, once known, its outcome."""

    __tablename__ = "ab_assignments"
    __table_args__ = (
        Index("ix_ab_assignments_session_id", "session_id"),
        Index("ix_ab_assignments_variant_id", "variant_id"),
    )

    ab_test_id: Mapped[int] = mapped_column(
        ForeignKey("ab_tests.id", ondelete="CASCADE"), primary_key=True
    )
    session_id: Mapped[int] = mapped_column(
        ForeignKey("orchestration_sessions.id", ondelete="CASCADE"), primary_key=True
    )
    variant_id: Mapped[int] = mapped_column(
        ForeignKey("ab_test_variants.id", ondelete="CASCADE"), nullable=False
    )
    unit_key: Mapped[str] = mapped_column(String(200), nullable=False)
    success: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    metric: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    assigned_at: Mapped[datetime] = _created_at()


class FeatureFlagState(Base):
    """A flag's variant: the global default (``project_id`` NULL) or one project's override."""

    __tablename__ = "feature_flag_states"
    __table_args__ = (
        Index(
            "uq_feature_flag_states_default",
            "flag_key",
            unique=True,
            postgresql_where=text("project_id IS NULL"),
            sqlite_where=text("project_id IS NULL"),
        ),
        Index(
            "uq_feature_flag_states_project",
            "flag_key",
            "project_id",
            unique=True,
            postgresql_where=text("project_id IS NOT NULL"),
            sqlite_where=text("project_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = _id()
    flag_key: Mapped[str] = mapped_column(String(100), nullable=False)
    project_id: Mapped[int | None] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), nullable=True
    )
    variant: Mapped[str] = mapped_column(String(20), nullable=False)
    shadow_sample_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    updated_at: Mapped[datetime] = _created_at()


class FeatureFlagEvent(Base):
    """Every change of a flag: who, when, from which variant to which (NULL: unset)."""

    __tablename__ = "feature_flag_events"
    __table_args__ = (Index("ix_feature_flag_events_flag_key_id", "flag_key", "id"),)

    id: Mapped[int] = _id()
    flag_key: Mapped[str] = mapped_column(String(100), nullable=False)
    project_id: Mapped[int | None] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), nullable=True
    )
    old_variant: Mapped[str | None] = mapped_column(String(20), nullable=True)
    new_variant: Mapped[str | None] = mapped_column(String(20), nullable=True)
    actor: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = _created_at()


class OrchestrationStep(Base):
    """One step of a session's run: the exact input sent to the model and what came back."""

    __tablename__ = "orchestration_steps"
    __table_args__ = (UniqueConstraint("session_id", "position"),)

    id: Mapped[int] = _id()
    session_id: Mapped[int] = mapped_column(
        ForeignKey("orchestration_sessions.id", ondelete="CASCADE"), nullable=False
    )
    position: Mapped[int] = mapped_column(BigInteger, nullable=False)
    role: Mapped[str] = mapped_column(String(20), nullable=False)
    input_text: Mapped[str] = mapped_column(Text, nullable=False)
    output_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    model: Mapped[str | None] = mapped_column(String(100), nullable=True)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = _created_at()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class MigrationRun(Base):
    """One run of an ``orch-migrate`` tool (export, backfill, verify, restore, rehearse)."""

    __tablename__ = "migration_runs"
    __table_args__ = (Index("ix_migration_runs_kind_project_id_id", "kind", "project_id", "id"),)

    id: Mapped[int] = _id()
    kind: Mapped[str] = mapped_column(String(20), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    project_id: Mapped[int | None] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), nullable=True
    )
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Fixed when the run starts, so a run under write load finishes: newer rows are dual-written.
    key_upper_bound: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    started_at: Mapped[datetime] = _created_at()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class MigrationBatch(Base):
    """A checkpoint: one batch of a run, with its key range, counts and checksum."""

    __tablename__ = "migration_batches"
    __table_args__ = (UniqueConstraint("run_id", "key_lo"),)

    id: Mapped[int] = _id()
    run_id: Mapped[int] = mapped_column(
        ForeignKey("migration_runs.id", ondelete="CASCADE"), nullable=False
    )
    key_lo: Mapped[int] = mapped_column(BigInteger, nullable=False)
    key_hi: Mapped[int] = mapped_column(BigInteger, nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    rows_seen: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    counts: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    checksum: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    started_at: Mapped[datetime] = _created_at()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


# --- revision 0003: the backfill quarantine --------------------------------------------------


class MigrationQuarantine(Base):
    """A session role a backfill could not import (its text over the template size limit, or
    not a template that renders back to it), and why: it keeps reading its legacy text."""

    __tablename__ = "migration_quarantine"
    __table_args__ = (
        UniqueConstraint("session_id", "role"),
        Index("ix_migration_quarantine_project_id", "project_id"),
    )

    id: Mapped[int] = _id()
    run_id: Mapped[int | None] = mapped_column(
        ForeignKey("migration_runs.id", ondelete="SET NULL"), nullable=True
    )
    session_id: Mapped[int] = mapped_column(
        ForeignKey("orchestration_sessions.id", ondelete="CASCADE"), nullable=False
    )
    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), nullable=False
    )
    role: Mapped[str] = mapped_column(String(20), nullable=False)
    legacy_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _created_at()
