"""`orch-migrate verify`: the templates path against the legacy text, byte for byte."""

from __future__ import annotations

import json
from typing import Any

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
    assert "no project with slug 'ghost'" in result.output


def _first_system_reference(connection: Any) -> tuple[int, int]:
    row = connection.execute(
        text(
            "SELECT r.session_id, r.prompt_version_id FROM session_prompt_refs r "
            "JOIN prompt_versions v ON v.id = r.prompt_version_id "
            "WHERE r.role = 'system' AND v.content NOT LIKE '%{%' ORDER BY r.session_id LIMIT 1"
        )
    ).one()
    return int(row[0]), int(row[1])


def test_a_brace_free_template_that_declares_a_variable_is_rendered_not_assumed(
    legacy_engine: Engine,
) -> None:
    """Without a brace a template renders to its source, unless it declares variables: the
    renderer then requires them, and verify must report what the read shim would do."""
    backfill(legacy_engine)
    with legacy_engine.begin() as connection:
        _, version_id = _first_system_reference(connection)
        connection.execute(
            text(
                "UPDATE prompts SET declared_variables = :declared WHERE id = "
                "(SELECT prompt_id FROM prompt_versions WHERE id = :v)"
            ),
            {"declared": json.dumps(["customer"]), "v": version_id},
        )
        uses = connection.execute(
            text("SELECT count(*) FROM session_prompt_refs WHERE prompt_version_id = :v"),
            {"v": version_id},
        ).scalar_one()
    report = verify(legacy_engine)
    assert report.totals().render_errors == uses
    assert {m.kind for m in report.mismatches} == {"render_error"}


def test_a_stored_digest_is_checked_not_trusted(legacy_engine: Engine) -> None:
    """A reference whose digest was forged to agree with a forged version digest is still
    stale: its digest is not the text's."""
    backfill(legacy_engine)
    with legacy_engine.begin() as connection:
        session_id, version_id = _first_system_reference(connection)
        connection.execute(
            text("UPDATE prompt_versions SET content_hash = :h WHERE id = :v"),
            {"h": "0" * 64, "v": version_id},
        )
        connection.execute(
            text(
                "UPDATE session_prompt_refs SET legacy_hash = :h "
                "WHERE session_id = :s AND role = 'system'"
            ),
            {"h": "0" * 64, "s": session_id},
        )
    totals = verify(legacy_engine).totals()
    assert (totals.stale, totals.mismatched) == (1, 0)
    assert totals.matched == totals.checked - 1


def test_a_legacy_text_edited_after_the_backfill_is_stale_not_matched(
    legacy_engine: Engine,
) -> None:
    backfill(legacy_engine)
    with legacy_engine.begin() as connection:
        session_id, _ = _first_system_reference(connection)
        connection.execute(
            text(
                "UPDATE orchestration_sessions SET system_prompt = system_prompt || '!' "
                "WHERE id = :s"
            ),
            {"s": session_id},
        )
    totals = verify(legacy_engine).totals()
    assert (totals.stale, totals.mismatched) == (1, 0)
