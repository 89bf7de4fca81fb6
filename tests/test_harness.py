"""The harness itself: without PostgreSQL, its tests are skipped loudly, or fail when required."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
POSTGRES_TEST = (
    "tests/db/test_schema.py::"
    "test_upgrade_downgrade_and_current_report_where_the_database_stands[postgresql]"
)


def _pytest_without_postgres(require: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPT_TOOL_")}
    env["PROMPT_TOOL_TEST_DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/none"
    if require:
        env["PROMPT_TOOL_REQUIRE_POSTGRES"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", POSTGRES_TEST],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.slow
def test_postgres_tests_are_skipped_with_a_reason_when_no_server_answers() -> None:
    result = _pytest_without_postgres(require=False)
    assert result.returncode == 0, result.stdout
    assert "SKIPPING PostgreSQL tests" in result.stdout
    assert "1 skipped" in result.stdout


@pytest.mark.slow
def test_postgres_tests_fail_instead_of_skipping_when_required() -> None:
    result = _pytest_without_postgres(require=True)
    assert result.returncode != 0
    assert "PROMPT_TOOL_REQUIRE_POSTGRES=1 but" in result.stdout
    assert "skipped" not in result.stdout.splitlines()[-1]
