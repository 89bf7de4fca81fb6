"""`orch-migrate backfill` (and its `pause`, `resume`, `cancel`) and `orch-migrate verify`."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from prompt_tool.cli._runtime import (
    DbOption,
    JsonOption,
    emit,
    errors_mapped,
    fail,
    literal,
    new_app,
    opened_engine,
    stderr,
    table,
)
from prompt_tool.cli._runtime import note as print_note
from prompt_tool.cli.run_view import backfill_progress
from prompt_tool.migrate import (
    BackfillControlOptions,
    BackfillOptions,
    BackfillSummary,
    ControlAction,
    ControlOutcome,
    VerifyOptions,
    VerifyReport,
    commands,
)
from prompt_tool.migrate.backfill.types import RunWindow
from prompt_tool.settings import HealthLimits, get_settings

__all__ = [
    "ReadonlyOption",
    "backfill_app",
    "backfill_command",
    "not_recorded_note",
    "progress_bar",
    "rate_and_eta",
    "verify_command",
]

ProjectsOption = Annotated[
    list[str] | None,
    typer.Option("--project", "-p", metavar="SLUG", help="Only this project (repeatable)."),
]
ReadonlyOption = Annotated[
    bool,
    typer.Option(
        "--readonly",
        help="Only read, in read-only transactions (a replica, a read-only user); the run is "
        "not recorded in the ledger, so `status` will not show it.",
    ),
]


def not_recorded_note(note: str | None) -> None:
    """The one line on stderr saying a read-only command's run is not in the ledger."""
    if note:
        print_note(note)


def rate_and_eta(done: int, total: int | None, elapsed: float) -> tuple[str, str]:
    """The rate (per second since the command started) and the time left, as text: known from
    the first update, not after Rich has gathered enough samples of its own."""
    if done <= 0 or elapsed <= 0:
        return "", ""
    per_second = done / elapsed
    if total is None:
        return f"{per_second:,.0f}/s", ""
    left = max(0.0, (total - done) / per_second)
    minutes, seconds = divmod(round(left), 60)
    hours, minutes = divmod(minutes, 60)
    eta = f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
    return f"{per_second:,.0f}/s", f"ETA {eta}"


@contextmanager
def progress_bar(label: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A Rich progress bar with rate and ETA on a terminal; silent otherwise (or with --json).

    The bar appears at the first update, which brings the total: never an unknown ``/?`` or an
    empty ``0/0``.
    """
    if not enabled or not sys.stderr.isatty():
        yield lambda done, total: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} sessions"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
    )
    started = time.monotonic()
    with Progress(*columns, console=stderr, transient=True) as bar:
        tasks: list[TaskID] = []

        def update(done: int, total: int) -> None:
            rate, eta = rate_and_eta(done, total, time.monotonic() - started)
            if not tasks:
                tasks.append(bar.add_task(label, total=total, completed=done, rate=rate, eta=eta))
            bar.update(tasks[0], completed=done, total=total, rate=rate, eta=eta)

        yield update


_PACE = "Pace"
_WAITS = "When it waits"
_ERRORS = "Errors and output"


def _health(limits: dict[str, Any]) -> HealthLimits | None:
    """The settings' health limits (PROMPT_TOOL_BACKFILL_*) with those given on the command
    line in their place; None when none is given (the run reads the settings itself)."""
    given = {name: value for name, value in limits.items() if value is not None}
    return dataclasses.replace(get_settings().backfill_health, **given) if given else None


def backfill_command(
    ctx: typer.Context,
    project: ProjectsOption = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Sessions per batch (one short transaction).")
    ] = 1000,
    sleep_ms: Annotated[int, typer.Option(min=0, help="Pause between batches (throttle).")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="Stop after this many sessions.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Report what would change; write nothing.")] = False,
    wait: Annotated[
        bool, typer.Option(help="Queue behind a running backfill instead of exiting.")
    ] = False,
    match_existing: Annotated[
        bool,
        typer.Option(
            help="First link to an existing template that renders the text exactly with the "
            "session's variables; import only the rest."
        ),
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Processes sharing the run: the key range is planned in --batch-size batches "
            "that workers claim with FOR UPDATE SKIP LOCKED (PostgreSQL; SQLite uses one).",
        ),
    ] = 1,
    target_ms: Annotated[
        int,
        typer.Option(
            "--target-ms",
            min=1,
            metavar="MS",
            rich_help_panel=_PACE,
            help="Steer the batch size so one batch's transaction takes about this long; a "
            "lock or statement timeout shrinks it at once.",
        ),
    ] = 200,
    min_batch_size: Annotated[
        int,
        typer.Option(
            min=1, rich_help_panel=_PACE, help="The steered batch size never goes below this."
        ),
    ] = 50,
    window: Annotated[
        str | None,
        typer.Option(
            metavar="HH:MM-HH:MM",
            rich_help_panel=_WAITS,
            help="Work only in these hours, local time (22:00-06:00 spans midnight); wait "
            "outside them.",
        ),
    ] = None,
    throttle_query: Annotated[
        str | None,
        typer.Option(
            metavar="SQL",
            rich_help_panel=_WAITS,
            help="Wait while this query returns true (run before every batch).",
        ),
    ] = None,
    health_checks: Annotated[
        bool,
        typer.Option(
            "--health-checks/--no-health-checks",
            rich_help_panel=_WAITS,
            help="Wait while a health signal below is past its limit (PostgreSQL). Each limit "
            "defaults to its setting, $PROMPT_TOOL_BACKFILL_<NAME>, where `off` turns that "
            "signal off.",
        ),
    ] = True,
    max_replica_lag_ms: Annotated[
        int | None,
        typer.Option(
            min=0,
            metavar="MS",
            rich_help_panel=_WAITS,
            help="Wait while a replica's replay lag is above this (default: 1500).",
        ),
    ] = None,
    max_wal_mb_per_s: Annotated[
        int | None,
        typer.Option(
            min=0,
            metavar="MB",
            rich_help_panel=_WAITS,
            help="Wait while the server writes more WAL per second than this (default: 128).",
        ),
    ] = None,
    max_blocked_sessions: Annotated[
        int | None,
        typer.Option(
            min=0,
            metavar="N",
            rich_help_panel=_WAITS,
            help="Wait while more sessions than this wait on the run's locks (default: 0).",
        ),
    ] = None,
    max_transaction_age_s: Annotated[
        int | None,
        typer.Option(
            min=0,
            metavar="S",
            rich_help_panel=_WAITS,
            help="Wait while the oldest open transaction is older than this (default: 3600).",
        ),
    ] = None,
    autovacuum_check: Annotated[
        bool | None,
        typer.Option(
            "--autovacuum-check/--no-autovacuum-check",
            rich_help_panel=_WAITS,
            help="Wait while (auto)vacuum runs on a table the run writes (default: on).",
            show_default=False,
        ),
    ] = None,
    max_errors: Annotated[
        int,
        typer.Option(
            min=0,
            rich_help_panel=_ERRORS,
            help="Quarantine rows that cannot be imported; stop past this many.",
        ),
    ] = 100,
    retry_quarantined: Annotated[
        bool,
        typer.Option(
            "--retry-quarantined",
            rich_help_panel=_ERRORS,
            help="Walk only the quarantined sessions of the scope, again.",
        ),
    ] = False,
    metrics_file: Annotated[
        str | None,
        typer.Option(
            metavar="PATH",
            rich_help_panel=_ERRORS,
            help="Rewrite this Prometheus text file every few seconds (node_exporter textfile "
            "collector).",
        ),
    ] = None,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            rich_help_panel=_ERRORS,
            help="Project duration, WAL, templates and lock hold from a few sample batches "
            "that are rolled back; write nothing.",
        ),
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Turn legacy prompt texts into imported templates and link every session to them.

    A running backfill is steered from any terminal: `orch-migrate backfill pause`, `resume`
    and `cancel`.
    """
    if ctx.invoked_subcommand is not None:
        return
    options = BackfillOptions(
        projects=project or (),
        batch_size=batch_size,
        sleep_ms=sleep_ms,
        limit=limit,
        dry_run=dry_run,
        wait=wait,
        match_existing=match_existing,
        target_batch_ms=target_ms,
        workers=workers,
        min_batch_size=min_batch_size,
        health=_health(
            {
                "replica_lag_ms": max_replica_lag_ms,
                "wal_bytes_per_s": None
                if max_wal_mb_per_s is None
                else max_wal_mb_per_s * 1024 * 1024,
                "blocked_sessions": max_blocked_sessions,
                "transaction_age_s": max_transaction_age_s,
                "autovacuum": autovacuum_check,
            }
        ),
        health_checks=health_checks,
        throttle_query=throttle_query,
        window=None if window is None else RunWindow.parse(window),
        max_errors=max_errors,
        retry_quarantined=retry_quarantined,
        metrics_file=metrics_file,
    )
    if estimate:
        with opened_engine(db) as engine:
            projection = commands.estimate_backfill(engine, options)
        emit(projection, as_json=as_json, render=lambda shown: shown.describe())
        return
    with opened_engine(db) as engine, backfill_progress(not as_json, engine) as update:
        summary = commands.backfill(engine, options, progress=update)
    emit(summary, as_json=as_json, render=BackfillSummary.describe)


RunOption = Annotated[
    int | None,
    typer.Option(
        "--run",
        metavar="ID",
        min=1,
        help="The backfill run (default: the one that is running; `orch-migrate status` lists "
        "them).",
    ),
]


def _control(
    ctx: typer.Context, action: ControlAction, run: int | None, db: str | None, as_json: bool
) -> None:
    # `backfill --db URL pause` as well as `backfill pause --db URL`.
    db = db or (ctx.parent.params.get("db") if ctx.parent is not None else None)
    with opened_engine(db) as engine:
        outcome = commands.backfill_control(engine, BackfillControlOptions(action, run))
    emit(outcome, as_json=as_json, render=ControlOutcome.describe)


def pause_command(
    ctx: typer.Context, run: RunOption = None, db: DbOption = None, as_json: JsonOption = False
) -> None:
    """Pause a running backfill before its next batch: it holds no lock and no open
    transaction while paused."""
    _control(ctx, ControlAction.PAUSE, run, db, as_json)


def resume_command(
    ctx: typer.Context, run: RunOption = None, db: DbOption = None, as_json: JsonOption = False
) -> None:
    """Let a paused backfill carry on."""
    _control(ctx, ControlAction.RESUME, run, db, as_json)


def cancel_command(
    ctx: typer.Context, run: RunOption = None, db: DbOption = None, as_json: JsonOption = False
) -> None:
    """Stop a running (or paused) backfill before its next batch; what it committed stands and
    the next `orch-migrate backfill` carries on from there."""
    _control(ctx, ControlAction.CANCEL, run, db, as_json)


backfill_app = new_app(backfill_command.__doc__ or "")
backfill_app.callback(
    invoke_without_command=True, no_args_is_help=False, subcommand_metavar="[pause|resume|cancel]"
)(errors_mapped(backfill_command))
backfill_app.command("pause")(pause_command)
backfill_app.command("resume")(resume_command)
backfill_app.command("cancel")(cancel_command)


def _render_report(report: VerifyReport) -> Any:
    columns = [
        "project",
        "checked",
        "matched",
        "mismatched",
        "unmigrated",
        "stale",
        "render errors",
        "unreadable",
        "quarantined",
        "passed",
    ]
    rows = [
        (
            p.project,
            p.checked,
            p.matched,
            p.mismatched,
            p.unmigrated,
            p.stale,
            p.render_errors,
            p.unreadable,
            p.quarantined,
            "yes" if p.passed(report.allow_unmigrated) else "NO",
        )
        for p in [*report.projects, report.totals()]
    ]
    result = table("Verify: templates path vs legacy text", columns, rows)
    if report.unreadable:
        unreadable = report.totals().unreadable
        more = ", ..." if unreadable > len(report.unreadable) else ""
        texts = "legacy text is" if unreadable == 1 else "legacy texts are"
        print_note(
            f"{unreadable} {texts} not valid UTF-8 (left on the legacy path, never linked): "
            f"{', '.join(report.unreadable)}{more}"
        )
    if report.quarantined:
        quarantined = report.totals().quarantined
        more = "; ..." if quarantined > len(report.quarantined) else ""
        print_note(
            f"{quarantined} legacy texts quarantined by backfill (served from the legacy column, "
            f"not linked; `orch-migrate status` counts them per project): "
            f"{'; '.join(report.quarantined)}{more}"
        )
    if report.corrupted_versions:
        ids = ", ".join(str(version) for version in report.corrupted_versions)
        print_note(
            f"template versions whose text no longer matches their stored digest (changed in "
            f"the database): {ids}; they fail the verify and are never served from another "
            "version's cache; restore them from an export"
        )
    for mismatch in report.mismatches:
        stderr.print(
            Text.assemble(
                literal(mismatch.kind, style="bold"),
                literal(
                    f": session {mismatch.session_id} {mismatch.role} "
                    f"(project {mismatch.project}, version id {mismatch.version_id})"
                ),
            )
        )
        stderr.print(literal(mismatch.diff))
    return result


def verify_command(
    project: ProjectsOption = None,
    sample: Annotated[
        int | None, typer.Option(min=1, help="Check a random sample of N sessions.")
    ] = None,
    allow_unmigrated: Annotated[
        bool,
        typer.Option(
            help="Unmigrated, stale or unreadable (not UTF-8) sessions do not fail the check."
        ),
    ] = False,
    show_diffs: Annotated[
        int, typer.Option(min=0, help="Diffs to print for the first mismatches.")
    ] = 3,
    readonly: ReadonlyOption = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Compare what the templates path returns with the legacy text, byte for byte (exit 1 on any
    mismatch)."""
    options = VerifyOptions(
        projects=project or (),
        sample=sample,
        allow_unmigrated=allow_unmigrated,
        show_diffs=show_diffs,
        readonly=readonly,
    )
    with opened_engine(db) as engine, progress_bar("verify", not as_json) as update:
        report = commands.verify(engine, options, progress=update)
    not_recorded_note(report.not_recorded)
    emit(report, as_json=as_json, render=_render_report)
    if not report.passed:
        fail("verify found differences; see the report above", 1)
