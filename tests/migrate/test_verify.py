"""`orch-migrate verify`: the templates path against the legacy text, byte for byte."""

from __future__ import annotations

from sqlalchemy import Engine, text
from typer.testing import CliRunner

from prompt_tool.cli.orch_migrate import app
from prompt_tool.migrate.backfill import backfill
from prompt_tool.migrate.verify import VerifyOptions, verify

runner = CliRunner()


def test_verify_catches_a_hand_corrupted_reference_and_shows_its_diff(
    legacy_engine: Engine,
) -> None:
    backfill(legacy_engine)
    with legacy_engine.begin() as connection:
        other_version = (
            connection.execute(
                text(
                    "SELECT v.id FROM prompt_versions v JOIN prompts p ON p.id = v.prompt_id "
                    "WHERE p.name LIKE 'imported/system/%' AND v.content = 'trailing newline\n'"
                )
            )
            .scalars()
            .first()
        )
        target = connection.execute(
            text(
                "SELECT session_id FROM session_prompt_refs WHERE role = 'system' "
                "AND prompt_version_id <> :v ORDER BY session_id LIMIT 1"
            ),
            {"v": other_version},
        ).scalar_one()
        connection.execute(
            text(
                "UPDATE session_prompt_refs SET prompt_version_id = :v "
                "WHERE session_id = :s AND role = 'system'"
            ),
            {"v": other_version, "s": target},
        )
    report = verify(legacy_engine)
    assert not report.passed
    assert report.totals().mismatched == 1
    (mismatch,) = report.mismatches
    assert (mismatch.session_id, mismatch.role, mismatch.kind) == (target, "system", "mismatch")
    assert "+trailing newline" in mismatch.diff


def test_unmigrated_sessions_fail_verify_unless_allowed(legacy_engine: Engine) -> None:
    report = verify(legacy_engine)
    assert not report.passed and report.totals().unmigrated > 0
    assert verify(legacy_engine, VerifyOptions(allow_unmigrated=True)).passed


def test_sample_checks_only_that_many_sessions(legacy_engine: Engine) -> None:
    backfill(legacy_engine)
    report = verify(legacy_engine, VerifyOptions(sample=25))
    assert report.passed
    assert 25 <= report.totals().checked <= 75


def test_verify_cli_exit_codes_and_json(legacy_url: str, legacy_engine: Engine) -> None:
    failed = runner.invoke(app, ["verify", "--db", legacy_url, "--json"])
    assert failed.exit_code == 1
    backfilled = runner.invoke(app, ["backfill", "--db", legacy_url, "--json"])
    assert backfilled.exit_code == 0, backfilled.output
    passed = runner.invoke(app, ["verify", "--db", legacy_url, "--json"])
    assert passed.exit_code == 0, passed.output
    import json

    assert json.loads(passed.stdout)["passed"] is True


def test_backfill_cli_says_when_nothing_is_left(legacy_url: str) -> None:
    runner.invoke(app, ["backfill", "--db", legacy_url])
    again = runner.invoke(app, ["backfill", "--db", legacy_url])
    assert again.exit_code == 0
    assert "nothing to do" in again.stdout


def test_bad_backfill_input_is_one_line_exit_2(legacy_url: str) -> None:
    result = runner.invoke(app, ["backfill", "--db", legacy_url, "--project", "ghost"])
    assert result.exit_code == 2
    assert "no project with slug ghost" in result.output
