"""Every long command, run as a person does: in a pseudo-terminal (progress drawn) and through a
pipe (a CI log). Each ends with exit 0 and no traceback in both, and a terminal shows its
progress with a total, never ``/?``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from prompt_tool.db import schema
from tests.cli.test_signals import ORCH_MIGRATE, in_terminal


def _steps(url: str, directory: Path) -> list[list[str]]:
    return [
        ["sample-data", "--sessions", "300", "--projects", "4"],
        ["db", "upgrade"],
        ["backfill", "--batch-size", "50"],
        ["verify"],
        ["export", str(directory / "export")],
        ["restore", "--from", str(directory / "export")],
        ["rehearse", "--rollback"],
    ]


@pytest.mark.parametrize("mode", ["terminal", "pipe"])
def test_every_long_command_ends_cleanly_in_a_terminal_and_through_a_pipe(
    empty_db_url: str, tmp_path: Path, mode: str
) -> None:
    schema.upgrade(empty_db_url, "0001")
    for step in _steps(empty_db_url, tmp_path):
        argv = [ORCH_MIGRATE, *step, "--db", empty_db_url]
        if mode == "terminal":
            ran = in_terminal(argv, when=lambda screen: True)
            code, seen = ran.returncode, ran.screen
            assert "/?" not in seen, step
        else:
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            code, seen = done.returncode, done.stdout + done.stderr
            assert "\x1b[" not in done.stdout, f"{step}: escape sequences in a pipe"
        assert code == 0, f"{step}: {seen[-2000:]}"
        assert "Traceback" not in seen, step


def test_an_export_that_cannot_write_says_so_in_one_line_naming_the_directory_given(
    empty_db_url: str, tmp_path: Path
) -> None:
    schema.upgrade(empty_db_url)
    (tmp_path / "a-file").write_text("not a directory")
    target = tmp_path / "a-file" / "export"

    done = subprocess.run(
        [ORCH_MIGRATE, "export", str(target), "--db", empty_db_url],
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "incomplete" not in done.stderr and str(target) in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "command", [["flag", "get", "--project", "p"], ["flag", "list"], ["status"]]
)
def test_a_missing_flagd_file_fails_in_one_line_instead_of_answering_legacy(
    empty_db_url: str, tmp_path: Path, command: list[str]
) -> None:
    schema.upgrade(empty_db_url)
    missing = tmp_path / "flags.json"
    env = {
        **os.environ,
        "PROMPT_TOOL_FLAG_PROVIDER": "flagd-file",
        "PROMPT_TOOL_FLAGD_FILE": str(missing),
    }

    done = subprocess.run(
        [ORCH_MIGRATE, *command, "--db", empty_db_url],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and str(missing) in done.stderr
