"""`orch-migrate backfill` and `orch-migrate verify`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from prompt_tool.cli._runtime import DbOption, JsonOption, emit, fail, stderr, table
from prompt_tool.db.engine import make_engine
from prompt_tool.db.url import resolve_url
from prompt_tool.migrate.backfill import (
    BackfillOptions,
    BackfillSummary,
    backfill,
)
from prompt_tool.migrate.verify import VerifyOptions, VerifyReport, verify

__all__ = ["backfill_command", "progress_bar", "verify_command"]

ProjectsOption = Annotated[
    list[str] | None,
    typer.Option("--project", "-p", metavar="SLUG", help="Only this project (repeatable)."),
]


@contextmanager
def progress_bar(label: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A Rich progress bar with rate and ETA on a terminal; silent otherwise (or with --json)."""
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
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=True) as bar:
        # A number from the start: the columns format it before the first update.
        task = bar.add_task(label, total=0, rate="")

        def update(done: int, total: int) -> None:
            elapsed = bar.tasks[task].elapsed or 0
            rate = f"{done / elapsed:,.0f}/s" if elapsed else ""
            bar.update(task, completed=done, total=total, rate=rate)

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
    engine = make_engine(resolve_url(db))
    try:
        with progress_bar("backfill", not as_json) as update:
            summary = backfill(engine, options, progress=lambda p: update(p.done, p.total))
    finally:
        engine.dispose()
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
            "yes" if p.passed(report.allow_unmigrated) else "NO",
        )
        for p in [*report.projects, report.totals()]
    ]
    result = table("Verify: templates path vs legacy text", columns, rows)
    for mismatch in report.mismatches:
        stderr.print(
            f"[bold]{mismatch.kind}[/]: session {mismatch.session_id} {mismatch.role} "
            f"(project {mismatch.project}, version id {mismatch.version_id})",
            highlight=False,
        )
        stderr.print(mismatch.diff, markup=False, highlight=False)
    return result


def verify_command(
    project: ProjectsOption = None,
    sample: Annotated[
        int | None, typer.Option(min=1, help="Check a random sample of N sessions.")
    ] = None,
    allow_unmigrated: Annotated[
        bool, typer.Option(help="Unmigrated or stale sessions do not fail the check.")
    ] = False,
    show_diffs: Annotated[
        int, typer.Option(min=0, help="Diffs to print for the first mismatches.")
    ] = 3,
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
    )
    engine = make_engine(resolve_url(db))
    try:
        with progress_bar("verify", not as_json) as update:
            report = verify(engine, options, progress=update)
    finally:
        engine.dispose()
    emit(report, as_json=as_json, render=_render_report)
    if not report.passed:
        fail("verify found differences; see the report above", 1)
