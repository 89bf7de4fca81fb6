"""`orch-migrate`: the operator's tool for the schema and the move to orchestration templates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from prompt_tool.cli._runtime import (
    DbOption,
    JsonOption,
    emit,
    fail,
    literal,
    new_app,
    run,
    table,
    write_out,
)
from prompt_tool.cli.flag_commands import flag_app
from prompt_tool.cli.migrate_commands import backfill_app, verify_command
from prompt_tool.cli.readiness_commands import rehearse_command, status_command
from prompt_tool.cli.transfer_commands import export_command, restore_command
from prompt_tool.db import schema
from prompt_tool.db.url import resolve_url
from prompt_tool.migrate import (
    FingerprintOptions,
    LegacyFingerprint,
    SampleDataOptions,
    commands,
)

app = new_app(
    "Move prompt-tool deployments to orchestration templates, safely and reversibly.",
    completion=True,
)
db_app = new_app(
    "The schema history: upgrade, downgrade, stamp, current, history, heads, show, check."
)
app.add_typer(db_app, name="db")
app.add_typer(flag_app, name="flag")
app.command("export")(export_command)
app.command("restore")(restore_command)
app.add_typer(backfill_app, name="backfill")
app.command("verify")(verify_command)
app.command("status")(status_command)
app.command("rehearse")(rehearse_command)

RevisionArgument = Annotated[
    str, typer.Argument(help="Target revision (id, head, base, -1, +1, ...).")
]
# `db downgrade -1` as Alembic users type it: a relative revision is an argument, not an option.
_REVISION_FORMS = {"ignore_unknown_options": True}
SqlOption = Annotated[
    bool,
    typer.Option(
        "--sql",
        help="Print the SQL instead of running it (Alembic's offline mode), for the dialect of "
        "--db; nothing connects. The revision is a range FROM:TO (e.g. 0001:0002).",
    ),
]


def _print_sql(sql: str, revisions: str, as_json: bool) -> None:
    """The offline script, verbatim (never through Rich: markup would eat [brackets])."""
    if as_json:
        emit({"revisions": revisions, "sql": sql}, as_json=True, render=str)
        return
    write_out(sql if sql.endswith("\n") else sql + "\n")


def _describe(state: schema.SchemaState) -> str:
    if state.previous == state.current:
        return f"{state.database}: at {state.current or 'no revision'} (head {state.head})"
    lines = [
        f"{state.database}: {state.previous or 'empty'} -> {state.current or 'empty'} "
        f"(head {state.head})"
    ]
    if state.removed:
        removed = ", ".join(f"{table} {rows:,}" for table, rows in state.removed.items())
        lines.append(f"rows the new system had written, removed: {removed}")
    if state.dropped:
        dropped = ", ".join(f"{table} {rows:,}" for table, rows in state.dropped.items())
        lines.append(
            f"this deployment's own state, dropped with its tables (not archived): {dropped}; "
            "after a re-upgrade, grant roles and set flags again"
        )
    if state.archive is not None:
        lines.append(
            f"what people made is archived in {state.archive}: after `db upgrade`, "
            f"`orch-migrate restore --from {state.archive}` brings it back"
        )
    elif state.discarded:
        lines.append("what people made was discarded, as asked (--discard-user-templates)")
    return "\n".join(lines)


@db_app.command("upgrade", context_settings=_REVISION_FORMS)
def db_upgrade(
    revision: RevisionArgument = schema.HEAD,
    sql: SqlOption = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upgrade the schema (default: to head). Online-safe on PostgreSQL. With --sql, print the
    SQL for a DBA to review instead (FROM:TO; a bare TO starts from an empty database)."""
    if sql:
        _print_sql(schema.upgrade_sql(resolve_url(db, create=True), revision), revision, as_json)
        return
    emit(schema.upgrade(resolve_url(db, create=True), revision), as_json=as_json, render=_describe)


@db_app.command("downgrade", context_settings=_REVISION_FORMS)
def db_downgrade(
    revision: RevisionArgument = "-1",
    archive: Annotated[
        Path | None,
        typer.Option(
            "--archive",
            metavar="DIR",
            help="Write what people made with templates (templates, labels, audit, A/B tests "
            "of templates, sessions' links) to this new directory first; `restore --from DIR` "
            "brings it back after a re-upgrade.",
        ),
    ] = None,
    discard_user_templates: Annotated[
        bool,
        typer.Option(
            "--discard-user-templates", help="Drop what people made with templates, unarchived."
        ),
    ] = False,
    drop_legacy_tables: Annotated[
        bool,
        typer.Option(
            "--i-understand-this-drops-legacy-tables",
            help="Allow going below 0001 (base), which drops every legacy table and its rows.",
        ),
    ] = False,
    sql: SqlOption = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Step the schema back (default: one revision). Legacy rows stay byte for byte as they were
    before the upgrade; what the new system wrote is taken back out. With --sql FROM:TO, print
    the schema steps as SQL instead (no archive, no rows taken back: see the script's note)."""
    if sql:
        if archive is not None or discard_user_templates:
            fail(
                "--sql prints the schema steps only; --archive and --discard-user-templates "
                "need the online downgrade (run `orch-migrate export DIR` before the script)",
                2,
            )
        _print_sql(
            schema.downgrade_sql(
                resolve_url(db, create=True), revision, drop_legacy_tables=drop_legacy_tables
            ),
            revision,
            as_json,
        )
        return
    emit(
        schema.downgrade(
            resolve_url(db),
            revision,
            archive=archive,
            discard_user_templates=discard_user_templates,
            drop_legacy_tables=drop_legacy_tables,
        ),
        as_json=as_json,
        render=_describe,
    )


@db_app.command("check")
def db_check(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Exit 1 if the schema differs from what its recorded revision holds (an interrupted
    step), saying what to run."""
    result = schema.check(resolve_url(db))
    emit(
        result,
        as_json=as_json,
        render=lambda r: "\n".join(
            [f"{r.database}: at {r.current or 'no revision'} (head {r.head})"]
            + (r.drift or ["the schema holds exactly what its revision says"])
        ),
    )
    if not result.consistent:
        fail(f"the schema differs from revision {result.current}: {result.drift[0]}", 1)


@db_app.command("stamp")
def db_stamp(
    revision: RevisionArgument,
    purge: Annotated[
        bool,
        typer.Option(
            "--purge",
            help="Empty alembic_version first: records REVISION over one this prompt-tool does "
            "not know (a newer one upgraded the database) or over several. Only if you know the "
            "schema matches REVISION.",
        ),
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Record a revision without running it (adopt a database that has the legacy tables)."""
    emit(
        schema.stamp(resolve_url(db, create=True), revision, purge=purge),
        as_json=as_json,
        render=_describe,
    )


@db_app.command("current")
def db_current(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Show the revision the database is at; exit 1 if this prompt-tool does not know it."""
    state = schema.current(resolve_url(db))
    emit(state, as_json=as_json, render=_describe)
    if state.problem is not None:
        fail(state.problem, 1)


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


@db_app.command("heads")
def db_heads(as_json: JsonOption = False) -> None:
    """Show the head revision(s) of the schema history."""
    emit(
        schema.heads(),
        as_json=as_json,
        render=lambda revisions: "\n".join(
            f"{r.revision} (head): {r.description}" for r in revisions
        ),
    )


@db_app.command("show")
def db_show(
    revision: Annotated[str, typer.Argument(help="A revision id (or a unique prefix), or head.")],
    as_json: JsonOption = False,
) -> None:
    """Show one revision: what it does, what it revises, and its script."""
    emit(
        schema.show(revision),
        as_json=as_json,
        render=lambda r: Text(
            "\n".join(
                [
                    f"Rev: {r.revision}{' (head)' if r.is_head else ''}",
                    f"Parent: {r.down_revision or '<base>'}",
                    f"Path: {r.path}",
                    "",
                    *(f"    {line}".rstrip() for line in r.doc.splitlines()),
                ]
            )
        ),
    )


@db_app.command("alembic-ini")
def db_alembic_ini(as_json: JsonOption = False) -> None:
    """Print the path of an alembic.ini for the plain `alembic` CLI, e.g.
    alembic -c "$(orch-migrate db alembic-ini)" upgrade head."""
    path = str(schema.alembic_ini())
    if as_json:
        emit({"alembic_ini": path}, as_json=True, render=str)
        return
    write_out(path + "\n")


def _compared(result: LegacyFingerprint, name: str) -> str:
    """How a table compares with the saved fingerprint: ``same``, ``same, +3 new``, ``CHANGED``."""
    verdict = "CHANGED" if name in (result.changed or ()) else "same"
    added = (result.added or {}).get(name)
    return f"{verdict}, +{added:,} new" if added else verdict


def _render_fingerprint(result: LegacyFingerprint) -> Table:
    against = result.changed is not None
    columns = ["table", "rows", "max id", "sha256"] + (["vs saved"] if against else [])
    shown = table(
        "Legacy tables",
        columns,
        [
            (t.table, f"{t.rows:,}", "" if t.max_id is None else f"{t.max_id:,}", t.sha256[:16])
            + ((_compared(result, t.table),) if against else ())
            for t in result.tables
        ],
    )
    whole = [t.table for t in result.tables if against and t.table not in (result.added or {})]
    if whole:
        shown.caption = literal(
            f"compared whole, the saved fingerprint records no max id for them: "
            f"{', '.join(whole)} (rows added since count as differences there)",
            style="table.caption",
        )
        shown.caption_justify = "left"
    return shown


@app.command("fingerprint")
def fingerprint(
    against: Annotated[
        Path | None,
        typer.Option(
            "--against",
            metavar="FILE",
            help="A fingerprint saved earlier with --json: exit 1 if any legacy row that existed "
            "then changed or vanished; rows added since are counted, not failed.",
        ),
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Row count, highest id and sha256 of every legacy table: compare before and after any
    schema change."""
    result = commands.fingerprint(resolve_url(db), FingerprintOptions(against=against))
    emit(result, as_json=as_json, render=_render_fingerprint)
    if result.changed:
        whole = [name for name in result.changed if name not in (result.added or {})]
        why = (
            "compared whole: the file records no highest ids, so rows added since count too"
            if whole
            else "rows that existed when it was taken changed or vanished"
        )
        fail(f"legacy tables differ from {against}: {', '.join(result.changed)} ({why})", 1)


@app.command("sample-data")
def sample_data(
    sessions: Annotated[int, typer.Option(min=0, help="How many sessions to create.")] = 200,
    projects: Annotated[int, typer.Option(min=1, help="Spread over this many projects.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same data.")] = 7,
    force: Annotated[
        bool,
        typer.Option("--force", help="Add the sample even to a database that already holds data."),
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Load a realistic legacy data set into an empty database: for demos, rehearsals and trying
    things on scratch (refused, exit 2, where data already is, unless --force)."""
    emit(
        commands.sample_data(
            resolve_url(db),
            SampleDataOptions(sessions=sessions, projects=projects, seed=seed, force=force),
        ),
        as_json=as_json,
        render=lambda loaded: (
            f"loaded {loaded.projects} projects, {loaded.prompts} prompts, "
            f"{loaded.sessions} sessions into {loaded.database}"
        ),
    )


def main() -> None:
    run(app)
