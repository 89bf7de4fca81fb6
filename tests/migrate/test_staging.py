"""What killed exports leave is removed by the next export to the same place; a live export's
staging directory is never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import Engine

from prompt_tool.cli.orch_migrate import app
from prompt_tool.migrate.export import export
from prompt_tool.migrate.staging import remove_leftovers, staging_directory
from tests.cli_run import run_cli

KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from prompt_tool.migrate.staging import staging_directory

with staging_directory(Path(sys.argv[1])) as staging:
    (staging / "sessions.jsonl").write_bytes(b"x" * 100_000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_export(target: Path) -> Path:
    """The staging directory of an export to ``target`` killed with SIGKILL."""
    target.parent.mkdir(parents=True, exist_ok=True)
    died = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(target)], capture_output=True, check=False
    )
    assert died.returncode == -signal.SIGKILL, died.stderr.decode()
    (left,) = [p for p in target.parent.iterdir() if p.is_dir()]
    assert left.name.startswith(f".{target.name}.incomplete-")
    return left


def test_the_next_export_removes_what_a_killed_one_left(db_engine: Engine, tmp_path: Path) -> None:
    target = tmp_path / "exports" / "backup"
    left = _killed_export(target)
    result = export(db_engine, target)
    assert not left.exists()
    assert not Path(f"{left}.lock").exists()
    assert result.leftovers_removed == [left.name]
    assert result.leftover_bytes_removed >= 100_000
    assert sorted(p.name for p in target.parent.iterdir()) == ["backup"]


def test_a_live_exports_staging_directory_is_never_removed(tmp_path: Path) -> None:
    target = tmp_path / "backup"
    with staging_directory(target) as live:
        (live / "part").write_text("being written")
        assert remove_leftovers(target).removed == []
        assert (live / "part").exists()
    assert not live.exists()  # and gone once its own export ends


def test_unlocked_leftovers_of_older_versions_go_only_once_idle_for_an_hour(
    tmp_path: Path,
) -> None:
    target = tmp_path / "backup"
    old = tmp_path / ".backup.incomplete-old1"
    recent = tmp_path / ".backup.incomplete-new1"
    for directory in (old, recent):
        directory.mkdir()
        (directory / "t.jsonl").write_text("{}\n")
    hours_ago = time.time() - 2 * 3600
    os.utime(old / "t.jsonl", (hours_ago, hours_ago))
    os.utime(old, (hours_ago, hours_ago))
    assert remove_leftovers(target).removed == [old.name]
    assert recent.exists()
    other = tmp_path / ".elsewhere.incomplete-old2"  # another target's: not this export's
    other.mkdir()
    os.utime(other, (hours_ago, hours_ago))
    assert remove_leftovers(target).removed == []


def test_the_cli_says_in_one_line_what_it_removed(head_db_url: str, tmp_path: Path) -> None:
    target = tmp_path / "exports" / "backup"
    left = _killed_export(target)
    code, _out, err = run_cli(app, ["orch-migrate", "export", str(target), "--db", head_db_url])
    assert code == 0, err
    assert f"removed 1 leftover of killed exports (0.1 MB): {left.name}" in err
