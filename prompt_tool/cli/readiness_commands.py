"""`orch-migrate status` and `orch-migrate rehearse`.

Mounted by the main app::

    app.command("status")(status_command)
    app.command("rehearse")(rehearse_command)

Each parses its options, calls one command of :mod:`prompt_tool.migrate.commands` and prints
the result as a table or, with ``--json``, as the same data in JSON. A rehearsal that found a
difference prints its report first, then exits 1 with one line on stderr: the step that stopped
it and why (a statement or lock timeout is reported as one, never as a difference), and the
steps that found differences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.text import Text

from prompt_tool.ab_testing import LegacyABTest
from prompt_tool.cli._runtime import DbOption, JsonOption, emit, fail, opened_engine, table
from prompt_tool.cli.run_view import REFRESH_S, backfills_table, watch
from prompt_tool.db.url import resolve_url
from prompt_tool.flags.config import require_flagd_file
from prompt_tool.migrate import (
    RehearsalReport,
    RehearseOptions,
    StatusOptions,
    StatusReport,
    commands,
)
from prompt_tool.migrate.backfill.observe import check_metrics_path, write_metrics
from prompt_tool.migrate.rehearse import LOCK_TIMEOUT, STATEMENT_TIMEOUT
from prompt_tool.migrate.status import LastRun

__all__ = ["rehearse_command", "status_command"]


def _run(run: LastRun | None) -> str:
    return "-" if run is None else run.describe()


def _legacy_ab_notice(tests: Sequence[LegacyABTest]) -> list[str]:
    """The legacy A/B tests in a few lines: the same test in many projects (as a sample data
    set or a rollout makes them) is one line naming the projects, and what to do is said once."""
    if not tests:
        return []
    groups: dict[tuple[str, str, str, int], list[LegacyABTest]] = {}
    for test in tests:  # already in project order
        groups.setdefault((test.name, test.status, test.prompt_name, test.variants), []).append(
            test
        )
    lines = []
    for (name, test_status, prompt_name, variants), same in groups.items():
        where = ", ".join(f"{test.project} (test {test.id})" for test in same)
        noun = "project" if len(same) == 1 else f"{len(same)} projects"
        lines.append(
            f"legacy A/B test {name!r} ({test_status}) of orchestration prompt {prompt_name!r} "
            f"({variants} variants) in {noun}: {where}"
        )
    lines.append(
        "`prompt-tool ab` cannot run legacy A/B tests of orchestration prompts: recreate "
        + ("it" if len(tests) == 1 else "each")
        + " on the imported template its prompt became with `prompt-tool ab create`"
    )
    return lines


def _render_status(report: StatusReport) -> Any:
    at = report.revision or "no revision"
    behind = "" if report.revision == report.head else f" (head is {report.head})"
    if report.problem is not None:  # said on stderr, as the error line
        return Text(f"{report.database} at revision {at}{behind}")
    # Shown only where there is any: text that is not valid UTF-8 (SQLite) is rare.
    unreadable = any(p.unreadable for p in report.projects)
    quarantined = any(p.quarantined for p in report.projects)
    rows = [
        (
            p.project,
            p.sessions,
            p.migrated,
            p.unmigrated,
            p.stale,
            *((p.unreadable,) if unreadable else ()),
            *((p.quarantined,) if quarantined else ()),
            f"{p.flag} ({p.flag_source})",
            _run(p.last_export),
            _run(p.last_backfill),
            _run(p.last_verify),
            "yes" if p.readiness.ready else "no",
        )
        for p in report.projects
    ]
    lines = [
        Text(
            f"{p.project}: "
            + (
                "ready for templates"
                if p.readiness.ready
                else "not ready for templates: " + "; ".join(p.readiness.reasons)
            ),
            style="" if p.readiness.ready else "yellow",
        )
        for p in report.projects
    ]
    lines += [
        Text(f"{p.project}: quarantined {reason}", style="yellow")
        for p in report.projects
        for reason in p.quarantine_reasons
    ]
    lines += [Text(line, style="yellow") for line in _legacy_ab_notice(report.legacy_ab_tests)]
    runs = []
    if report.runs:
        runs.append(
            table(
                "latest runs",
                ["run", "kind", "scope", "state", "started", "by", "why"],
                [
                    (
                        f"#{run.id}",
                        run.kind,
                        run.scope,
                        run.state,
                        f"{run.started_at:%Y-%m-%d %H:%M:%S}" if run.started_at else "-",
                        run.started_by or "-",
                        run.reason,
                    )
                    for run in report.runs
                ],
            )
        )
    if report.backfills:
        runs.append(backfills_table(report.backfills))
    return Group(
        Text(f"{report.database} at revision {at}{behind}"),
        table(
            None,
            [
                "project",
                "sessions",
                "migrated",
                "unmigrated",
                "stale",
                *(("unreadable",) if unreadable else ()),
                *(("quarantined",) if quarantined else ()),
                "flag",
                "last export",
                "last backfill",
                "last verify",
                "ready",
            ],
            rows,
        ),
        *lines,
        *runs,
    )


def status_command(
    project: Annotated[
        list[str] | None,
        typer.Option("--project", "-p", metavar="SLUG", help="Only this project (repeatable)."),
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
    watch_runs: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Follow the running and latest backfills (done/total, rows/s, ETA range, batch "
            "size, why a run waits, lock hold, errors) until Ctrl-C: a live table on a terminal, "
            "a line per refresh through a pipe, a JSON object per line with --json.",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, metavar="SECONDS", help="--watch refresh.")
    ] = REFRESH_S,
    metrics_file: Annotated[
        str | None,
        typer.Option(
            "--metrics-file",
            metavar="PATH",
            help="Write the backfills' figures to PATH in the Prometheus text format (for "
            "node_exporter's textfile collector), atomically, at every refresh.",
        ),
    ] = None,
) -> None:
    """Where the move stands per project (sessions migrated, flag, last runs) and whether each
    may be switched to templates."""
    if metrics_file is not None:
        check_metrics_path(metrics_file)
    if watch_runs:
        with opened_engine(db) as engine:
            watch(engine, interval_s=interval, as_json=as_json, metrics_file=metrics_file)
        return
    require_flagd_file()  # a configured flag file that is not there fails here, not silently
    with opened_engine(db) as engine:
        report = commands.status(engine, StatusOptions(projects=project or ()))
    if metrics_file is not None:
        write_metrics(metrics_file, report.backfills)
    emit(report, as_json=as_json, render=_render_status)
    if report.problem is not None:
        fail(report.problem, 1)


def _render_rehearsal(report: RehearsalReport) -> Any:
    if report.source is not None:
        where = f"a scratch copy ({report.database}) of {report.source}"
    else:
        where = report.database
    mode = "in one transaction, rolled back" if report.rollback else "with real writes"
    result = table(
        f"Rollback rehearsal on {where}, {mode}",
        ["step", "ok", "seconds", "details"],
        [
            (step.name, "ok" if step.ok else "FAILED", f"{step.duration_s:.2f}", step.details)
            for step in report.steps
        ],
    )
    differences = [
        Text(f"{step.name}: {difference}", style="red")
        for step in report.steps
        for difference in step.differences
    ]
    verdict = (
        f"rehearsal passed in {report.elapsed_s:.1f}s; the database is at revision "
        f"{report.end_revision}, where it started"
        if report.passed
        else f"rehearsal FAILED; the database is at revision {report.end_revision}"
    )
    notes = []
    if report.archive is not None:
        notes.append(
            Text(
                f"the downgrade's archive is kept in {report.archive}: what it holds is not in the "
                f"database; after `orch-migrate db upgrade`, `orch-migrate restore --from "
                f"{report.archive}` brings it back",
                style="yellow",
            )
        )
    return Group(result, *differences, *notes, Text(verdict))


def rehearse_command(
    rollback: Annotated[
        bool,
        typer.Option(
            "--rollback",
            help="Run everything in one transaction and roll it back: the database is left "
            "exactly as it was.",
        ),
    ] = False,
    scratch: Annotated[
        str | None,
        typer.Option(
            "--scratch",
            metavar="URL",
            help="Copy the database into this empty one (same kind) and rehearse there; the "
            "source is only read.",
        ),
    ] = None,
    sessions: Annotated[
        int, typer.Option("--sessions", min=0, help="Sessions to create through templates.")
    ] = 3,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Rehearse the rollback: upgrade, backfill, verify, new sessions, downgrade -1, legacy data
    checked row for row, upgrade, verify; exit 1 on any difference."""
    # By URL: the rehearsal opens its own engines (one per step, a scratch copy's).
    report = commands.rehearse(
        resolve_url(db),
        RehearseOptions(rollback=rollback, scratch=scratch, sessions_to_create=sessions),
    )
    emit(report, as_json=as_json, render=_render_rehearsal)
    if not report.passed:
        fail(_failure(report), 1)


def _failure(report: RehearsalReport) -> str:
    """One line: the step that stopped the rehearsal and why (a timeout is a timeout, not a
    difference), then the steps that found differences, each with what differs, e.g.
    ``legacy_intact (orchestration_sessions)``."""
    parts = []
    for step in report.failures():
        if step.stopped_by in (STATEMENT_TIMEOUT, LOCK_TIMEOUT):
            parts.append(f"step {step.name} {step.details}")  # "timed out: ..."
        elif step.stopped_by is not None:
            parts.append(f"step {step.name} failed: {step.details}")
    found = []
    for step in report.failures():
        if step.stopped_by is None:
            what = list(dict.fromkeys(d.split(":", 1)[0] for d in step.differences))
            found.append(f"{step.name} ({', '.join(what)})" if what else step.name)
    if found:
        parts.append(f"the rehearsal found differences: {', '.join(found)}")
    return "; ".join(parts) or "the rehearsal failed"
