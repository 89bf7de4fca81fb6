"""`prompt-tool sessions ...` and `prompt-tool orchestrate ...`: the two orchestrators.

Mounted by the main app::

    app.add_typer(sessions_app, name="sessions")
    app.add_typer(orchestrate_app, name="orchestrate")

Each command parses its arguments, calls one function of :mod:`prompt_tool.orchestration` and
prints the result as text or, with ``--json``, as the same data in JSON. A run whose step
failed prints its steps first, then exits 1 with the failure on stderr.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import RenderableType
from rich.text import Text

from prompt_tool.cli._runtime import (
    AsOption,
    DbOption,
    JsonOption,
    VarOption,
    VarsFileOption,
    acting_user,
    emit,
    literal,
    new_app,
    opened_engine,
    parse_variables,
    table,
)
from prompt_tool.compat import CreatedSession
from prompt_tool.db.url import resolve_url
from prompt_tool.orchestration import (
    DEFAULT_CLIENT,
    DEFAULT_LIST_LIMIT,
    Orchestrator,
    PromptInfo,
    RunResult,
    SessionDetail,
    SessionSummary,
    StepRecord,
    run_workflow,
)
from prompt_tool.templates import TemplateManager

__all__ = ["orchestrate_app", "sessions_app"]

sessions_app = new_app("Orchestration sessions: create, inspect and run them (the integrated one).")
orchestrate_app = new_app("Run a workflow file: templates on disk, or from the database with --db.")

ProjectOption = Annotated[
    str | None, typer.Option("--project", "-p", metavar="SLUG", help="The project (slug).")
]
ClientOption = Annotated[
    str,
    typer.Option(
        "--client",
        metavar="NAME",
        help="The model client: a registered name or package.module:attribute.",
    ),
]
TemplateOption = Annotated[str | None, typer.Option(metavar="NAME", help="Template name.")]
SessionArgument = Annotated[int, typer.Argument(metavar="ID", help="The session's id.")]
TemplatesDbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        metavar="URL",
        help="Resolve the templates in this database (custom, project, global), not on disk.",
    ),
]


@contextmanager
def _orchestrator(db: str | None) -> Iterator[Orchestrator]:
    with Orchestrator.from_url(resolve_url(db)) as orchestrator:
        yield orchestrator


# --- rendering -------------------------------------------------------------------------------


def _indented(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines() or [""])


def _prompt_origin(prompt: PromptInfo) -> str:
    parts = [prompt.source]
    if prompt.template is not None:
        version = f" v{prompt.version}" if prompt.version is not None else ""
        parts.append(f"template {prompt.template}{version}")
    if prompt.location is not None:
        parts.append(prompt.location)
    return ", ".join(parts)


def _render_steps(steps: tuple[StepRecord, ...], prompts: tuple[PromptInfo, ...]) -> Text:
    origins = {prompt.role: _prompt_origin(prompt) for prompt in prompts}
    # Stored and model text through literal(): shown as it is, whatever brackets it holds.
    text = Text()
    if not steps:
        text.append("no steps recorded\n")
    for step in steps:
        model = f", model {step.model}" if step.model else ""
        text.append_text(
            literal(f"[{step.position}] {step.role}: {step.status}{model}", style="bold")
        )
        origin = origins.get(step.role)
        text.append_text(literal(f" ({origin})\n" if origin else "\n"))
        if step.input_text:
            text.append_text(literal(f"  input:\n{_indented(step.input_text)}\n"))
        if step.output_text is not None:
            text.append_text(literal(f"  output:\n{_indented(step.output_text)}\n"))
        if step.error:
            text.append_text(literal(f"  error: {step.error}\n", style="red"))
    return text


def _render_run(result: RunResult) -> Text:
    if result.session_id is not None:
        what = f"session {result.session_id} {result.name!r} (project {result.project})"
    else:
        where = f", templates from project {result.project}" if result.project else ""
        what = f"workflow {result.name!r} ({result.workflow}{where})"
    text = literal(f"{what}: {result.status}, client {result.client}\n", style="bold")
    text.append_text(_render_steps(result.steps, result.prompts))
    text.rstrip()
    return text


def _render_created(created: CreatedSession) -> str:
    versions = ", ".join(f"{role} v{number}" for role, number in created.versions.items())
    enrolled = "".join(
        f"; {role} in A/B test {a.test_id} {a.test_name!r} as variant {a.variant}"
        for role, a in created.assignments.items()
    )
    return f"created session {created.session_id} in {created.project} ({versions}){enrolled}"


def _render_detail(detail: SessionDetail) -> Text:
    text = literal(
        f"session {detail.session_id} {detail.name!r} in {detail.project}: {detail.status}\n",
        style="bold",
    )
    text.append_text(
        literal(
            f"flag {detail.variant}; created {detail.created_at:%Y-%m-%d %H:%M:%S}, "
            f"updated {detail.updated_at:%Y-%m-%d %H:%M:%S}\n"
            f"variables: {json.dumps(detail.variables, ensure_ascii=False, sort_keys=True)}\n"
        )
    )
    text.append("\nprompts\n", style="bold")
    for prompt in detail.prompts:
        text.append_text(literal(f"{prompt.role} ({_prompt_origin(prompt)})\n"))
        text.append_text(
            literal(f"{_indented(prompt.text)}\n" if prompt.text is not None else "    (none)\n")
        )
    text.append("\nsteps\n", style="bold")
    text.append_text(_render_steps(detail.steps, ()))
    text.rstrip()
    return text


def _render_summaries(items: list[SessionSummary]) -> RenderableType:
    return table(
        "Sessions",
        ["id", "name", "project", "status", "steps", "created", "updated"],
        [
            (
                s.session_id,
                s.name,
                s.project,
                s.status,
                s.steps,
                f"{s.created_at:%Y-%m-%d %H:%M:%S}",
                f"{s.updated_at:%Y-%m-%d %H:%M:%S}",
            )
            for s in items
        ],
    )


# --- sessions --------------------------------------------------------------------------------


@sessions_app.command("create")
def sessions_create(
    project: Annotated[
        str, typer.Option("--project", "-p", metavar="SLUG", help="The project (slug).")
    ],
    name: Annotated[str, typer.Option("--name", help="The session's name.")],
    system: TemplateOption = None,
    planner: TemplateOption = None,
    synthesis: TemplateOption = None,
    var: VarOption = None,
    vars_file: VarsFileOption = None,
    unit_key: Annotated[
        str | None,
        typer.Option(
            "--unit-key",
            metavar="KEY",
            help="A/B tests: the unit (a user id, say) whose variant the session gets "
            "(default: the session).",
        ),
    ] = None,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a session from template names (resolved custom, project, global; dual-written;
    enrolled in running A/B tests unless the project's flag is legacy)."""
    with _orchestrator(db) as orchestrator:
        created = orchestrator.create_session(
            project,
            {"system": system, "planner": planner, "synthesis": synthesis},
            parse_variables(var, vars_file),
            name=name,
            user=acting_user(as_user),
            unit_key=unit_key,
        )
    emit(created, as_json=as_json, render=_render_created)


@sessions_app.command("show")
def sessions_show(
    session_id: SessionArgument, db: DbOption = None, as_json: JsonOption = False
) -> None:
    """Show a session: its prompts as the read shim serves them, and its recorded steps."""
    with _orchestrator(db) as orchestrator:
        detail = orchestrator.show(session_id)
    emit(detail, as_json=as_json, render=_render_detail)


@sessions_app.command("list")
def sessions_list(
    project: ProjectOption = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = (
        DEFAULT_LIST_LIMIT
    ),
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """List sessions (of one project with --project), newest first."""
    with _orchestrator(db) as orchestrator:
        items = orchestrator.list_sessions(project, limit=limit)
    emit(items, as_json=as_json, render=_render_summaries)


@sessions_app.command("run")
def sessions_run(
    session_id: SessionArgument,
    client: ClientOption = DEFAULT_CLIENT,
    rerun: Annotated[
        bool, typer.Option("--rerun", help="Run a session that already ran; replaces its steps.")
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run a session's steps through a model client (default: echo, offline) and record them."""
    with _orchestrator(db) as orchestrator:
        result = orchestrator.run(session_id, client, rerun=rerun)
    emit(result, as_json=as_json, render=_render_run)
    result.raise_for_status()


# --- orchestrate -----------------------------------------------------------------------------


@contextmanager
def _templates_from(db: str | None) -> Iterator[TemplateManager | None]:
    # Only an explicit --db switches to the database: the default URL always exists, so
    # honouring it would make "no database" impossible to ask for.
    if db is None:
        yield None
        return
    with opened_engine(db) as engine:
        yield TemplateManager(engine)


@orchestrate_app.command("run")
def orchestrate_run(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The workflow (YAML or JSON).")],
    client: ClientOption = DEFAULT_CLIENT,
    project: ProjectOption = None,
    var: VarOption = None,
    vars_file: VarsFileOption = None,
    as_user: AsOption = None,
    db: TemplatesDbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run a workflow file; templates are FILE's NAME.j2 files, or come from --db URL."""
    with _templates_from(db) as manager:
        result = run_workflow(
            file,
            client,
            manager=manager,
            project=project,
            user=acting_user(as_user) if manager is not None else None,
            variables=parse_variables(var, vars_file),
        )
    emit(result, as_json=as_json, render=_render_run)
    result.raise_for_status()
