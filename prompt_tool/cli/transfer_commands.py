"""`orch-migrate export` and `orch-migrate restore`: a deployment's data to a directory and back.

Registered by the main app with ``app.command("export")(export_command)`` and
``app.command("restore")(restore_command)``. Each parses its options, calls one library function
(:func:`prompt_tool.migrate.export.export`,
:func:`prompt_tool.migrate.restore.restore`) and prints its result as a table or, with
``--json``, as the same data. A Rich progress bar is shown on stderr when stdout is a terminal.
"""

from __future__ import annotations

import sys
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

from prompt_tool.cli._runtime import DbOption, JsonOption, emit, fail, table
from prompt_tool.db.engine import make_engine
from prompt_tool.db.url import resolve_url
from prompt_tool.migrate.archive import ProgressCallback
from prompt_tool.migrate.export import ExportResult, export
from prompt_tool.migrate.restore import RestoreResult, restore

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
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    tasks: dict[str, TaskID] = {}

    def update(table_name: str, done: int, total: int | None) -> None:
        if table_name not in tasks:
            tasks[table_name] = bar.add_task(table_name, total=total)
        bar.update(tasks[table_name], completed=done, total=total)

    with bar:
        yield update


def _render_export(result: ExportResult) -> Group:
    scope = ", ".join(result.projects) if result.projects else "all projects"
    return Group(
        table(
            f"Exported {scope} to {result.directory}",
            ["table", "rows", "bytes", "file", "sha256"],
            [(t.table, t.rows, t.bytes, t.file, t.sha256[:16]) for t in result.tables],
        ),
        f"{result.rows} rows, {result.bytes} bytes at schema revision {result.alembic_revision} "
        f"in {result.seconds:.2f} s",
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
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export the data (all, or --project) to DIR: JSON Lines per table and a manifest."""
    engine = make_engine(resolve_url(db))
    try:
        with _progress_bar() as progress:
            result = export(
                engine,
                directory,
                projects=project,
                compress=gzip,
                force=force,
                jobs=jobs,
                progress=progress,
            )
    finally:
        engine.dispose()
    emit(result, as_json=as_json, render=_render_export)


def _render_restore(result: RestoreResult) -> Group:
    different = "overwritten" if result.overwrite else "different (left)"
    return Group(
        table(
            f"Restored {result.source} into {result.database}",
            ["table", "rows", "inserted", "identical (skipped)", different, "first keys"],
            [
                (
                    t.table,
                    t.rows,
                    t.inserted,
                    t.identical,
                    t.different,
                    ", ".join(str(tuple(key)) for key in t.different_keys),
                )
                for t in result.tables
            ],
        ),
        f"{result.inserted} inserted, {result.identical} identical, {result.different} different "
        f"in {result.seconds:.2f} s",
    )


def restore_command(
    source: Annotated[
        Path, typer.Option("--from", metavar="DIR", help="The export directory to restore.")
    ],
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace rows that exist with other values (default: leave them)."
        ),
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Restore an export: checked first, all or nothing, idempotent.

    Exit code 1 when rows that differ from the export were left alone (see --overwrite).
    """
    engine = make_engine(resolve_url(db))
    try:
        with _progress_bar() as progress:
            result = restore(engine, source, overwrite=overwrite, progress=progress)
    finally:
        engine.dispose()
    emit(result, as_json=as_json, render=_render_restore)
    if result.left_different:
        fail(
            f"{result.left_different} rows differ from the export and were left alone; "
            "rerun with --overwrite to replace them",
            1,
        )
