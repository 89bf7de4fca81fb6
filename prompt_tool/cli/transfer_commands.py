"""`orch-migrate export` and `orch-migrate restore`: a deployment's data to a directory and back.

Registered by the main app with ``app.command("export")(export_command)`` and
``app.command("restore")(restore_command)``. Each parses its options, calls one command of
:mod:`prompt_tool.migrate.commands` and prints its result as a table or, with
``--json``, as the same data. A Rich progress bar is shown on stderr when stdout is a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from prompt_tool.cli._runtime import (
    DbOption,
    JsonOption,
    emit,
    fail,
    literal,
    note,
    opened_engine,
    table,
)
from prompt_tool.cli.migrate_commands import ReadonlyOption, not_recorded_note, rate_and_eta
from prompt_tool.errors import InvalidInputError
from prompt_tool.migrate import (
    DifferingRows,
    DifferingRowsError,
    ExportOptions,
    ExportResult,
    RestoreOptions,
    RestoreOutcome,
    RestoreResult,
    commands,
)
from prompt_tool.migrate.archive import ARCHIVED_TABLES, ProgressCallback
from prompt_tool.migrate.restore import RestoredTable
from prompt_tool.migrate.staging import Leftovers

__all__ = ["export_command", "restore_command"]

ProjectsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--project",
        "-p",
        metavar="SLUG",
        help="Export only this project (repeatable); global prompts always come along.",
    ),
]


@contextmanager
def _progress_bar() -> Iterator[ProgressCallback | None]:
    """A per-table bar on stderr when a person is watching (stdout is a terminal), else none."""
    if not sys.stdout.isatty():
        yield None
        return
    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
        console=Console(stderr=True),
        transient=True,
    )
    tasks: dict[str, TaskID] = {}
    started: dict[str, float] = {}

    def update(table_name: str, done: int, total: int | None) -> None:
        # Rate and ETA from each table's start, known from its first rows on.
        began = started.setdefault(table_name, time.monotonic())
        rate, eta = rate_and_eta(done, total, time.monotonic() - began)
        if table_name not in tasks:
            tasks[table_name] = bar.add_task(table_name, total=total, rate=rate, eta=eta)
        bar.update(tasks[table_name], completed=done, total=total, rate=rate, eta=eta)

    with bar:
        yield update


def _whole_table_names(view: Table) -> Table:
    # Piped, Rich lays a table out in 80 columns: "orchestration…" would be two tables at once.
    view.columns[0].min_width = max(map(len, ARCHIVED_TABLES))
    return view


def _render_export(result: ExportResult) -> Group:
    scope = ", ".join(result.projects) if result.projects else "all projects"
    return Group(
        _whole_table_names(
            table(
                f"Exported {scope} to {result.directory}",
                ["table", "rows", "bytes", "file", "sha256"],
                [(t.table, t.rows, t.bytes, t.file, t.sha256[:16]) for t in result.tables],
            )
        ),
        literal(
            f"{result.rows} rows, {result.bytes} bytes at schema revision "
            f"{result.alembic_revision} in {result.seconds:.2f} s"
        ),
    )


def export_command(
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="Where to write the export (a new directory).")
    ],
    project: ProjectsOption = None,
    gzip: Annotated[bool, typer.Option("--gzip", help="Compress each file with gzip.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace a non-empty DIR (only once the new export is complete)."
        ),
    ] = False,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            metavar="N",
            help="Parallel readers for big PostgreSQL tables (default: one per core, up to 4).",
        ),
    ] = None,
    readonly: ReadonlyOption = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export the data (all, or --project) to DIR: JSON Lines per table and a manifest."""
    options = ExportOptions(
        directory, projects=project or (), compress=gzip, force=force, jobs=jobs, readonly=readonly
    )
    with opened_engine(db) as engine, _progress_bar() as progress:
        result = commands.export(engine, options, progress=progress)
    not_recorded_note(result.not_recorded)
    if result.leftovers_removed:
        note(Leftovers(result.leftovers_removed, result.leftover_bytes_removed).describe())
    emit(result, as_json=as_json, render=_render_export)


_ACTION_COLUMN = {
    DifferingRows.OVERWRITE: "overwritten",
    DifferingRows.KEEP_CURRENT: "kept",
}


def _per_table(tables: list[RestoredTable]) -> str:
    return ", ".join(f"{t.table} {t.different}" for t in tables if t.different)


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


def _restore_summary(result: RestoreResult) -> str:
    tables = _per_table(result.tables)
    if result.outcome is RestoreOutcome.DRY_RUN:
        head = (
            f"Dry run, nothing written: a restore would insert {_rows(result.missing)} and skip "
            f"{result.identical} identical"
        )
        if not result.different:
            return f"{head}; no row differs from the export."
        differ = (
            f"{_rows(result.different)} {'differs' if result.different == 1 else 'differ'} "
            f"from the export ({tables})"
        )
        if result.differing is DifferingRows.OVERWRITE:
            return f"{head}; {differ}: it would overwrite them with the export's."
        if result.differing is DifferingRows.KEEP_CURRENT:
            return f"{head}; {differ}: it would keep them as they are."
        return f"{head}; {differ}."  # and the line on stderr: it would be refused
    head = f"{_rows(result.inserted)} inserted, {result.identical} identical (skipped)"
    if result.overwritten:
        differ = f"{result.overwritten} differing overwritten with the export's ({tables})"
    elif result.kept:
        differ = f"{result.kept} differing kept as they are ({tables})"
    else:
        differ = "no row differed from the export"
    return f"{head}, {differ}; schema revision {result.alembic_revision}, {result.seconds:.2f} s"


def _render_restore(result: RestoreResult) -> Group:
    dry_run = result.outcome is RestoreOutcome.DRY_RUN
    title = (
        f"Dry run: {result.source} compared with {result.database}, nothing written"
        if dry_run
        else f"Restored {result.source} into {result.database}"
    )
    action = None if dry_run else _ACTION_COLUMN.get(result.differing)
    columns = [
        "table",
        "rows",
        "to insert" if dry_run else "inserted",
        "identical (skipped)",
        "differ",
        *([action] if action else []),
        "first differing keys",
    ]
    rows = [
        (
            t.table,
            t.rows,
            t.missing if dry_run else t.inserted,
            t.identical,
            t.different,
            *([t.overwritten or t.kept] if action else []),
            t.keys_text() if t.different else "",
        )
        for t in result.tables
    ]
    return Group(_whole_table_names(table(title, columns, rows)), literal(_restore_summary(result)))


def restore_command(
    source: Annotated[
        Path, typer.Option("--from", metavar="DIR", help="The export directory to restore.")
    ],
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Compare only: what would be inserted, what is identical, which rows differ. "
            "Writes nothing.",
        ),
    ] = False,
    keep_current: Annotated[
        bool,
        typer.Option(
            "--keep-current",
            help="Rows that differ from the export: leave them as they are, restore the rest.",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Rows that differ from the export: replace them with the export's values.",
        ),
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Restore an export: checked first, all or nothing, idempotent.

    Rows missing from the database are inserted, identical rows skipped.

    Rows changed after the export refuse the restore (exit 1, nothing written).

    For those choose --keep-current or --overwrite; --dry-run lists them first.
    """
    if keep_current and overwrite:
        raise InvalidInputError(
            "--keep-current and --overwrite contradict each other: choose what happens to rows "
            "that differ from the export (--dry-run lists them)"
        )
    differing = (
        DifferingRows.OVERWRITE
        if overwrite
        else DifferingRows.KEEP_CURRENT
        if keep_current
        else DifferingRows.REFUSE
    )
    options = RestoreOptions(source, differing=differing, dry_run=dry_run)
    try:
        with opened_engine(db) as engine, _progress_bar() as progress:
            result = commands.restore(engine, options, progress=progress)
    except DifferingRowsError as refused:
        # The one line says it all to a person; a program gets the comparison as well.
        if as_json:
            emit(refused.result, as_json=True, render=_render_restore)
        raise
    emit(result, as_json=as_json, render=_render_restore)
    if result.refusal is not None:  # a dry run that found what a restore would refuse
        fail(result.refusal, 1)
