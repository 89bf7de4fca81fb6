"""`orch-migrate flag`: the per-project `orchestration-templates` flag.

Mounted by the main app with ``app.add_typer(flag_app, name="flag")``. Each command parses its
arguments, calls one function of :mod:`prompt_tool.flags` and prints the result as a table or,
with ``--json``, as the same data in JSON. Bad input (an unknown variant or project) is raised by
the library and becomes a one-line error with exit code 2 in ``_runtime.run``; so does a switch to
``templates`` that the readiness guard (:func:`prompt_tool.migrate.status.readiness_guard`)
refuses, unless ``--force``, and any ``set`` or ``unset`` while the flag is read from somewhere
other than the database (``PROMPT_TOOL_FLAG_PROVIDER=flagd-file``): the message names the file.
``get`` and ``list`` show what readers get, evaluated through the provider they use.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Group
from rich.text import Text

from prompt_tool import flags
from prompt_tool.cli._runtime import (
    DbOption,
    JsonOption,
    acting_user,
    emit,
    new_app,
    opened_engine,
    stderr,
    table,
)
from prompt_tool.db.url import resolve_url
from prompt_tool.errors import InvalidInputError
from prompt_tool.flags.config import require_flagd_file
from prompt_tool.migrate import readiness_guard

__all__ = ["flag_app"]

flag_app = new_app(
    "The per-project flag choosing how session prompts are read: legacy, shadow or templates."
)

VariantArgument = Annotated[
    str, typer.Argument(metavar="legacy|shadow|templates", help="The variant to use.")
]
ProjectOption = Annotated[
    str | None, typer.Option("--project", "-p", metavar="SLUG", help="The project (slug).")
]
DefaultOption = Annotated[
    bool, typer.Option("--default", help="The global default instead of one project.")
]
SampleRateOption = Annotated[
    float | None,
    typer.Option(
        "--sample-rate",
        metavar="R",
        help="shadow only: share of reads compared, 0..1 (default: kept, else 1).",
    ),
]
AsOption = Annotated[
    str | None,
    typer.Option("--as", metavar="USER", help="Record the change as USER (default: you)."),
]


def _one_target(project: str | None, default: bool) -> str | None:
    if (project is not None) != default:
        return project
    raise InvalidInputError("give exactly one of --project SLUG or --default")


def _rate(rate: float | None) -> str:
    return "" if rate is None else f"{rate:g}"


def _render_change(change: flags.FlagChange) -> str:
    target = f"project {change.project_slug}" if change.project_slug else "the default"
    if not change.changed:
        return f"{target} already is {change.new_variant or 'unset'}: nothing changed"
    rate = (
        f" (sample rate {_rate(change.shadow_sample_rate)})"
        if change.new_variant == flags.Variant.SHADOW and change.shadow_sample_rate is not None
        else ""
    )
    when = f" at {change.at:%Y-%m-%d %H:%M:%S %Z}" if change.at else ""
    return (
        f"{target}: {change.old_variant or 'unset'} -> {change.new_variant or 'unset'}{rate}, "
        f"by {change.actor}{when}"
    )


ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Switch to templates even when `orch-migrate status` says the project is not ready.",
    ),
]


@flag_app.command("set")
def flag_set(
    variant: VariantArgument,
    project: ProjectOption = None,
    default: DefaultOption = False,
    sample_rate: SampleRateOption = None,
    as_user: AsOption = None,
    force: ForceOption = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Set a project's variant (--project SLUG) or the global default (--default).

    `templates` is refused (exit 2, saying what to run) unless the project is ready: fully
    backfilled and verified since (for the default: every project following it); --force skips
    the check. Refused too (exit 2, nothing written) while the flag is read from a flagd file
    (PROMPT_TOOL_FLAG_PROVIDER=flagd-file): change it in that file.
    """
    slug = _one_target(project, default)
    with opened_engine(db) as engine:
        guard = None if force else readiness_guard(engine)
        if slug is None:
            change = flags.set_default(
                engine, variant, actor=acting_user(as_user), sample_rate=sample_rate, guard=guard
            )
        else:
            change = flags.set_variant(
                engine,
                slug,
                variant,
                actor=acting_user(as_user),
                sample_rate=sample_rate,
                guard=guard,
            )
    emit(change, as_json=as_json, render=_render_change)


@flag_app.command("unset")
def flag_unset(
    project: ProjectOption = None,
    default: DefaultOption = False,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove a project's override (it follows the default) or the default (built-in legacy).

    Refused (exit 2, nothing written) while the flag is read from a flagd file.
    """
    slug = _one_target(project, default)
    if slug is None:
        change = flags.unset_default(resolve_url(db), actor=acting_user(as_user))
    else:
        change = flags.unset_variant(resolve_url(db), slug, actor=acting_user(as_user))
    emit(change, as_json=as_json, render=_render_change)


def _in_database(location: flags.FlagLocation) -> bool:
    return location.kind is flags.ProviderKind.DATABASE and location.database is None


def _describe_source(source: flags.DecisionSource, detail: str | None) -> str:
    return source.value + (f" ({detail})" if detail else "")


def _render_status(status: flags.FlagStatus) -> Any:
    rows: list[tuple[str, Any]] = [
        ("project", f"{status.project_slug} (id {status.project_id})"),
        ("variant", status.variant.value),
        ("from", _describe_source(status.source, status.detail)),
        ("read from", status.read_from.description),
        ("provider", status.provider),
    ]
    if status.variant is flags.Variant.SHADOW:
        rows.append(("sample rate", _rate(status.sample_rate)))
    if _in_database(status.read_from):
        if status.override is not None:
            rows.append(("override", _describe_state(status.override)))
        rows.append(
            (
                "default",
                _describe_state(status.default)
                if status.default
                else f"{flags.BUILTIN_DEFAULT.value} (built in)",
            )
        )
    else:
        # Rows `flag set` wrote before the provider changed: shown, but never as the answer.
        if status.override is not None:
            rows.append(("database override", _describe_state(status.override) + " (not read)"))
        if status.default is not None:
            rows.append(("database default", _describe_state(status.default) + " (not read)"))
    return table(f"Flag {status.flag_key}", ["", "value"], rows)


def _describe_state(state: flags.FlagState) -> str:
    rate = (
        f" rate {_rate(state.shadow_sample_rate)}" if state.shadow_sample_rate is not None else ""
    )
    when = f" at {state.updated_at:%Y-%m-%d %H:%M:%S}" if state.updated_at else ""
    return f"{state.variant}{rate}, by {state.updated_by or '?'}{when}"


@flag_app.command("get")
def flag_get(
    project: Annotated[str, typer.Option("--project", "-p", metavar="SLUG", help="The project.")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """A project's effective variant and where it comes from (override, default, kill switch,
    or the flagd file when PROMPT_TOOL_FLAG_PROVIDER=flagd-file)."""
    # One-shot: a flagd file that is not there must fail, not answer "legacy" and exit 0.
    require_flagd_file()
    emit(flags.get_variant(resolve_url(db), project), as_json=as_json, render=_render_status)


def _render_listing(listing: flags.VariantListing) -> Any:
    in_database = _in_database(listing.read_from)
    stored_default = (
        listing.default.variant if listing.default else f"{listing.builtin_default} (built in)"
    )
    title = f"Flag {listing.flag_key}: "
    title += (
        f"default {stored_default}" if in_database else f"read from {listing.read_from.description}"
    )
    if listing.kill_switch:
        title += " - KILL SWITCH ON: every project reads legacy"
    columns = ["project", "variant", "from", "sample rate"]
    rows: list[list[str]] = [
        [
            project.project_slug,
            project.variant.value,
            _describe_source(project.source, project.detail),
            _rate(project.sample_rate) if project.variant is flags.Variant.SHADOW else "",
        ]
        for project in listing.projects
    ]
    if in_database:
        # Who set an override, and when: only meaningful where the override is what is read.
        columns += ["by", "at"]
        overrides = {s.project_slug: s for s in listing.overrides}
        for row in rows:
            override = overrides.get(row[0])
            row += [
                (override.updated_by or "") if override else "",
                f"{override.updated_at:%Y-%m-%d %H:%M:%S}"
                if override and override.updated_at
                else "",
            ]
    result = table(title, columns, rows)
    if in_database or (listing.default is None and not listing.overrides):
        return result
    stored = [f"default {listing.default.variant}"] if listing.default else []
    stored += [f"{s.project_slug} {s.variant}" for s in listing.overrides]
    return Group(
        result,
        Text(
            f"Not read: the database's flag rows ({', '.join(stored)}); readers read "
            f"{listing.read_from.description}."
        ),
    )


@flag_app.command("list")
def flag_list(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Every project's effective variant as readers get it, and where it comes from (override,
    default, or the flagd file when PROMPT_TOOL_FLAG_PROVIDER=flagd-file)."""
    require_flagd_file()
    emit(flags.list_variants(resolve_url(db)), as_json=as_json, render=_render_listing)


def _render_history(events: list[flags.FlagEvent]) -> Any:
    return table(
        "Flag history",
        ["when", "who", "project", "from", "to"],
        [
            (
                f"{e.at:%Y-%m-%d %H:%M:%S}" if e.at else "",
                e.actor,
                e.project_slug or "(default)",
                e.old_variant or "unset",
                e.new_variant or "unset",
            )
            for e in events
        ],
    )


@flag_app.command("history")
def flag_history(
    project: ProjectOption = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Only the most recent N changes.")
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Every change, oldest first: who, when, from which variant to which.

    The history of the database's rows; while the flag is read from a flagd file, a note on
    stderr says so (those rows are not what readers get).
    """
    location = flags.flag_location()
    if not _in_database(location):
        stderr.print(
            f"note: the flag is read from {location.description}; this is the history of the "
            "database's rows, which readers do not read",
            highlight=False,
            markup=False,
        )
    emit(
        flags.flag_history(resolve_url(db), project, limit=limit),
        as_json=as_json,
        render=_render_history,
    )
