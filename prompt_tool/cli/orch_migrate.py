"""`orch-migrate`: the operator's tool for the schema and the move to orchestration templates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from prompt_tool.cli._runtime import DbOption, JsonOption, emit, fail, new_app, run, table
from prompt_tool.cli.flag_commands import flag_app
from prompt_tool.cli.migrate_commands import backfill_command, verify_command
from prompt_tool.cli.readiness_commands import rehearse_command, status_command
from prompt_tool.cli.transfer_commands import export_command, restore_command
from prompt_tool.db import schema
from prompt_tool.db.url import resolve_url
from prompt_tool.migrate import fingerprint as fingerprints
from prompt_tool.migrate import sample

app = new_app("Move prompt-tool deployments to orchestration templates, safely and reversibly.")
db_app = new_app("The schema history: upgrade, downgrade, stamp, current, history.")
app.add_typer(db_app, name="db")
app.add_typer(flag_app, name="flag")
app.command("export")(export_command)
app.command("restore")(restore_command)
app.command("backfill")(backfill_command)
app.command("verify")(verify_command)
app.command("status")(status_command)
app.command("rehearse")(rehearse_command)

RevisionArgument = Annotated[str, typer.Argument(help="Target revision (id, head, -1, ...).")]


def _describe(state: schema.SchemaState) -> str:
    if state.previous == state.current:
        return f"{state.database}: at {state.current or 'no revision'} (head {state.head})"
    return (
        f"{state.database}: {state.previous or 'empty'} -> {state.current or 'empty'} "
        f"(head {state.head})"
    )


@db_app.command("upgrade")
def db_upgrade(
    revision: RevisionArgument = schema.HEAD, db: DbOption = None, as_json: JsonOption = False
) -> None:
    """Upgrade the schema (default: to head). Online-safe on PostgreSQL."""
    emit(schema.upgrade(resolve_url(db, create=True), revision), as_json=as_json, render=_describe)


@db_app.command("downgrade")
def db_downgrade(
    revision: RevisionArgument = "-1", db: DbOption = None, as_json: JsonOption = False
) -> None:
    """Step the schema back (default: one revision). Legacy data is never touched."""
    emit(schema.downgrade(resolve_url(db), revision), as_json=as_json, render=_describe)


@db_app.command("stamp")
def db_stamp(revision: RevisionArgument, db: DbOption = None, as_json: JsonOption = False) -> None:
    """Record a revision without running it (adopt a database that has the legacy tables)."""
    emit(schema.stamp(resolve_url(db, create=True), revision), as_json=as_json, render=_describe)


@db_app.command("current")
def db_current(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Show the revision the database is at."""
    emit(schema.current(resolve_url(db)), as_json=as_json, render=_describe)


@db_app.command("history")
def db_history(as_json: JsonOption = False) -> None:
    """List the revisions, oldest first."""
    emit(
        schema.history(),
        as_json=as_json,
        render=lambda revisions: table(
            "Schema history",
            ["revision", "down", "head", "description"],
            [
                (r.revision, r.down_revision or "", "yes" if r.is_head else "", r.description)
                for r in revisions
            ],
        ),
    )


def _render_fingerprint(result: fingerprints.LegacyFingerprint) -> Table:
    changed = set(result.changed or ())
    status = {t.table: ("CHANGED" if t.table in changed else "same") for t in result.tables}
    columns = ["table", "rows", "sha256"] + ([] if result.changed is None else ["vs saved"])
    return table(
        "Legacy tables",
        columns,
        [
            (t.table, t.rows, t.sha256[:16])
            + (() if result.changed is None else (status[t.table],))
            for t in result.tables
        ],
    )


@app.command("fingerprint")
def fingerprint(
    against: Annotated[
        Path | None,
        typer.Option(
            "--against",
            metavar="FILE",
            help="A fingerprint saved earlier with --json: exit 1 if any legacy table differs.",
        ),
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Row count and sha256 of every legacy table: compare before and after any schema change."""
    result = fingerprints.fingerprint_legacy_tables(resolve_url(db), against)
    emit(result, as_json=as_json, render=_render_fingerprint)
    if result.changed:
        fail(f"legacy tables differ from {against}: {', '.join(result.changed)}", 1)


@app.command("sample-data")
def sample_data(
    sessions: Annotated[int, typer.Option(min=0, help="How many sessions to create.")] = 200,
    projects: Annotated[int, typer.Option(min=1, help="Spread over this many projects.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same data.")] = 7,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Load a realistic legacy data set: for demos, rehearsals and trying things on scratch."""
    emit(
        sample.load_legacy_sample(resolve_url(db), sessions=sessions, projects=projects, seed=seed),
        as_json=as_json,
        render=lambda loaded: (
            f"loaded {loaded.projects} projects, {loaded.prompts} prompts, "
            f"{loaded.sessions} sessions into {loaded.database}"
        ),
    )


def main() -> None:
    run(app)
