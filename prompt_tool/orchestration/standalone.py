"""The standalone orchestrator: runs a workflow file, with no session and no recorded steps.

Only where the prompt texts come from differs from a session run. By default every template is
a file ``NAME.j2`` under the workflow's ``templates_dir`` (includes, imports and extends
between them resolve there too); with a template manager (``--db URL``) the same names resolve
in the database, custom -> project -> global for the project and user given. Either way the
text is rendered by the same sandboxed engine, and the steps run through the same loop
(:func:`~prompt_tool.orchestration.steps.run_steps`) as a session's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from prompt_tool.core import TemplateEngine, TemplateNotFound, default_engine, sanitize_variables
from prompt_tool.db.models import PromptRole
from prompt_tool.orchestration.clients import ModelClient, resolve_client
from prompt_tool.orchestration.steps import Clock, PlannedStep, run_steps, utc_now
from prompt_tool.orchestration.types import PromptInfo, RunResult
from prompt_tool.orchestration.workflow import (
    TEMPLATE_SUFFIX,
    Workflow,
    check_template_name,
    load_workflow,
)
from prompt_tool.templates import TemplateManager

__all__ = ["DatabaseTemplates", "DiskTemplates", "TemplateSource", "run_workflow"]


class TemplateSource(Protocol):
    """Where a workflow's template names are rendered from."""

    def render(self, role: PromptRole, name: str, variables: Mapping[str, Any]) -> PromptInfo: ...


class DiskTemplates:
    """Templates as files: ``NAME`` is ``<directory>/NAME.j2``; nothing outside is reachable."""

    def __init__(self, directory: Path, engine: TemplateEngine | None = None) -> None:
        self.directory = directory
        self.engine = engine if engine is not None else default_engine()

    def path_of(self, name: str) -> Path | None:
        if check_template_name(name) is not None:
            return None
        root = self.directory.resolve()
        path = (root / f"{name}{TEMPLATE_SUFFIX}").resolve()
        # A symlink could still point elsewhere; only files inside the folder are templates.
        return path if path.is_relative_to(root) else None

    def load(self, name: str) -> str | None:
        """The source of ``name``, or ``None``: the loader for includes between disk templates."""
        path = self.path_of(name)
        if path is None or not path.is_file():
            return None
        return path.read_text(encoding="utf-8")

    def render(self, role: PromptRole, name: str, variables: Mapping[str, Any]) -> PromptInfo:
        source = self.load(name)
        if source is None:
            raise TemplateNotFound(
                f"no template file {self.directory / (name + TEMPLATE_SUFFIX)}",
                template=name,
                hint="create it, fix the name, or set templates_dir in the workflow",
            )
        text = self.engine.render(source, variables, name=name, loader=self.load)
        return PromptInfo(
            role=role.value,
            text=text,
            source="file",
            template=name,
            location=str(self.directory / (name + TEMPLATE_SUFFIX)),
        )


class DatabaseTemplates:
    """Templates from the database, resolved custom -> project -> global like a session's."""

    def __init__(
        self, manager: TemplateManager, *, project: str | None, user: str | None = None
    ) -> None:
        self.manager = manager
        self.project = project
        self.user = user

    def render(self, role: PromptRole, name: str, variables: Mapping[str, Any]) -> PromptInfo:
        rendered = self.manager.render(name, variables, project=self.project, user=self.user)
        return PromptInfo(
            role=role.value,
            text=rendered.text,
            source=rendered.template.scope,
            template=name,
            version=rendered.template.version,
            version_id=rendered.template.version_id,
        )


def run_workflow(
    workflow: Workflow | str | Path,
    client: ModelClient | str | None = None,
    *,
    manager: TemplateManager | None = None,
    project: str | None = None,
    user: str | None = None,
    variables: Mapping[str, Any] | None = None,
    clock: Clock = utc_now,
) -> RunResult:
    """Run a workflow (a file path or a loaded :class:`Workflow`).

    With ``manager`` the templates come from its database (``project`` overrides the
    workflow's own); without, from the files. ``variables`` override the workflow's. Every
    template is rendered before the first step runs, so a bad template costs no model call.
    """
    flow = workflow if isinstance(workflow, Workflow) else load_workflow(workflow)
    model_client, client_name = resolve_client(client)
    values = sanitize_variables({**flow.variables, **(variables or {})})
    project_slug = project or flow.project
    templates: TemplateSource = (
        DatabaseTemplates(manager, project=project_slug, user=user)
        if manager is not None
        else DiskTemplates(flow.templates_path)
    )
    prompts = tuple(templates.render(step.role, step.template, values) for step in flow.steps)
    plan = [
        PlannedStep(step.role, info.text) for step, info in zip(flow.steps, prompts, strict=True)
    ]
    status, steps = run_steps(plan, model_client, variables=values, clock=clock)
    return RunResult(
        name=flow.name,
        status=status,
        client=client_name,
        prompts=prompts,
        steps=steps,
        # The project whose templates were used: none when they came from files.
        project=project_slug if manager is not None else None,
        workflow=flow.path,
    )
