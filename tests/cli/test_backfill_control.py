"""`orch-migrate backfill` as a group: today's run when no subcommand is given, with the flags of
the control loop, and `pause`, `resume`, `cancel [--run ID]` for a run in another process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from prompt_tool.cli.orch_migrate import app
from prompt_tool.db import schema
from prompt_tool.db.models import MigrationRun
from prompt_tool.migrate import BackfillOptions, BackfillSummary, commands, load_legacy_sample
from prompt_tool.migrate.backfill.types import RunWindow
from prompt_tool.migrate.runs import MigrationRunStatus, RunKind, finish_run, start_run
from prompt_tool.settings import HealthLimits, get_settings
from tests.cli_run import run_cli


def _orch_migrate(*args: str) -> tuple[int, str, str]:
    return run_cli(app, ["orch-migrate", *args])


def _one_line_error(code: int, stderr: str) -> str:
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    return stderr.strip()


@pytest.fixture
def legacy_url(empty_db_url: str) -> str:
    """A small legacy deployment at head, not yet backfilled."""
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=30, projects=2, seed=5)
    schema.upgrade(empty_db_url)
    return empty_db_url


@pytest.fixture
def live_run(db_engine: Engine) -> int:
    """A backfill run marked running by this (live) process, scope acme."""
    return start_run(db_engine, RunKind.BACKFILL, params={"scope": "acme"})


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def _control(engine: Engine, run_id: int) -> Any:
    with engine.connect() as connection:
        params = connection.execute(
            select(MigrationRun.params).where(MigrationRun.id == run_id)
        ).scalar_one()
    return params.get("control")


def test_backfill_help_lists_its_subcommands_and_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")  # below about 100, Typer cuts long option names short
    code, stdout, _ = _orch_migrate("backfill", "--help")

    assert code == 0
    assert "orch-migrate backfill [OPTIONS] [pause|resume|cancel]" in stdout
    for word in ("pause", "resume", "cancel", "Commands"):
        assert word in stdout
    for flag in (
        "--batch-size",
        "--target-ms",
        "--min-batch-size",
        "--window",
        "--throttle-query",
        "--no-health-checks",
        "--max-replica-lag-ms",
        "--max-wal-mb-per-s",
        "--max-blocked-sessions",
        "--max-transaction-age-s",
        "--no-autovacuum-check",
        "--max-errors",
        "--retry-quarantined",
        "--metrics-file",
        "--estimate",
    ):
        assert flag in stdout, flag


@pytest.mark.parametrize("action", ["pause", "resume", "cancel"])
def test_each_subcommand_has_its_help(action: str) -> None:
    code, stdout, _ = _orch_migrate("backfill", action, "--help")
    assert code == 0
    assert f"orch-migrate backfill {action} [OPTIONS]" in stdout and "--run" in stdout


def test_backfill_without_a_subcommand_still_runs_a_backfill(legacy_url: str) -> None:
    code, stdout, stderr = _orch_migrate(
        "backfill", "--project", "project-1", "--db", legacy_url, "--json"
    )

    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["projects"] == ["project-1"] and summary["references_created"] > 0


def test_an_unknown_word_after_backfill_is_a_usage_error() -> None:
    code, _, stderr = _orch_migrate("backfill", "stop")
    assert code == 2
    assert "No such command 'stop'" in stderr and "Traceback" not in stderr


def test_pause_resume_and_cancel_ask_the_live_run_and_say_what_happens(
    db_engine: Engine, live_run: int
) -> None:
    url = _url(db_engine)

    code, stdout, stderr = _orch_migrate("backfill", "pause", "--db", url)
    assert (code, stderr) == (0, "")
    assert stdout == (
        f"backfill run {live_run} (scope acme) will pause before its next batch; "
        "`orch-migrate backfill resume` carries on\n"
    )
    assert _control(db_engine, live_run)["request"] == "pause"

    code, stdout, _ = _orch_migrate("backfill", "resume", "--run", str(live_run), "--db", url)
    assert code == 0
    assert stdout == f"backfill run {live_run} (scope acme) resumes with its next batch\n"
    assert _control(db_engine, live_run)["request"] == "resume"

    code, stdout, _ = _orch_migrate("backfill", "resume", "--db", url)
    assert code == 0 and "is not paused" in stdout

    code, stdout, _ = _orch_migrate("backfill", "cancel", "--db", url)
    assert code == 0 and "will stop before its next batch, cancelled" in stdout
    assert _control(db_engine, live_run)["request"] == "cancel"


def test_the_database_may_be_given_before_the_subcommand(db_engine: Engine, live_run: int) -> None:
    code, stdout, stderr = _orch_migrate("backfill", "--db", _url(db_engine), "pause")

    assert code == 0, stderr
    assert f"backfill run {live_run}" in stdout
    assert _control(db_engine, live_run)["request"] == "pause"


def test_a_request_as_json(db_engine: Engine, live_run: int) -> None:
    code, stdout, _ = _orch_migrate("backfill", "cancel", "--db", _url(db_engine), "--json")

    assert code == 0
    outcome = json.loads(stdout)
    assert (outcome["run_id"], outcome["action"], outcome["scope"], outcome["recorded"]) == (
        live_run,
        "cancel",
        "acme",
        True,
    )


def test_no_live_backfill_is_one_line_exit_2(db_engine: Engine) -> None:
    code, _, stderr = _orch_migrate("backfill", "pause", "--db", _url(db_engine))

    assert _one_line_error(code, stderr) == (
        "error: no backfill is running; `orch-migrate status` lists the runs"
    )


def test_a_finished_run_is_one_line_exit_2(db_engine: Engine, live_run: int) -> None:
    finish_run(db_engine, live_run, MigrationRunStatus.COMPLETED)

    code, _, stderr = _orch_migrate(
        "backfill", "pause", "--run", str(live_run), "--db", _url(db_engine)
    )

    line = _one_line_error(code, stderr)
    assert line.startswith(f"error: run {live_run} completed at ")
    assert line.endswith("; nothing to pause")


def test_several_live_runs_ask_for_run(db_engine: Engine, live_run: int) -> None:
    other = start_run(db_engine, RunKind.BACKFILL, params={"scope": "beta"})

    code, _, stderr = _orch_migrate("backfill", "cancel", "--db", _url(db_engine))

    assert _one_line_error(code, stderr) == (
        f"error: 2 backfill runs are live ({live_run}: acme, {other}: beta): pass --run ID"
    )


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[BackfillOptions]]:
    """The options `orch-migrate backfill` hands the library (the run itself is not made)."""
    seen: list[BackfillOptions] = []

    def backfill(engine: Any, options: BackfillOptions, **_: Any) -> BackfillSummary:
        seen.append(options)
        return BackfillSummary(None, options.dry_run, [], 0)

    monkeypatch.setattr(commands, "backfill", backfill)
    (tmp_path / "x.db").touch()
    monkeypatch.setenv("PROMPT_TOOL_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    get_settings.cache_clear()
    yield seen
    get_settings.cache_clear()


def test_the_control_loop_flags_reach_the_options(captured: list[BackfillOptions]) -> None:
    code, _, stderr = _orch_migrate(
        "backfill",
        "--target-ms",
        "350",
        "--min-batch-size",
        "20",
        "--window",
        "22:00-06:00",
        "--throttle-query",
        "SELECT busy FROM ops.status",
        "--max-errors",
        "7",
        "--retry-quarantined",
        "--metrics-file",
        "/tmp/backfill.prom",
    )

    assert code == 0, stderr
    options = captured[0]
    assert (options.target_batch_ms, options.min_batch_size) == (350, 20)
    assert options.window == RunWindow.parse("22:00-06:00")
    assert options.throttle_query == "SELECT busy FROM ops.status"
    assert (options.max_errors, options.retry_quarantined) == (7, True)
    assert options.metrics_file == "/tmp/backfill.prom"
    # No health flag given: the run reads the settings itself.
    assert options.health is None and options.health_checks


def test_health_flags_override_the_settings_and_keep_the_rest(
    captured: list[BackfillOptions], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMPT_TOOL_BACKFILL_MAX_TRANSACTION_AGE_S", "off")
    get_settings.cache_clear()

    code, _, stderr = _orch_migrate(
        "backfill",
        "--max-replica-lag-ms",
        "800",
        "--max-wal-mb-per-s",
        "16",
        "--max-blocked-sessions",
        "3",
        "--no-autovacuum-check",
    )

    assert code == 0, stderr
    assert captured[0].health == HealthLimits(
        replica_lag_ms=800,
        wal_bytes_per_s=16 * 1024 * 1024,
        autovacuum=False,
        blocked_sessions=3,
        transaction_age_s=None,  # `off` in the environment stays off
    )


def test_no_health_checks_turns_them_off(captured: list[BackfillOptions]) -> None:
    code, _, stderr = _orch_migrate("backfill", "--no-health-checks")
    assert code == 0, stderr
    assert captured[0].health_checks is False


@pytest.mark.parametrize("window", ["25:00-06:00", "22:00", "22:00-22:00", "nightly"])
def test_a_bad_window_is_one_line_exit_2(captured: list[BackfillOptions], window: str) -> None:
    code, _, stderr = _orch_migrate("backfill", "--window", window)

    assert f"--window {window!r}" in _one_line_error(code, stderr)
    assert not captured


class _Projection:
    def describe(self) -> str:
        return "estimate: about 3 minutes"


def test_estimate_projects_instead_of_running(
    captured: list[BackfillOptions], monkeypatch: pytest.MonkeyPatch
) -> None:
    estimated: list[BackfillOptions] = []

    def estimate_backfill(engine: Any, options: BackfillOptions) -> _Projection:
        estimated.append(options)
        return _Projection()

    monkeypatch.setattr(commands, "estimate_backfill", estimate_backfill)

    code, stdout, stderr = _orch_migrate("backfill", "--estimate", "--batch-size", "500")

    assert code == 0, stderr
    assert stdout == "estimate: about 3 minutes\n"
    assert [options.batch_size for options in estimated] == [500]
    assert not captured  # nothing ran
