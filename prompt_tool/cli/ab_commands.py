"""`prompt-tool ab ...`: A/B tests of orchestration template versions.

Mounted by the main app::

    app.add_typer(ab_app, name="ab")

Each command parses its arguments, calls one function of :mod:`prompt_tool.ab_testing` and
prints the result as a table or, with ``--json``, as the same data in JSON. Changing a test
(create, start, pause, stop, promote) needs the right to edit its template; show, list and
results the right to view it; record needs no role (outcomes come from the application).
"""

from __future__ import annotations

import re
from typing import Annotated

import typer
from rich.console import Group, RenderableType
from rich.text import Text

from prompt_tool import ab_testing
from prompt_tool.ab_testing import (
    ABResults,
    ABTestInfo,
    ABTestStatus,
    Promotion,
    RecordedOutcome,
    TestRef,
    VariantSpec,
)
from prompt_tool.cli._runtime import (
    DbOption,
    JsonOption,
    acting_user,
    emit,
    new_app,
    opened_engine,
    table,
)
from prompt_tool.db.models import PromptRole, Scope
from prompt_tool.db.url import resolve_url
from prompt_tool.errors import InvalidInputError
from prompt_tool.templates import TemplateAddress, TemplateManager

__all__ = ["ab_app"]

ab_app = new_app("A/B tests of orchestration template versions: create, run, measure, promote.")

TestArgument = Annotated[
    str, typer.Argument(metavar="TEST", help="The test's id (or its name, when unique).")
]
ProjectOption = Annotated[
    str | None, typer.Option("--project", "-p", metavar="SLUG", help="The project (slug).")
]
ScopeOption = Annotated[
    Scope | None,
    typer.Option(
        "--scope",
        case_sensitive=False,
        help="The template's scope: global, project or custom (default: project with "
        "--project, else global).",
    ),
]
AsOption = Annotated[
    str | None,
    typer.Option(
        "--as", metavar="USER", help="Act as USER (default: $PROMPT_TOOL_USER, else you)."
    ),
]

_VARIANT = re.compile(r"^(?P<name>[^=]+)=v?(?P<version>\d+)(?::(?P<weight>\d+))?$")


def _ref(value: str) -> TestRef:
    return int(value) if value.isdigit() else value


def _variants(specs: list[str] | None) -> list[VariantSpec]:
    variants = []
    for spec in specs or []:
        match = _VARIANT.match(spec.strip())
        if match is None:
            raise InvalidInputError(
                f"--variant {spec!r} must look like NAME=VERSION[:WEIGHT], e.g. control=1:50"
            )
        weight = match["weight"]
        variants.append(
            VariantSpec(match["name"], int(match["version"]), int(weight) if weight else 1)
        )
    return variants


def _address(
    name: str, scope: Scope | None, project: str | None, actor: str
) -> tuple[TemplateAddress, str | None]:
    """The template's address, and the project a test of a global template enrols."""
    chosen = scope or (Scope.PROJECT if project else Scope.GLOBAL)
    owner = actor if chosen is Scope.CUSTOM else None
    where = project if chosen is not Scope.GLOBAL else None
    return TemplateAddress(name, chosen, where, owner), project


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _number(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def _render_info(info: ABTestInfo) -> RenderableType:
    unchanged = "" if info.changed else f" (already {info.status.value}: nothing changed)"
    return Group(
        Text(info.describe() + unchanged),
        table(
            None,
            ["variant", "version", "weight", "share"],
            [(v.name, f"v{v.version}", v.weight, _percent(v.share)) for v in info.variants],
        ),
    )


def _render_list(items: list[ABTestInfo]) -> RenderableType:
    return table(
        "A/B tests",
        ["id", "name", "status", "project", "template", "role", "variants"],
        [
            (
                i.id,
                i.name,
                i.status.value,
                i.project,
                f"{i.template.name} ({i.template.scope.value})",
                i.role,
                " ".join(f"{v.name}=v{v.version}:{v.weight}" for v in i.variants),
            )
            for i in items
        ],
    )


def _render_results(results: ABResults) -> RenderableType:
    confidence = results.comparisons[0].test.confidence if results.comparisons else None
    ci = f"{confidence:.0%} CI" if confidence is not None else "CI"
    return Group(
        Text(results.test.describe()),
        table(
            "Variants",
            ["variant", "version", "sessions", "outcomes", "successes", "rate", "mean metric"],
            [
                (
                    v.name,
                    f"v{v.version}",
                    v.sessions,
                    v.outcomes,
                    v.successes,
                    _percent(v.success_rate),
                    _number(v.mean_metric),
                )
                for v in results.variants
            ],
        ),
        table(
            "Against the control (two-proportion z-test)",
            ["variant", "control", "difference", ci, "z", "p-value"],
            [
                (
                    c.variant,
                    c.control,
                    _percent(c.test.difference),
                    ""
                    if c.test.ci_low is None
                    else f"{_percent(c.test.ci_low)} .. {_percent(c.test.ci_high)}",
                    _number(c.test.z),
                    _number(c.test.p_value),
                )
                for c in results.comparisons
            ],
        ),
    )


def _render_outcomes(outcomes: list[RecordedOutcome]) -> RenderableType:
    return table(
        "Outcomes recorded",
        ["test", "session", "variant", "success", "metric"],
        [
            (f"{o.test_id} {o.test_name}", o.session_id, o.variant, o.success, o.metric)
            for o in outcomes
        ],
    )


@ab_app.command("create")
def ab_create(
    name: Annotated[str, typer.Argument(help="The test's name.")],
    template: Annotated[
        str, typer.Option("--template", "-t", metavar="NAME", help="The template to test.")
    ],
    role: Annotated[
        PromptRole,
        typer.Option("--role", case_sensitive=False, help="The session role it applies to."),
    ],
    variant: Annotated[
        list[str] | None,
        typer.Option(
            "--variant",
            metavar="NAME=VERSION[:WEIGHT]",
            help="A variant: a version of the template and its weight (repeat, at least two).",
        ),
    ] = None,
    project: ProjectOption = None,
    scope: ScopeOption = None,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a draft test of one role of a template (a global template's test needs
    --scope global --project SLUG: the project whose sessions it enrols)."""
    actor = acting_user(as_user)
    address, test_project = _address(template, scope, project, actor)
    with opened_engine(db) as engine:
        info = ab_testing.create_ab_test(
            engine, address, role, _variants(variant), name=name, actor=actor, project=test_project
        )
    emit(info, as_json=as_json, render=_render_info)


@ab_app.command("start")
def ab_start(
    test: TestArgument, as_user: AsOption = None, db: DbOption = None, as_json: JsonOption = False
) -> None:
    """Start (or resume) a test: new sessions of its project are enrolled."""
    with opened_engine(db) as engine:
        info = ab_testing.start_ab_test(engine, _ref(test), actor=acting_user(as_user))
    emit(info, as_json=as_json, render=_render_info)


@ab_app.command("pause")
def ab_pause(
    test: TestArgument, as_user: AsOption = None, db: DbOption = None, as_json: JsonOption = False
) -> None:
    """Pause a test: no new enrolments until it starts again."""
    with opened_engine(db) as engine:
        info = ab_testing.pause_ab_test(engine, _ref(test), actor=acting_user(as_user))
    emit(info, as_json=as_json, render=_render_info)


@ab_app.command("stop")
def ab_stop(
    test: TestArgument, as_user: AsOption = None, db: DbOption = None, as_json: JsonOption = False
) -> None:
    """Stop a test for good (its results stay)."""
    with opened_engine(db) as engine:
        info = ab_testing.stop_ab_test(engine, _ref(test), actor=acting_user(as_user))
    emit(info, as_json=as_json, render=_render_info)


@ab_app.command("show")
def ab_show(
    test: TestArgument, as_user: AsOption = None, db: DbOption = None, as_json: JsonOption = False
) -> None:
    """Show a test and its variants."""
    with opened_engine(db) as engine:
        info = ab_testing.get_ab_test(engine, _ref(test), actor=acting_user(as_user))
    emit(info, as_json=as_json, render=_render_info)


@ab_app.command("list")
def ab_list(
    project: ProjectOption = None,
    status: Annotated[
        ABTestStatus | None,
        typer.Option("--status", case_sensitive=False, help="Only tests in this state."),
    ] = None,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the tests you may see, newest first."""
    with opened_engine(db) as engine:
        items = ab_testing.list_ab_tests(
            engine, project=project, status=status, actor=acting_user(as_user)
        )
    emit(items, as_json=as_json, render=_render_list)


@ab_app.command("results")
def ab_results_command(
    test: TestArgument,
    confidence: Annotated[
        float, typer.Option("--confidence", help="Of the interval for the difference.")
    ] = ab_testing.DEFAULT_CONFIDENCE,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Per variant: sessions, successes, rate, mean metric; each variant against the control."""
    with opened_engine(db) as engine:
        results = ab_testing.ab_results(
            engine, _ref(test), actor=acting_user(as_user), confidence=confidence
        )
    emit(results, as_json=as_json, render=_render_results)


@ab_app.command("record")
def ab_record(
    session: Annotated[int, typer.Argument(metavar="SESSION", help="The session's id.")],
    success: Annotated[
        bool | None, typer.Option("--success/--failure", help="Did the session succeed?")
    ] = None,
    metric: Annotated[
        float | None, typer.Option("--metric", help="A number measured for the session.")
    ] = None,
    test: Annotated[
        str | None,
        typer.Option("--test", metavar="TEST", help="Only this test (default: all the session's)."),
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Record a session's outcome (a success flag and/or a metric) in its A/B tests."""
    with opened_engine(db) as engine:
        outcomes = ab_testing.record_outcome(
            engine,
            session,
            success=success,
            metric=metric,
            test=_ref(test) if test is not None else None,
        )
    emit(outcomes, as_json=as_json, render=_render_outcomes)


@ab_app.command("promote")
def ab_promote(
    test: TestArgument,
    variant: Annotated[str, typer.Argument(metavar="VARIANT", help="The winning variant.")],
    note: Annotated[str | None, typer.Option(help="Why (kept in the history).")] = None,
    as_user: AsOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Point the template's production label at the winner's version, and stop the test."""
    promotion = ab_testing.promote_variant(
        TemplateManager.from_url(resolve_url(db)),
        _ref(test),
        variant,
        actor=acting_user(as_user),
        note=note,
    )
    emit(promotion, as_json=as_json, render=Promotion.describe)
