"""`orch-migrate status` shows the backfills (`--json` gains a ``backfills`` key, every other key
as before); `status --watch` follows them until Ctrl-C ends it quietly (exit 0): a live table in
a terminal, one plain line per refresh through a pipe, a JSON object per line with ``--json``;
``--metrics-file`` writes the Prometheus text file, and a path it cannot write is refused in one
line. Stored text (a scope, a throttle reason) is shown literally, never read as markup."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from prompt_tool.cli.orch_migrate import app
from prompt_tool.cli.run_view import duration, eta_text, progress_detail, view_line
from prompt_tool.migrate.backfill.types import BackfillProgress
from tests.cli.test_signals import ORCH_MIGRATE, in_terminal
from tests.cli_run import run_cli
from tests.migrate.test_backfill_observe import _here, _live, _run, _steady, _view

_REASON = "throttle query [bold]said so[/bold] [link=x]"
_SCOPE = "[red]acme[/red]"
_OLD_KEYS = {
    "database",
    "revision",
    "head",
    "templates_schema",
    "projects",
    "legacy_ab_tests",
    "runs",
    "problem",
}


@pytest.fixture
def watched(head_db_url: str, engine_for: Any) -> tuple[str, int]:
    """A database at head with a live backfill run, throttled, 600 of 1,000 done."""
    engine: Engine = engine_for(head_db_url)
    with engine.begin() as connection:
        run_id = _run(
            connection,
            params=_here(scope=_SCOPE),
            summary=_live(state="throttled", reason=_REASON, done=600, total=1000),
        )
        _steady(connection, run_id, [0.1] * 5)
    return head_db_url, run_id


def test_status_json_keeps_its_keys_and_adds_the_backfills(watched: tuple[str, int]) -> None:
    url, run_id = watched
    code, out, err = run_cli(app, ["orch-migrate", "status", "--json", "--db", url])
    assert code == 0, err
    report = json.loads(out)
    assert set(report) >= _OLD_KEYS
    [backfill] = report["backfills"]
    assert backfill["run_id"] == run_id
    assert (backfill["done"], backfill["total"]) == (600, 1000)
    assert backfill["activity"] == "throttled" and backfill["throttle_reason"] == _REASON
    assert backfill["eta_note"] == "ETA excludes waiting"
    assert {"rows_per_second", "eta_low_s", "eta_high_s", "hold_p50_ms", "hold_p99_ms"} <= set(
        backfill
    )


def test_status_shows_the_backfills_table_literally(watched: tuple[str, int]) -> None:
    url, run_id = watched
    code, out, err = run_cli(app, ["orch-migrate", "status", "--db", url])
    assert code == 0, err
    assert f"#{run_id}" in out and _SCOPE in out
    assert "[bold]said" in out and "so[/bold] [link=x]" in out  # wrapped in its column


def _watch(url: str, *extra: str) -> list[str]:
    return [ORCH_MIGRATE, "status", "--watch", "--interval", "0.2", "--db", url, *extra]


def _lines_then_interrupt(argv: list[str], wanted: int) -> tuple[int, list[str], str]:
    """Run ``argv`` through pipes, wait for ``wanted`` lines, then send SIGINT (Ctrl-C)."""
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ}
    )
    assert process.stdout is not None and process.stderr is not None
    received = b""
    deadline = time.monotonic() + 60
    while received.count(b"\n") < wanted:
        assert time.monotonic() < deadline, received
        assert process.poll() is None, process.stderr.read()
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            received += os.read(process.stdout.fileno(), 65536)
    process.send_signal(signal.SIGINT)
    rest, err = process.communicate(timeout=60)
    lines = (received + rest).decode().splitlines()
    return process.returncode, lines, err.decode()


def test_status_watch_through_a_pipe_prints_a_plain_line_per_refresh_until_ctrl_c(
    watched: tuple[str, int],
) -> None:
    url, run_id = watched
    code, lines, err = _lines_then_interrupt(_watch(url), 2)
    assert code == 0, err
    assert err == ""  # no traceback, no "interrupted" line: Ctrl-C is how a watch ends
    assert len(lines) >= 2
    for line in lines:
        assert "\x1b[" not in line
        assert f"backfill #{run_id} {_SCOPE} throttled: {_REASON}" in line
        assert "600/1,000 sessions" in line and "ETA excludes waiting" in line


def test_status_watch_json_prints_one_object_per_refresh(watched: tuple[str, int]) -> None:
    url, run_id = watched
    code, lines, err = _lines_then_interrupt(_watch(url, "--json"), 2)
    assert code == 0, err
    for line in lines:
        [backfill] = json.loads(line)["backfills"]
        assert backfill["run_id"] == run_id


def test_status_watch_writes_the_metrics_file(watched: tuple[str, int], tmp_path: Path) -> None:
    url, run_id = watched
    target = tmp_path / "backfill.prom"
    code, _, err = _lines_then_interrupt(_watch(url, "--metrics-file", str(target)), 1)
    assert code == 0, err
    assert f'prompt_tool_backfill_sessions_done{{run="{run_id}",' in target.read_text()


def test_status_in_a_terminal_draws_a_live_table_and_ctrl_c_ends_it_with_exit_0(
    watched: tuple[str, int],
) -> None:
    url, run_id = watched
    ran = in_terminal(
        _watch(url),
        send=signal.SIGINT,
        when=lambda screen: screen.count("refreshing every") >= 2,
        whole_group=True,
    )
    assert ran.returncode == 0, ran.screen[-3000:]
    assert "Traceback" not in ran.screen and "interrupted" not in ran.screen
    assert f"#{run_id}" in ran.screen and "[red]acme[/red]" in ran.screen
    assert "[bold]said" in ran.screen and "600/1,000" in ran.screen


def test_a_metrics_file_in_a_missing_directory_is_refused_in_one_line(
    watched: tuple[str, int], tmp_path: Path
) -> None:
    url, _ = watched
    missing = tmp_path / "nowhere" / "backfill.prom"
    code, _, err = run_cli(
        app, ["orch-migrate", "status", "--watch", "--metrics-file", str(missing), "--db", url]
    )
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: --metrics-file {missing}: directory {missing.parent} does not exist"
    ]


def test_a_view_reads_as_one_line_with_its_eta_range() -> None:
    view = _view(eta_s=125.0, eta_low_s=100.0, eta_high_s=190.0)
    assert eta_text(view) == "ETA 2:05 (1:40-3:10)"
    assert duration(3725) == "1:02:05"
    line = view_line(view)
    assert line.startswith("backfill #12 acme working; 300/600 sessions; 150 rows/s; ETA 2:05")
    assert "lock hold p50 12 ms, p99 40 ms" in line


def test_the_progress_bar_shows_what_status_watch_shows() -> None:
    progress = BackfillProgress(
        done=300,
        total=600,
        batches=3,
        elapsed_s=10.0,
        state="paused",
        reason="paused by ops@host",
        batch_size=200,
        run_id=12,
        waited_s=4.0,
        quarantined=1,
    )
    alone = progress_detail(progress, None)
    # Why it waits first: a narrow terminal cuts the end of the line off.
    assert alone == (
        "paused: paused by ops@host, 50 rows/s, ETA 0:06, ETA excludes waiting, batch 200, "
        "quarantined 1"
    )
    seen = progress_detail(progress, _view(eta_s=2.0, eta_low_s=1.0, eta_high_s=4.0))
    assert seen == (
        "paused: paused by ops@host, 150 rows/s, ETA 0:02 (0:01-0:04), batch 200, "
        "lock hold p50 12 ms, p99 40 ms, quarantined 2"
    )


_BAR_SCRIPT = """
from prompt_tool.cli.run_view import backfill_progress
from prompt_tool.migrate.backfill.types import BackfillProgress

with backfill_progress(True) as update:
    for done in (100, 200, 300):
        update(BackfillProgress(done, 600, done // 100, done / 100, state="throttled",
                                reason="lag [bold]2,400 ms[/bold]", batch_size=100))
    print("drawn")
"""


def test_the_progress_bar_draws_its_figures_literally_in_a_terminal() -> None:
    ran = in_terminal([sys.executable, "-c", _BAR_SCRIPT], when=lambda screen: True)
    assert ran.returncode == 0, ran.screen
    assert "300/600 sessions" in ran.screen and "━" in ran.screen
    assert "throttled: lag [bold]2,400 ms[/bold]" in ran.screen
    assert "batch 100" in ran.screen and "ETA excludes waiting" in ran.screen


def test_status_without_watch_writes_the_metrics_file_once(
    watched: tuple[str, int], tmp_path: Path
) -> None:
    url, run_id = watched
    target = tmp_path / "backfill.prom"
    code, _, err = run_cli(
        app, ["orch-migrate", "status", "--metrics-file", str(target), "--db", url]
    )
    assert code == 0, err
    assert f'prompt_tool_backfill_sessions_total{{run="{run_id}",' in target.read_text()


def test_status_watch_piped_into_a_reader_that_stops_ends_quietly(
    watched: tuple[str, int],
) -> None:
    url, _ = watched
    process = subprocess.Popen(_watch(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    assert "backfill #" in process.stdout.readline().decode()
    process.stdout.close()  # as `| head -1` does
    assert process.wait(timeout=60) == 0
    assert process.stderr.read() == b""
