"""`orch-migrate`: thin over the library, exit codes as documented, errors on one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from prompt_tool.cli.orch_migrate import app

runner = CliRunner()


def _orch_migrate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the installed console script, as an operator would."""
    script = Path(sys.executable).parent / "orch-migrate"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPT_TOOL_")}
    return subprocess.run(
        [str(script), *args], cwd=cwd, capture_output=True, text=True, env=env, check=False
    )


def test_db_upgrade_creates_the_embedded_default_in_the_current_directory(tmp_path: Path) -> None:
    result = _orch_migrate("db", "upgrade", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "prompt_tool.db").exists()
    assert "-> 0003" in result.stdout


def test_db_current_as_json(empty_db_url: str) -> None:
    runner.invoke(app, ["db", "upgrade", "--db", empty_db_url])
    result = runner.invoke(app, ["db", "current", "--db", empty_db_url, "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["current"] == "0003"


def test_db_history_lists_every_revision() -> None:
    result = runner.invoke(app, ["db", "history", "--json"])
    assert [r["revision"] for r in json.loads(result.stdout)] == ["0001", "0002", "0003"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["db", "upgrade", "--db", "mysql://root@localhost/x"], "unsupported database"),
        (["db", "upgrade", "--db", "::::"], "cannot parse database URL"),
        (["db", "current", "--db", "postgresql://x@127.0.0.1:1/none"], "cannot connect"),
        (["db", "downgrade", "--db", "sqlite:///absent.db"], "no database file"),
        (["db", "upgrade", "nowhere", "--db", "sqlite:///fresh.db"], "Can't locate revision"),
    ],
)
def test_bad_input_is_one_line_exit_2_no_traceback(
    args: list[str], expected: str, tmp_path: Path
) -> None:
    result = _orch_migrate(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_database_that_does_not_exist_is_a_connection_error_not_a_schema_one(
    pg_url: str, tmp_path: Path
) -> None:
    name = f"absent_{uuid.uuid4().hex[:8]}"
    absent = make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    result = _orch_migrate("verify", "--db", absent, cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot connect to the database" in result.stderr
    assert "db upgrade" not in result.stderr


def test_fingerprint_of_a_database_behind_head_says_to_upgrade(tmp_path: Path) -> None:
    (tmp_path / "prompt_tool.db").touch()
    result = _orch_migrate("fingerprint", cwd=tmp_path)
    assert result.returncode == 2
    assert "orch-migrate db upgrade" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2() -> None:
    result = runner.invoke(app, ["db", "upgrade", "--no-such-option"])
    assert result.exit_code == 2


def test_sample_data_then_fingerprint_counts_rows(tmp_path: Path) -> None:
    assert _orch_migrate("db", "upgrade", "0001", cwd=tmp_path).returncode == 0
    loaded = _orch_migrate("sample-data", "--sessions", "25", "--json", cwd=tmp_path)
    assert json.loads(loaded.stdout)["sessions"] == 25
    printed = _orch_migrate("fingerprint", "--json", cwd=tmp_path)
    rows = {t["table"]: t["rows"] for t in json.loads(printed.stdout)["tables"]}
    assert rows["orchestration_sessions"] == 25


def test_fingerprint_against_a_saved_one_fails_when_legacy_rows_changed(tmp_path: Path) -> None:
    _orch_migrate("db", "upgrade", "0001", cwd=tmp_path)
    _orch_migrate("sample-data", "--sessions", "10", cwd=tmp_path)
    saved = _orch_migrate("fingerprint", "--json", cwd=tmp_path).stdout
    (tmp_path / "before.json").write_text(saved)
    assert _orch_migrate("fingerprint", "--against", "before.json", cwd=tmp_path).returncode == 0

    import sqlite3

    with sqlite3.connect(tmp_path / "prompt_tool.db") as connection:
        connection.execute("UPDATE projects SET name = name || ' ' WHERE id = 1")
    result = _orch_migrate("fingerprint", "--against", "before.json", cwd=tmp_path)
    assert result.returncode == 1
    assert "legacy tables differ from before.json: projects" in result.stderr


def test_fingerprint_against_a_file_that_is_not_one_is_refused(tmp_path: Path) -> None:
    _orch_migrate("db", "upgrade", cwd=tmp_path)
    (tmp_path / "junk.json").write_text("{}")
    result = _orch_migrate("fingerprint", "--against", "junk.json", cwd=tmp_path)
    assert result.returncode == 2
    assert "is not a fingerprint" in result.stderr
