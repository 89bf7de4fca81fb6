"""`orch-migrate flag`: the per-project `orchestration-templates` flag.

Mounted by the main app with ``app.add_typer(flag_app, name="flag")``. Each command parses its
arguments, calls one function of :mod:`prompt_tool.flags` and prints the result as a table or,
with ``--json``, as the same data in JSON. Bad input (an unknown variant or project) is raised by
the library and becomes a one-line error with exit code 2 in ``_runtime.run``; so does a switch to
``templates`` that the readiness guard (:func:`prompt_tool.migrate.status.readiness_guard`)
refuses, unless ``--force``.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from prompt_tool import flags
from prompt_tool.cli._runtime import DbOption, JsonOption, acting_user, emit, new_app, table
from prompt_tool.db.engine import make_engine
from prompt_tool.db.url import resolve_url
from prompt_tool.errors import InvalidInputError
from prompt_tool.migrate.status import readiness_guard

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
    the check.
    """
    slug = _one_target(project, default)
    engine = make_engine(resolve_url(db))
    try:
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
    finally:
        engine.dispose()
    emit(change, as_json=as_json, render=_render_change)


@flag_app.command("unset")
def flag_unset(
    project: ProjectOption = None,
    default: DefaultOption = False,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove a project's override (it follows the default) or the default (built-in legacy)."""
    slug = _one_target(project, default)
    if slug is None:
        change = flags.unset_default(resolve_url(db), actor=acting_user(as_user))
    else:
        change = flags.unset_variant(resolve_url(db), slug, actor=acting_user(as_user))
    emit(change, as_json=as_json, render=_render_change)


def _render_status(status: flags.FlagStatus) -> Any:
    rows: list[tuple[str, Any]] = [
        ("project", f"{status.project_slug} (id {status.project_id})"),
        ("variant", status.variant.value),
        ("from", status.source.value + (f" ({status.detail})" if status.detail else "")),
        ("provider", status.provider),
    ]
    if status.variant is flags.Variant.SHADOW:
        rows.append(("sample rate", _rate(status.sample_rate)))
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
    """A project's effective variant and where it comes from (override, default, kill switch)."""
    emit(flags.get_variant(resolve_url(db), project), as_json=as_json, render=_render_status)


def _render_listing(listing: flags.FlagListing) -> Any:
    default = (
        listing.default.variant if listing.default else f"{listing.builtin_default} (built in)"
    )
    title = f"Flag {listing.flag_key}: default {default}"
    if listing.kill_switch:
        title += " - KILL SWITCH ON: every project reads legacy"
    rows = [
        (
            s.project_slug,
            s.variant,
            _rate(s.shadow_sample_rate),
            s.updated_by,
            f"{s.updated_at:%Y-%m-%d %H:%M:%S}" if s.updated_at else "",
        )
        for s in listing.overrides
    ]
    rows += [(slug, f"({default})", "", "", "") for slug in listing.without_override]
    return table(title, ["project", "variant", "sample rate", "by", "at"], rows)


@flag_app.command("list")
def flag_list(db: DbOption = None, as_json: JsonOption = False) -> None:
    """The default, every project override, and the projects that follow the default."""
    emit(flags.list_flags(resolve_url(db)), as_json=as_json, render=_render_listing)


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
    """Every change, oldest first: who, when, from which variant to which."""
    emit(
        flags.flag_history(resolve_url(db), project, limit=limit),
        as_json=as_json,
        render=_render_history,
    )
