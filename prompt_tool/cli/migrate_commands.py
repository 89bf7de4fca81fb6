"""`orch-migrate backfill` and `orch-migrate verify`."""

from __future__ import annotations

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
    fail,
    literal,
    opened_engine,
    stderr,
    table,
)
from prompt_tool.cli._runtime import note as print_note
from prompt_tool.migrate import (
    BackfillOptions,
    BackfillSummary,
    VerifyOptions,
    VerifyReport,
    commands,
)

__all__ = [
    "ReadonlyOption",
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


def backfill_command(
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
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Turn legacy prompt texts into imported templates and link every session to them."""
    options = BackfillOptions(
        projects=project or (),
        batch_size=batch_size,
        sleep_ms=sleep_ms,
        limit=limit,
        dry_run=dry_run,
        wait=wait,
        match_existing=match_existing,
        workers=workers,
    )
    with opened_engine(db) as engine, progress_bar("backfill", not as_json) as update:
        summary = commands.backfill(engine, options, progress=lambda p: update(p.done, p.total))
    emit(summary, as_json=as_json, render=BackfillSummary.describe)


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
