"""Ctrl-C and SIGTERM, as an operator meets them: the real `orch-migrate` in a pseudo-terminal,
the signal sent once its progress bar is on the screen (mid-run, never after a bare sleep).

Either ends in one line on stderr and exit 130 (SIGINT) or 143 (SIGTERM), with no worker
traceback; the run's ledger row says ``interrupted``; running the command again carries on and
ends exactly where an uninterrupted run ends. A run killed with SIGKILL shows as ``dead`` in
`orch-migrate status`. Progress on a terminal has a known total from its first line.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from prompt_tool.db import schema
from prompt_tool.migrate import load_legacy_sample
from tests.migrate.test_backfill import _state, unlink_everything

ORCH_MIGRATE = str(Path(sys.executable).parent / "orch-migrate")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A backfill or verify progress line: done/total sessions, the total a number (never "?").
_BAR = re.compile(r"[\d,]+/[\d,]+ sessions")
_INTERRUPTED = "error: interrupted; nothing half-written is left behind, run the command again"
_TIMEOUT_S = 120


@dataclass
class Ran:
    returncode: int
    screen: str  # everything written to the terminal, escape sequences removed

    def lines(self) -> list[str]:
        """The terminal's lines, each as last drawn (a carriage return redraws a line)."""
        drawn = [part.split("\r")[-1] for part in self.screen.replace("\r\n", "\n").split("\n")]
        return [line.strip() for line in drawn if line.strip()]

    def messages(self) -> list[str]:
        """What is left once progress bars are set aside: the lines a person reads."""
        return [line for line in self.lines() if not _BAR.search(line) and "━" not in line]


def in_terminal(
    argv: Sequence[str],
    *,
    send: signal.Signals | None = None,
    when: Callable[[str], object] = _BAR.search,
    whole_group: bool = False,
) -> Ran:
    """Run ``argv`` with stdin, stdout and stderr on a pseudo-terminal; once ``when(screen)``
    is true, send ``send`` (to the whole process group, as a terminal's Ctrl-C does, with
    ``whole_group``). Returns the exit status and the screen."""
    master, slave = os.openpty()
    process = subprocess.Popen(
        list(argv),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,  # its own process group, as a shell's foreground job
        env={**os.environ, "COLUMNS": "200", "PROMPT_TOOL_DEBUG": ""},
    )
    os.close(slave)
    received = b""
    sent = send is None
    deadline = time.monotonic() + _TIMEOUT_S
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal is gone
                    break
                if not chunk:
                    break
                received += chunk
            elif process.poll() is not None:
                break
            if not sent and when(_ANSI.sub("", received.decode(errors="replace"))):
                assert send is not None
                if whole_group:
                    os.killpg(process.pid, send)
                else:
                    process.send_signal(send)
                sent = True
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"{argv} did not end in {_TIMEOUT_S}s: {received[-2000:]!r}")
        returncode = process.wait(timeout=_TIMEOUT_S)
    finally:
        os.close(master)
    assert sent, f"the signal was never sent: {received[-2000:]!r}"
    return Ran(returncode, _ANSI.sub("", received.decode(errors="replace")))


@pytest.fixture
def big_legacy_url(empty_db_url: str) -> str:
    """A legacy deployment big enough to be interrupted mid-run (with small batches and a
    pause between them), upgraded to head."""
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=3000, projects=12, seed=11)
    schema.upgrade(empty_db_url)
    return empty_db_url


def _backfill(url: str, *extra: str) -> list[str]:
    return [ORCH_MIGRATE, "backfill", "--db", url, "--batch-size", "50", *extra]


def _runs(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT id, status, finished_at IS NOT NULL FROM migration_runs "
                "WHERE kind = 'backfill' ORDER BY id"
            )
        ).all()
    return [tuple(row) for row in rows]


def _assert_interrupted_cleanly(ran: Ran, code: int) -> None:
    assert ran.returncode == code, ran.screen[-3000:]
    assert "Traceback" not in ran.screen, ran.screen
    assert ran.messages() == [_INTERRUPTED], ran.screen[-3000:]


def _assert_rerun_ends_where_one_run_ends(url: str, engine: Engine, *extra: str) -> None:
    again = in_terminal(_backfill(url, *extra), send=None)
    assert again.returncode == 0, again.screen[-3000:]
    assert "Traceback" not in again.screen
    assert _runs(engine)[-1][1:] == ("completed", True)
    resumed = _state(engine)
    unlink_everything(engine)
    uninterrupted = in_terminal(_backfill(url), send=None)
    assert uninterrupted.returncode == 0, uninterrupted.screen[-3000:]
    assert _state(engine) == resumed


@pytest.mark.parametrize(
    ("sent", "code"),
    [pytest.param(signal.SIGINT, 130, id="ctrl-c"), pytest.param(signal.SIGTERM, 143, id="term")],
)
def test_a_signal_mid_backfill_is_one_line_and_the_run_is_marked_interrupted(
    big_legacy_url: str, engine_for: Any, sent: signal.Signals, code: int
) -> None:
    engine = engine_for(big_legacy_url)

    ran = in_terminal(
        _backfill(big_legacy_url, "--sleep-ms", "40"),
        send=sent,
        whole_group=sent == signal.SIGINT,  # Ctrl-C reaches the whole foreground group
    )

    _assert_interrupted_cleanly(ran, code)
    assert _runs(engine) == [(1, "interrupted", True)]
    with engine.connect() as connection:
        linked = connection.execute(text("SELECT count(*) FROM session_prompt_refs")).scalar()
    assert 0 < linked < 3 * 3000  # it was stopped mid-run
    _assert_rerun_ends_where_one_run_ends(big_legacy_url, engine)


@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgresql"], indirect=True)
@pytest.mark.parametrize(
    ("sent", "code"),
    [pytest.param(signal.SIGINT, 130, id="ctrl-c"), pytest.param(signal.SIGTERM, 143, id="term")],
)
def test_a_signal_mid_backfill_with_workers_stops_them_and_a_rerun_carries_on(
    big_legacy_url: str, engine_for: Any, sent: signal.Signals, code: int
) -> None:
    engine = engine_for(big_legacy_url)
    # Once a batch of the run is done, a worker is at work too (it started before the parent's
    # first batch ended); then the signal.
    ran = in_terminal(
        _backfill(big_legacy_url, "--workers", "2", "--sleep-ms", "40"),
        send=sent,
        whole_group=sent == signal.SIGINT,
    )

    _assert_interrupted_cleanly(ran, code)
    assert _runs(engine) == [(1, "interrupted", True)]
    with engine.connect() as connection:
        pending = connection.execute(
            text("SELECT count(*) FROM migration_batches WHERE status = 'pending'")
        ).scalar()
        backends = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
        ).scalar()
    assert pending  # stopped mid-run: the next run carries these on
    assert backends == 0  # no worker is left connected
    assert not _worker_processes(big_legacy_url)
    _assert_rerun_ends_where_one_run_ends(big_legacy_url, engine, "--workers", "2")


def _worker_processes(url: str) -> list[str]:
    """Backfill workers still running (their command line names the worker module)."""
    found = subprocess.run(
        ["ps", "-eo", "pid,args"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    del url
    return [line for line in found if "backfill.workers import worker_main" in line]


def test_a_run_killed_with_sigkill_shows_as_dead_in_status(
    big_legacy_url: str, engine_for: Any
) -> None:
    engine = engine_for(big_legacy_url)
    extra = ("--workers", "2") if big_legacy_url.startswith("postgresql") else ()

    killed = in_terminal(_backfill(big_legacy_url, "--sleep-ms", "40", *extra), send=signal.SIGKILL)

    assert killed.returncode == -signal.SIGKILL
    assert _runs(engine) == [(1, "running", False)]  # nobody was left to say otherwise
    shown = subprocess.run(
        [ORCH_MIGRATE, "status", "--db", big_legacy_url, "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert '"status": "abandoned"' in shown
    assert '"state": "dead"' in shown
    assert '"status": "running"' not in shown
    _assert_rerun_ends_where_one_run_ends(big_legacy_url, engine, *extra)


def test_status_shows_a_live_run_as_running(big_legacy_url: str) -> None:
    shown: list[str] = []
    mid_run = re.compile(r"[1-9][\d,]*/[\d,]+ sessions")

    def status_once_mid_run(screen: str) -> bool:
        """Read status while the backfill is mid-run (its bar on the screen), then stop it."""
        if not mid_run.search(screen):
            return False
        shown.append(
            subprocess.run(
                [ORCH_MIGRATE, "status", "--db", big_legacy_url, "--json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        return True

    ran = in_terminal(
        _backfill(big_legacy_url, "--sleep-ms", "60"),
        send=signal.SIGINT,
        when=status_once_mid_run,
    )

    assert ran.returncode == 130, ran.screen[-3000:]
    assert '"status": "running"' in shown[0]
    assert '"status": "abandoned"' not in shown[0]


def test_progress_on_a_terminal_shows_a_total_a_rate_and_an_eta(
    big_legacy_url: str, tmp_path: Path
) -> None:
    backfilled = in_terminal(_backfill(big_legacy_url, "--sleep-ms", "20"), send=None)
    assert backfilled.returncode == 0, backfilled.screen[-3000:]
    bars = [line for line in backfilled.lines() if _BAR.search(line)]
    assert bars, backfilled.screen[-3000:]
    assert all("/3,000 sessions" in bar for bar in bars), bars[:3]
    assert re.search(r"/s\b.*ETA \d+:\d\d", bars[0]), bars[0]  # from the first update
    # What the run's controller does shows too: its batch size and its lock holds.
    assert re.search(r"batch \d+", bars[-1]) and "lock hold p50" in bars[-1], bars[-1]

    verified = in_terminal([ORCH_MIGRATE, "verify", "--db", big_legacy_url], send=None)
    assert verified.returncode == 0, verified.screen[-3000:]
    verify_bars = [line for line in verified.lines() if _BAR.search(line)]
    assert all("0/0" not in bar and "/3,000 sessions" in bar for bar in verify_bars), verify_bars

    exported = in_terminal(
        [ORCH_MIGRATE, "export", "--db", big_legacy_url, str(tmp_path / "export")],
        send=None,
    )
    assert exported.returncode == 0, exported.screen[-3000:]
    table_bars = [line for line in exported.lines() if "━" in line]
    assert table_bars, exported.screen[-3000:]
    assert not any(re.search(r"\d/\?", bar) for bar in table_bars), table_bars
    assert any(re.search(r"orchestration_sessions .*\b\d+/3000\b", bar) for bar in table_bars), (
        table_bars
    )
