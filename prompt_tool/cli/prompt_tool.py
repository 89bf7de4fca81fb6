"""`prompt-tool`: the developer's tool for projects, templates, roles and sessions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer

from prompt_tool import __version__
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
    parse_variables,
    run,
    stderr,
    table,
    write_out,
)
from prompt_tool.cli.ab_commands import ab_app
from prompt_tool.cli.session_commands import orchestrate_app, sessions_app
from prompt_tool.core.variables import read_json_file
from prompt_tool.db.models import Scope
from prompt_tool.db.url import resolve_url
from prompt_tool.errors import InvalidInputError
from prompt_tool.settings import get_settings
from prompt_tool.templates import (
    HistoryEntry,
    LabelMove,
    PublishResult,
    TemplateAddress,
    TemplateDetail,
    TemplateManager,
    TemplateSummary,
)

app = new_app(
    "Prompts, orchestration templates and sessions, kept in a database.",
    program="prompt-tool",
    completion=True,
)
projects_app = new_app("Projects: every project template and session belongs to one.")
templates_app = new_app("Orchestration templates: versioned, sandboxed, resolved by scope.")
roles_app = new_app("Template permissions: viewer, editor, admin per project; global admins.")
app.add_typer(projects_app, name="projects")
app.add_typer(templates_app, name="templates")
app.add_typer(roles_app, name="roles")
app.add_typer(sessions_app, name="sessions")
app.add_typer(orchestrate_app, name="orchestrate")
app.add_typer(ab_app, name="ab")

ProjectOption = Annotated[
    str | None, typer.Option("--project", "-p", metavar="SLUG", help="The project (slug).")
]
ScopeOption = Annotated[
    Scope | None,
    typer.Option(
        "--scope",
        case_sensitive=False,
        help="global, project or custom (default: project with --project, else global).",
    ),
]
NameArgument = Annotated[str, typer.Argument(help="The template's name.")]
FileOption = Annotated[
    str | None,
    typer.Option("--file", "-f", metavar="PATH", help="Template text from PATH ('-': stdin)."),
]
LabelOption = Annotated[str, typer.Option("--label", help="Resolve this label.")]
VersionOption = Annotated[
    int | None, typer.Option("--version", min=1, help="A version number instead of a label.")
]


def _manager(db: str | None) -> TemplateManager:
    return TemplateManager.from_url(resolve_url(db))


def _address(name: str, scope: Scope | None, project: str | None, actor: str) -> TemplateAddress:
    chosen = scope or (Scope.PROJECT if project else Scope.GLOBAL)
    owner = actor if chosen is Scope.CUSTOM else None
    return TemplateAddress(name, chosen, project if chosen is not Scope.GLOBAL else None, owner)


def _read_text(path: str | None) -> str:
    if path == "-" or (path is None and not sys.stdin.isatty()):
        # Decoded strictly: bytes that are not UTF-8 would otherwise arrive as lone surrogates.
        stream: BinaryIO | None = getattr(sys.stdin, "buffer", None)
        if stream is None:
            return sys.stdin.read()
        try:
            return stream.read().decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidInputError(
                f"the text on stdin is not UTF-8 (byte {error.start}); save it as UTF-8"
            ) from None
    if path is None:
        raise InvalidInputError("give the template text with --file PATH, or pipe it on stdin")
    try:
        # Bytes, then decoded: text mode would turn CRLF and lone CRs into LF, and the stored
        # template must keep every byte of the file (as it does from stdin).
        return Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InvalidInputError(f"no file at {path}") from None
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path} is not UTF-8 text") from None


def _declarations(specs: list[str] | None, path: Path | None) -> list[dict[str, Any]]:
    declared: list[dict[str, Any]] = []
    if path is not None:
        loaded = read_json_file(
            path,
            max_bytes=get_settings().vars_file_max_bytes,
            what="a file of variable declarations",
        )
        if not isinstance(loaded, list):
            raise InvalidInputError(f"{path} must be a JSON list of variable declarations")
        declared.extend(loaded)
    for spec in specs or []:
        name, _, rest = spec.partition(":")
        kind, _, flag = rest.partition(":")
        declared.append({"name": name, "type": kind or "string", "required": flag != "optional"})
    return declared


# --- version ---------------------------------------------------------------------------------


@app.command("version")
def version(as_json: JsonOption = False) -> None:
    """Show the installed version."""
    emit({"version": __version__}, as_json=as_json, render=lambda data: data["version"])


# --- projects --------------------------------------------------------------------------------


@projects_app.command("create")
def projects_create(
    slug: Annotated[str, typer.Argument(help="Short unique name, e.g. acme.")],
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a project."""
    emit(
        _manager(db).create_project(slug, name),
        as_json=as_json,
        render=lambda p: f"created project {p.slug} (id {p.id})",
    )


@projects_app.command("list")
def projects_list(db: DbOption = None, as_json: JsonOption = False) -> None:
    """List the projects."""
    emit(
        _manager(db).projects(),
        as_json=as_json,
        render=lambda items: table(
            "Projects", ["id", "slug", "name"], [(p.id, p.slug, p.name) for p in items]
        ),
    )


# --- templates -------------------------------------------------------------------------------


def _render_summaries(items: list[TemplateSummary]) -> Any:
    return table(
        "Templates",
        ["name", "scope", "project", "owner", "category", "tags", "latest", "labels"],
        [
            (
                t.name,
                t.scope,
                t.project,
                t.owner,
                t.category,
                ",".join(t.tags),
                t.latest_version,
                " ".join(f"{k}=v{v}" for k, v in sorted(t.labels.items())),
            )
            for t in items
        ],
    )


@templates_app.command("list")
def templates_list(
    project: ProjectOption = None,
    scope: ScopeOption = None,
    category: Annotated[str | None, typer.Option(help="Only this category.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only templates with this tag.")] = None,
    search: Annotated[str | None, typer.Option(help="Text in the name or description.")] = None,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the templates you may see, with their labels and latest version."""
    manager, actor = _manager(db), acting_user(as_user)
    filters: dict[str, Any] = {
        "project": project,
        "scope": scope,
        "category": category,
        "tag": tag,
        "search": search,
    }
    visible = manager.list_templates(actor=actor, **filters)
    emit(visible, as_json=as_json, render=_render_summaries)
    _hint_when_roleless(manager, actor, len(visible), filters)


def _hint_when_roleless(
    manager: TemplateManager, actor: str, shown: int, filters: dict[str, Any]
) -> None:
    """One line on stderr when ``actor`` has no role at all and templates are hidden from them:
    an empty table alone reads as "there are none"."""
    if any(grant.user == actor for grant in manager.roles()):
        return
    hidden = len(manager.list_templates(**filters)) - shown
    if hidden > 0:
        stderr.print(
            literal(
                f"note: {actor} has no template role, so {hidden} "
                f"{'template is' if hidden == 1 else 'templates are'} hidden; an admin can grant "
                f"one: prompt-tool roles grant {actor} viewer "
                f"--project {filters['project'] or 'SLUG'}"
            )
        )


def _render_detail(detail: TemplateDetail) -> str:
    s = detail.summary
    labels = " ".join(f"{k}=v{v}" for k, v in sorted(s.labels.items()))
    header = (
        f"{s.name} ({s.scope}{' ' + s.project if s.project else ''}"
        f"{' owner ' + s.owner if s.owner else ''}) version {detail.version.version} "
        f"by {detail.version.created_by} [{labels}]"
    )
    return f"{header}\n{'-' * len(header)}\n{detail.source}"


@templates_app.command("show")
def templates_show(
    name: NameArgument,
    project: ProjectOption = None,
    scope: ScopeOption = None,
    label: LabelOption = "production",
    version: VersionOption = None,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a template's metadata and the text of one version."""
    actor = acting_user(as_user)
    emit(
        _manager(db).show(
            _address(name, scope, project, actor), actor=actor, version=version, label=label
        ),
        as_json=as_json,
        render=_render_detail,
    )


@templates_app.command("create")
def templates_create(
    name: NameArgument,
    file: FileOption = None,
    project: ProjectOption = None,
    scope: ScopeOption = None,
    category: Annotated[str | None, typer.Option(help="A category for discovery.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="A tag (repeatable).")] = None,
    description: Annotated[str | None, typer.Option(help="What the template is for.")] = None,
    variable: Annotated[
        list[str] | None,
        typer.Option(help="Declare a variable: NAME[:TYPE[:optional]] (repeatable)."),
    ] = None,
    variables_file: Annotated[
        Path | None, typer.Option(help="Variable declarations from a JSON list.")
    ] = None,
    note: Annotated[str | None, typer.Option(help="A change note for version 1.")] = None,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a template; version 1 gets the labels latest and production."""
    actor = acting_user(as_user)
    result = _manager(db).create(
        _address(name, scope, project, actor),
        _read_text(file),
        actor=actor,
        category=category,
        tags=tag or [],
        description=description,
        variables=_declarations(variable, variables_file),
        note=note,
    )
    emit(result, as_json=as_json, render=PublishResult.describe)


@templates_app.command("update")
def templates_update(
    name: NameArgument,
    file: FileOption = None,
    project: ProjectOption = None,
    scope: ScopeOption = None,
    note: Annotated[str | None, typer.Option(help="What changed and why.")] = None,
    promote: Annotated[bool, typer.Option(help="Also point production at it.")] = False,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Store a new version (labelled latest); identical text stores nothing."""
    actor = acting_user(as_user)
    result = _manager(db).update(
        _address(name, scope, project, actor),
        _read_text(file),
        actor=actor,
        note=note,
        promote=promote,
    )
    emit(result, as_json=as_json, render=PublishResult.describe)


@templates_app.command("validate")
def templates_validate(
    name: NameArgument,
    file: FileOption = None,
    project: ProjectOption = None,
    scope: ScopeOption = None,
    variable: Annotated[
        list[str] | None, typer.Option(help="Declare a variable: NAME[:TYPE[:optional]].")
    ] = None,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a template text as if stored under NAME (exit 1 if it is not valid)."""
    actor = acting_user(as_user)
    info = _manager(db).validate(
        _address(name, scope, project, actor),
        _read_text(file),
        _declarations(variable, None) or None,
    )
    emit(info, as_json=as_json, render=lambda _: f"{name}: valid")


@templates_app.command("render")
def templates_render(
    name: NameArgument,
    project: ProjectOption = None,
    var: VarOption = None,
    vars_file: VarsFileOption = None,
    label: LabelOption = "production",
    version: VersionOption = None,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Resolve NAME (custom, then project, then global) and render it with the variables."""
    rendered = _manager(db).render(
        name,
        parse_variables(var, vars_file),
        project=project,
        user=acting_user(as_user),
        label=label,
        version=version,
    )
    if as_json:
        emit(rendered, as_json=True, render=str)
    else:
        write_out(rendered.text)


def _render_history(entries: list[HistoryEntry]) -> Any:
    def version(number: int | None) -> str:
        return f"v{number}" if number is not None else ""

    return table(
        "History",
        ["when", "who", "what", "label", "from", "to", "note"],
        [
            (
                e.at,
                e.actor,
                e.action,
                e.label,
                version(e.from_version),
                version(e.to_version),
                e.note,
            )
            for e in entries
        ],
    )


@templates_app.command("history")
def templates_history(
    name: NameArgument,
    project: ProjectOption = None,
    scope: ScopeOption = None,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """The audit trail: versions published, labels moved, rollbacks, who and when."""
    actor = acting_user(as_user)
    emit(
        _manager(db).history(_address(name, scope, project, actor), actor=actor),
        as_json=as_json,
        render=_render_history,
    )


@templates_app.command("diff")
def templates_diff(
    name: NameArgument,
    from_version: Annotated[int, typer.Argument(min=1, help="The older version.")],
    to_version: Annotated[int, typer.Argument(min=1, help="The newer version.")],
    project: ProjectOption = None,
    scope: ScopeOption = None,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """A unified diff between two versions."""
    actor = acting_user(as_user)
    diff = _manager(db).diff(
        _address(name, scope, project, actor), from_version, to_version, actor=actor
    )
    emit({"diff": diff}, as_json=as_json, render=lambda data: data["diff"] or "(no difference)")


@templates_app.command("label")
def templates_label(
    name: NameArgument,
    label: Annotated[str, typer.Argument(help="The label to move, e.g. production.")],
    version: Annotated[int, typer.Argument(min=1, help="The version it should point at.")],
    project: ProjectOption = None,
    scope: ScopeOption = None,
    note: Annotated[str | None, typer.Option(help="Why.")] = None,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Point a label at a version (recorded in the history)."""
    actor = acting_user(as_user)
    emit(
        _manager(db).move_label(
            _address(name, scope, project, actor), label, version, actor=actor, note=note
        ),
        as_json=as_json,
        render=LabelMove.describe,
    )


@templates_app.command("rollback")
def templates_rollback(
    name: NameArgument,
    project: ProjectOption = None,
    scope: ScopeOption = None,
    label: LabelOption = "production",
    to_version: Annotated[
        int | None, typer.Option(min=1, help="Roll back to this version (default: the previous).")
    ] = None,
    note: Annotated[str | None, typer.Option(help="Why.")] = None,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Move a label back to the version it pointed at before (recorded in the history)."""
    actor = acting_user(as_user)
    emit(
        _manager(db).rollback(
            _address(name, scope, project, actor),
            actor=actor,
            label=label,
            to_version=to_version,
            note=note,
        ),
        as_json=as_json,
        render=LabelMove.describe,
    )


# --- roles -----------------------------------------------------------------------------------

GlobalOption = Annotated[bool, typer.Option("--global", help="A global role (no project).")]


def _role_scope(project: str | None, is_global: bool) -> str | None:
    if is_global == bool(project):
        raise InvalidInputError("give exactly one of --project SLUG or --global")
    return project


@roles_app.command("grant")
def roles_grant(
    user: Annotated[str, typer.Argument(help="Who gets the role.")],
    role: Annotated[str, typer.Argument(help="viewer, editor or admin.")],
    project: ProjectOption = None,
    is_global: GlobalOption = False,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Give USER a role in a project, or globally (the first global admin may grant itself)."""
    grant = _manager(db).grant(acting_user(as_user), user, role, _role_scope(project, is_global))
    emit(
        grant,
        as_json=as_json,
        render=lambda g: f"{g.user} is now {g.role} in {g.project or 'the global scope'}",
    )


@roles_app.command("revoke")
def roles_revoke(
    user: Annotated[str, typer.Argument(help="Whose role to remove.")],
    project: ProjectOption = None,
    is_global: GlobalOption = False,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove USER's role in a project, or their global role."""
    scope = _role_scope(project, is_global)
    _manager(db).revoke(acting_user(as_user), user, scope)
    emit(
        {"user": user, "project": scope, "revoked": True},
        as_json=as_json,
        render=lambda _: f"{user} has no role in {scope or 'the global scope'} any more",
    )


@roles_app.command("list")
def roles_list(
    project: ProjectOption = None, db: DbOption = None, as_json: JsonOption = False
) -> None:
    """List the roles (of one project with --project)."""
    emit(
        _manager(db).roles(project),
        as_json=as_json,
        render=lambda grants: table(
            "Roles",
            ["user", "role", "project", "granted by", "at"],
            [(g.user, g.role, g.project or "(global)", g.granted_by, g.granted_at) for g in grants],
        ),
    )


def main() -> None:
    run(app)
