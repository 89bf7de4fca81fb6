"""The ledger after an interruption: a run stopped by Ctrl-C or SIGTERM (a KeyboardInterrupt
where the command is) is marked ``interrupted`` with its end time, and the next run carries on;
a run whose process is gone while it is still marked running shows as ``dead`` (and is recorded
as ``abandoned`` by the next run to start); status
sorts projects naturally and says the legacy A/B notice once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text, update

from prompt_tool.cli.orch_migrate import app
from prompt_tool.db import schema
from prompt_tool.db.models import MigrationRun
from prompt_tool.migrate import load_legacy_sample
from prompt_tool.migrate.backfill import BackfillOptions, BackfillProgress, backfill
from prompt_tool.migrate.export import export
from prompt_tool.migrate.runs import MigrationRunStatus, RunKind, finish_run, start_run
from prompt_tool.migrate.status import natural_key, status
from tests.cli_run import run_cli
from tests.migrate.test_backfill import _state, unlink_everything


def _run_row(engine: Engine, run_id: int) -> tuple[Any, ...]:
    with engine.connect() as connection:
        row = connection.execute(
            text(
                "SELECT status, finished_at IS NOT NULL, params, error FROM migration_runs "
                "WHERE id = :id"
            ),
            {"id": run_id},
        ).one()
    params = json.loads(row.params) if isinstance(row.params, str) else row.params
    return (row.status, row[1], params, row.error)


def _interrupt_after(batches: int) -> Any:
    def progress(update: BackfillProgress) -> None:
        if update.batches >= batches:
            raise KeyboardInterrupt

    return progress


@pytest.mark.parametrize("workers", [1, 2])
def test_an_interrupted_backfill_is_marked_interrupted_and_the_next_run_ends_where_one_run_ends(
    legacy_engine: Engine, workers: int
) -> None:
    backfill(legacy_engine)
    expected = _state(legacy_engine)
    unlink_everything(legacy_engine)

    with pytest.raises(KeyboardInterrupt):
        backfill(
            legacy_engine,
            BackfillOptions(batch_size=40, workers=workers),
            progress=_interrupt_after(3),
        )

    with legacy_engine.connect() as connection:
        run_id = connection.execute(text("SELECT max(id) FROM migration_runs")).scalar_one()
    status_, finished, params, error = _run_row(legacy_engine, run_id)
    assert (status_, finished, error) == (MigrationRunStatus.INTERRUPTED.value, True, "interrupted")
    assert params["pid"] == os.getpid() and params["host"]
    if legacy_engine.dialect.name == "postgresql":
        assert isinstance(params["backend_pid"], int)

    resumed = backfill(legacy_engine, BackfillOptions(batch_size=40, workers=workers))

    assert _state(legacy_engine) == expected
    assert resumed.sessions_scanned < 600  # it carried on, it did not start over
    assert _run_row(legacy_engine, resumed.run_id or 0)[0] == MigrationRunStatus.COMPLETED.value
    again = backfill(legacy_engine, BackfillOptions(batch_size=40, workers=workers))
    assert not again.changed
    assert again.resumed_after is None  # an interrupted run is resumed once


def test_a_run_interrupted_before_its_first_checkpoint_keeps_where_the_one_before_got_to(
    legacy_engine: Engine,
) -> None:
    with pytest.raises(KeyboardInterrupt):
        backfill(legacy_engine, BackfillOptions(batch_size=40), progress=_interrupt_after(2))
    with pytest.raises(KeyboardInterrupt):
        backfill(legacy_engine, BackfillOptions(batch_size=40), progress=_interrupt_after(0))
    third = backfill(legacy_engine, BackfillOptions(batch_size=40))
    assert third.resumed_after is not None and third.resumed_after > 0


def test_finish_run_records_an_interruption_as_interrupted(legacy_engine: Engine) -> None:
    """Callers that record every exception as a failure (verify, restore) get it right."""
    run_id = start_run(legacy_engine, RunKind.VERIFY, params={"scope": "*"})
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        finish_run(legacy_engine, run_id, MigrationRunStatus.FAILED, error="KeyboardInterrupt")
    assert _run_row(legacy_engine, run_id)[0:2] == (MigrationRunStatus.INTERRUPTED.value, True)

    failed = start_run(legacy_engine, RunKind.VERIFY, params={"scope": "*"})
    finish_run(legacy_engine, failed, MigrationRunStatus.FAILED, error="boom")
    assert _run_row(legacy_engine, failed)[0] == MigrationRunStatus.FAILED.value


def test_an_interrupted_export_is_marked_interrupted(legacy_engine: Engine, tmp_path: Path) -> None:
    def stop(table: str, done: int, total: int | None) -> None:
        assert total is not None  # every table's total is known from its first update
        if table == "orchestration_sessions" and done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export(legacy_engine, tmp_path / "export", progress=stop)

    assert not (tmp_path / "export").exists()
    with legacy_engine.connect() as connection:
        kind, status_ = connection.execute(
            text("SELECT kind, status FROM migration_runs ORDER BY id DESC LIMIT 1")
        ).one()
    assert (kind, status_) == ("export", MigrationRunStatus.INTERRUPTED.value)


def test_export_progress_has_each_tables_total_from_the_first_update(
    legacy_engine: Engine, tmp_path: Path
) -> None:
    seen: dict[str, list[tuple[int, int | None]]] = {}
    result = export(
        legacy_engine,
        tmp_path / "export",
        progress=lambda table, done, total: seen.setdefault(table, []).append((done, total)),
    )
    rows = {t.table: t.rows for t in result.tables}
    for table, updates in seen.items():
        assert updates[0] == (0, rows[table])
        assert all(total == rows[table] for _, total in updates)
        assert updates[-1][0] == rows[table]


def _dead_pid() -> int:
    """The id of a process that has ended (and was reaped)."""
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(ended.stdout)


def test_status_tells_a_dead_run_from_a_live_one(legacy_engine: Engine) -> None:
    live = start_run(legacy_engine, RunKind.BACKFILL, params={"scope": "*"})
    found = {p.project: p for p in status(legacy_engine).projects}
    assert found["project-1"].last_backfill is not None
    assert (
        found["project-1"].last_backfill.status == MigrationRunStatus.RUNNING.value
    )  # we are alive

    # The same run as a process that is gone would have left it (SIGKILL, a crash).
    with legacy_engine.begin() as connection:
        params = connection.execute(
            text("SELECT params FROM migration_runs WHERE id = :id"), {"id": live}
        ).scalar_one()
        params = params if isinstance(params, dict) else json.loads(params)
        params["pid"] = _dead_pid()
        if "backend_pid" in params or legacy_engine.dialect.name == "postgresql":
            params["backend_pid"] = 2_000_000_000  # no such backend
        connection.execute(
            update(MigrationRun).where(MigrationRun.id == live).values(params=params)
        )
    found = {p.project: p for p in status(legacy_engine).projects}
    last = found["project-1"].last_backfill
    assert last is not None and last.status == MigrationRunStatus.ABANDONED.value
    assert last.state == "dead"
    assert "dead" in last.describe()
    assert "is gone: killed or crashed" in last.reason


def test_a_live_postgresql_run_is_told_by_its_backend(
    legacy_engine: Engine, engine_for: Any
) -> None:
    if legacy_engine.dialect.name != "postgresql":
        pytest.skip("server backends are PostgreSQL's")
    holder = legacy_engine.connect()
    try:
        backend = holder.execute(text("SELECT pg_backend_pid()")).scalar_one()
        run_id = start_run(
            legacy_engine, RunKind.BACKFILL, params={"scope": "*"}, backend_pid=backend
        )
        found = {p.project: p for p in status(legacy_engine).projects}
        assert found["project-1"].last_backfill is not None
        assert found["project-1"].last_backfill.status == MigrationRunStatus.RUNNING.value
    finally:
        holder.close()
        legacy_engine.dispose()  # the backend goes away with the pool's connection
    found = {
        p.project: p
        for p in status(
            engine_for(str(legacy_engine.url.render_as_string(hide_password=False)))
        ).projects
    }
    last = found["project-1"].last_backfill
    assert last is not None and (last.id, last.status) == (
        run_id,
        MigrationRunStatus.ABANDONED.value,
    )


def test_projects_sort_naturally() -> None:
    names = ["project-10", "project-2", "project-1", "Project-3", "alpha"]
    assert sorted(names, key=natural_key) == [
        "alpha",
        "project-1",
        "project-2",
        "Project-3",
        "project-10",
    ]


@pytest.fixture
def eleven_projects_url(empty_db_url: str) -> str:
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=120, projects=11, seed=3)
    schema.upgrade(empty_db_url)
    return empty_db_url


def test_status_lists_projects_naturally_and_says_the_ab_notice_once(
    eleven_projects_url: str, engine_for: Any
) -> None:
    report = status(engine_for(eleven_projects_url))
    assert [p.project for p in report.projects] == [f"project-{n}" for n in range(1, 12)]

    code, out, _ = run_cli(app, ["orch-migrate", "status", "--db", eleven_projects_url])

    assert code == 0
    assert out.count("prompt-tool ab create") == 1
    assert out.count("legacy A/B test '") == 1  # the same test in eleven projects: one line
    assert "project-10 (test 10)" in out
    assert out.index("project-9 ") < out.index("project-10 ")


def _as_if_killed(engine: Engine, run_id: int) -> None:
    """Make ``run_id`` look as a process that is gone left it (SIGKILL, a crash)."""
    with engine.begin() as connection:
        params = connection.execute(
            text("SELECT params FROM migration_runs WHERE id = :id"), {"id": run_id}
        ).scalar_one()
        params = params if isinstance(params, dict) else json.loads(params)
        params["pid"] = _dead_pid()
        if engine.dialect.name == "postgresql":
            params["backend_pid"] = 2_000_000_000  # no such backend
        connection.execute(
            update(MigrationRun).where(MigrationRun.id == run_id).values(params=params)
        )


def test_the_next_run_records_killed_runs_as_abandoned_and_leaves_live_ones(
    legacy_engine: Engine,
) -> None:
    killed_restore = start_run(legacy_engine, RunKind.RESTORE)
    killed_backfill = start_run(legacy_engine, RunKind.BACKFILL, params={"scope": "*"})
    live = start_run(legacy_engine, RunKind.EXPORT)  # this process: alive
    for run_id in (killed_restore, killed_backfill):
        _as_if_killed(legacy_engine, run_id)

    next_run = start_run(legacy_engine, RunKind.VERIFY)

    for run_id in (killed_restore, killed_backfill):
        state, finished, _params, error = _run_row(legacy_engine, run_id)
        assert (state, finished) == (MigrationRunStatus.ABANDONED.value, True)
        assert "is gone: killed or crashed" in error
    assert _run_row(legacy_engine, live)[:2] == (MigrationRunStatus.RUNNING.value, False)
    assert _run_row(legacy_engine, next_run)[:2] == (MigrationRunStatus.RUNNING.value, False)


def test_an_abandoned_backfill_is_carried_on_by_the_next_one(legacy_engine: Engine) -> None:
    stop_after_two: list[int] = []

    def stop(progress: BackfillProgress) -> None:
        stop_after_two.append(progress.batches)
        if progress.batches == 2:
            raise SystemExit  # stops it after two committed batches

    with pytest.raises(SystemExit):
        backfill(legacy_engine, BackfillOptions(batch_size=50), progress=stop)
    with legacy_engine.begin() as connection:  # as SIGKILL leaves it: still marked running
        run_id = connection.execute(text("SELECT max(id) FROM migration_runs")).scalar_one()
        connection.execute(
            update(MigrationRun).where(MigrationRun.id == run_id).values(status="running")
        )
    _as_if_killed(legacy_engine, run_id)
    start_run(legacy_engine, RunKind.VERIFY)  # reaps it
    assert _run_row(legacy_engine, run_id)[0] == MigrationRunStatus.ABANDONED.value

    resumed = backfill(legacy_engine)

    assert resumed.resumed_after is not None and resumed.resumed_after > 0
    assert not backfill(legacy_engine).changed


def test_status_lists_the_latest_runs_live_finished_interrupted_dead_with_why(
    legacy_engine: Engine,
) -> None:
    finished = start_run(legacy_engine, RunKind.EXPORT)
    finish_run(legacy_engine, finished, MigrationRunStatus.COMPLETED)
    failed = start_run(legacy_engine, RunKind.RESTORE)
    finish_run(
        legacy_engine, failed, MigrationRunStatus.FAILED, error="checksum of sessions differs"
    )
    interrupted = start_run(legacy_engine, RunKind.BACKFILL, params={"scope": "*"})
    finish_run(legacy_engine, interrupted, MigrationRunStatus.INTERRUPTED, error="interrupted")
    dead = start_run(legacy_engine, RunKind.BACKFILL, params={"scope": "project-2"})
    _as_if_killed(legacy_engine, dead)
    # Starting it records `dead` as abandoned: shown dead all the same.
    live = start_run(legacy_engine, RunKind.VERIFY, params={"scope": "*"})

    shown = {run.id: run for run in status(legacy_engine).runs}

    assert [run.id for run in status(legacy_engine).runs][:5] == [
        live,
        dead,
        interrupted,
        failed,
        finished,
    ]
    assert (shown[live].state, shown[live].reason.startswith("running as process")) == (
        "live",
        True,
    )
    assert shown[dead].state == "dead" and "killed or crashed" in shown[dead].reason
    assert shown[dead].scope == "project-2"
    assert shown[interrupted].state == "interrupted"
    assert "Ctrl-C or SIGTERM" in shown[interrupted].reason
    assert (shown[failed].state, shown[failed].reason) == (
        "finished",
        "failed: checksum of sessions differs",
    )
    assert (shown[finished].state, shown[finished].reason) == ("finished", "completed")
