"""Rows a backfill cannot import (a legacy text over the template size limit) go to the
quarantine with the reason; the run links everything else, readers keep the legacy text, status
and verify count them per project, ``--max-errors`` stops a run that quarantines too many, and a
raised limit with ``--retry-quarantined`` links them and empties the quarantine."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update
from typer.testing import CliRunner

from prompt_tool import flags
from prompt_tool.cli.orch_migrate import app
from prompt_tool.compat import PromptSource, SessionReader
from prompt_tool.core import literal_template
from prompt_tool.db import schema
from prompt_tool.db.models import (
    MigrationQuarantine,
    MigrationRun,
    OrchestrationSession,
    PromptRole,
    SessionPromptRef,
)
from prompt_tool.errors import SchemaError
from prompt_tool.migrate import load_legacy_sample
from prompt_tool.migrate.backfill import BackfillOptions, backfill
from prompt_tool.migrate.backfill.quarantine import (
    ImportLimits,
    QuarantineLimitError,
    by_project,
    screen,
)
from prompt_tool.migrate.status import status
from prompt_tool.migrate.verify import VerifyOptions, verify
from prompt_tool.settings import Settings

LIMIT = 4096
# Small limits: the sample's longest texts are far above them, so only the texts made long
# here are over the limit (the sample's are made short first).
SMALL = Settings(template_max_source_bytes=LIMIT, template_max_stored_source_bytes=LIMIT)
RAISED = Settings(template_max_source_bytes=LIMIT, template_max_stored_source_bytes=LIMIT * 4)
LONG = "Plan {{ goal }} carefully. " * 400  # 10,800 bytes, 13,200 as a literal template
# Why a long text is quarantined (each is LONG and one digit).
REASON = (
    f"text of {len(literal_template(LONG + '1')):,} bytes once its braces are escaped is over "
    "the template limit of 4,096 bytes (PROMPT_TOOL_TEMPLATE_MAX_STORED_SOURCE_BYTES)"
)
_SESSIONS = OrchestrationSession.__table__
runner = CliRunner()
_COLUMNS = [role.legacy_column for role in PromptRole]


@pytest.fixture
def deployment(empty_db_url: str, engine_for: Any) -> Engine:
    """60 sessions over two projects at head, every text short, but for two sessions' system
    texts (one in each project, ids apart): too long for ``SMALL``'s limit."""
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=60, projects=2, seed=3)
    schema.upgrade(empty_db_url)
    engine: Engine = engine_for(empty_db_url)
    with engine.begin() as connection:
        for column in _COLUMNS:
            connection.execute(
                update(OrchestrationSession)
                .where(_SESSIONS.c[column].is_not(None))
                .values({column: func.substr(_SESSIONS.c[column], 1, 500)})
            )
        for project_id, after in ((1, 10), (2, 40)):
            first = connection.execute(
                select(func.min(_SESSIONS.c.id)).where(
                    _SESSIONS.c.project_id == project_id, _SESSIONS.c.id > after
                )
            ).scalar_one()
            connection.execute(
                update(OrchestrationSession)
                .where(_SESSIONS.c.id == first)
                .values(system_prompt=LONG + str(project_id))
            )
    return engine


def _long_sessions(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        return list(
            connection.scalars(
                select(_SESSIONS.c.id)
                .where(func.length(_SESSIONS.c.system_prompt) > LIMIT)
                .order_by(_SESSIONS.c.id)
            )
        )


def _quarantine(engine: Engine) -> list[tuple[int, str, str]]:
    with engine.connect() as connection:
        return [
            (int(row[0]), str(row[1]), str(row[2]))
            for row in connection.execute(
                select(
                    MigrationQuarantine.session_id,
                    MigrationQuarantine.role,
                    MigrationQuarantine.reason,
                ).order_by(MigrationQuarantine.session_id)
            )
        ]


def _unlinked(engine: Engine) -> list[tuple[int, str]]:
    """Every (session, role) with a legacy text and no reference."""
    found = []
    with engine.connect() as connection:
        linked = set(connection.execute(select(SessionPromptRef.session_id, SessionPromptRef.role)))
        for row in connection.execute(select(_SESSIONS.c.id, *(_SESSIONS.c[c] for c in _COLUMNS))):
            for role, text in zip(PromptRole, row[1:], strict=True):
                if text is not None and (row[0], role.value) not in linked:
                    found.append((row[0], role.value))
    return sorted(found)


def test_a_text_over_the_template_limit_is_quarantined_with_its_reason_and_the_rest_linked(
    deployment: Engine,
) -> None:
    long_ones = _long_sessions(deployment)

    summary = backfill(deployment, BackfillOptions(batch_size=7), settings=SMALL)

    assert summary.quarantined == 2
    assert "2 rows quarantined (see `orch-migrate status`)" in summary.describe()
    assert _unlinked(deployment) == [(session, "system") for session in long_ones]
    quarantined = _quarantine(deployment)
    assert [(session, role) for session, role, _ in quarantined] == [
        (session, "system") for session in long_ones
    ]
    assert [reason for _, _, reason in quarantined] == [REASON, REASON]
    with deployment.connect() as connection:
        assert by_project(connection) == {"project-1": 1, "project-2": 1}
        recorded = connection.execute(
            select(MigrationRun.summary).where(MigrationRun.id == summary.run_id)
        ).scalar_one()
    assert recorded["quarantined"] == 2


def test_readers_keep_the_legacy_text_of_a_quarantined_session(deployment: Engine) -> None:
    backfill(deployment, settings=SMALL)
    for slug in ("project-1", "project-2"):
        flags.set_variant(deployment, slug, "templates", actor="ops")
    session = _long_sessions(deployment)[0]

    read = SessionReader(deployment).read(session)

    assert read.system.text is not None and read.system.text.startswith(LONG)
    assert read.system.source is PromptSource.UNMIGRATED
    assert read.planner.source is PromptSource.TEMPLATE or read.planner.text is None


def test_status_and_verify_show_the_quarantined_sessions_per_project(deployment: Engine) -> None:
    backfill(deployment, settings=SMALL)
    session = _long_sessions(deployment)[0]

    report = status(deployment)
    verified = verify(deployment)

    first = report.projects[0]
    assert (first.project, first.quarantined, first.unmigrated, first.stale) == (
        "project-1",
        1,
        0,
        0,
    )
    assert first.migrated == first.sessions - 1
    assert not first.readiness.ready
    assert any("--retry-quarantined --project project-1" in r for r in first.readiness.reasons)
    assert first.quarantine_reasons == [
        f"orchestration_sessions id {session} system_prompt: {REASON}"
    ]
    assert not verified.passed
    assert [(p.project, p.quarantined, p.unmigrated) for p in verified.projects] == [
        ("project-1", 1, 0),
        ("project-2", 1, 0),
    ]
    assert verified.quarantined[0].startswith(f"orchestration_sessions id {session} system_prompt")
    assert verify(deployment, VerifyOptions(allow_unmigrated=True)).passed


@pytest.mark.parametrize("max_errors", [0, 1])
def test_max_errors_stops_the_run_and_what_is_committed_stands(
    deployment: Engine, max_errors: int
) -> None:
    long_ones = _long_sessions(deployment)
    options = BackfillOptions(batch_size=5, min_batch_size=5, max_errors=max_errors)

    with pytest.raises(QuarantineLimitError) as stopped:
        backfill(deployment, options, settings=SMALL)

    message = str(stopped.value)
    assert "\n" not in message
    assert f"rows quarantined, over --max-errors {max_errors}" in message or (
        f"row quarantined, over --max-errors {max_errors}" in message
    )
    assert "what is committed stands" in message and "orch-migrate status" in message
    # Stopped after the batch that crossed the budget: only sessions after it are not linked.
    crossed = long_ones[max_errors]
    unlinked = [session for session, _ in _unlinked(deployment) if session not in long_ones]
    assert unlinked and all(session > crossed for session in unlinked)
    assert len(_quarantine(deployment)) == max_errors + 1
    # A rerun carries on and finishes: the rows already quarantined are not new errors.
    summary = backfill(deployment, dataclasses.replace(options, max_errors=100), settings=SMALL)
    assert summary.quarantined == 1 - max_errors
    assert _unlinked(deployment) == [(session, "system") for session in long_ones]


def test_a_raised_limit_and_retry_quarantined_link_them_and_empty_the_quarantine(
    deployment: Engine,
) -> None:
    backfill(deployment, settings=SMALL)
    long_ones = _long_sessions(deployment)

    summary = backfill(deployment, BackfillOptions(retry_quarantined=True), settings=RAISED)

    assert summary.sessions_scanned == len(long_ones)  # only the quarantined sessions walked
    assert summary.references_created == 2 and summary.quarantined == 0
    assert _quarantine(deployment) == []
    assert _unlinked(deployment) == []
    assert status(deployment).projects[0].quarantined == 0
    assert verify(deployment).passed


def test_a_normal_run_with_the_limit_raised_releases_them_too(deployment: Engine) -> None:
    backfill(deployment, settings=SMALL)

    summary = backfill(deployment, settings=RAISED)

    assert summary.references_created == 2
    assert _quarantine(deployment) == [] and _unlinked(deployment) == []


def test_a_dry_run_counts_what_it_would_quarantine_and_writes_nothing(deployment: Engine) -> None:
    summary = backfill(deployment, BackfillOptions(dry_run=True), settings=SMALL)

    assert summary.quarantined == 2
    assert _quarantine(deployment) == []


def test_status_and_verify_still_work_at_0002_without_the_quarantine(
    deployment: Engine, empty_db_url: str
) -> None:
    backfill(deployment, settings=SMALL)
    deployment.dispose()
    schema.downgrade(empty_db_url, "0002")

    report = status(deployment)
    verified = verify(deployment)

    assert report.revision == "0002" and report.templates_schema
    # Without the quarantine they are what they are: unmigrated.
    assert [(p.quarantined, p.unmigrated) for p in report.projects] == [(0, 1), (0, 1)]
    assert [(p.quarantined, p.unmigrated) for p in verified.projects] == [(0, 1), (0, 1)]
    with pytest.raises(SchemaError, match=r"needs schema revision 0003 .* at 0002.*db upgrade"):
        backfill(deployment)


def test_screen_names_each_text_that_cannot_be_imported_and_why() -> None:
    limits = ImportLimits(max_source_bytes=100, max_output_bytes=60)
    texts = {
        (1, "system", "a"): "short {{ braces }} render back",
        (1, "system", "b"): "x" * 101,
        (1, "planner", "c"): "{{" * 60,
        (2, "synthesis", "d"): "y" * 61,
    }

    found = screen(texts, limits)

    assert found == {
        (1, "system", "b"): "text of 101 bytes is over the template limit of 100 bytes "
        "(PROMPT_TOOL_TEMPLATE_MAX_STORED_SOURCE_BYTES)",
        (1, "planner", "c"): "text of 126 bytes once its braces are escaped is over the "
        "template limit of 100 bytes (PROMPT_TOOL_TEMPLATE_MAX_STORED_SOURCE_BYTES)",
        (2, "synthesis", "d"): "text of 61 bytes is over the render output limit of 60 bytes "
        "(PROMPT_TOOL_TEMPLATE_MAX_OUTPUT_BYTES)",
    }
    assert ImportLimits.from_settings(SMALL) == ImportLimits(LIMIT, SMALL.template_max_output_bytes)


def test_the_status_and_verify_commands_show_the_quarantine(deployment: Engine) -> None:
    backfill(deployment, settings=SMALL)
    session = _long_sessions(deployment)[0]
    url = deployment.url.render_as_string(hide_password=False)

    shown = runner.invoke(app, ["status", "--db", url])
    as_json = json.loads(runner.invoke(app, ["status", "--db", url, "--json"]).stdout)
    verified = runner.invoke(app, ["verify", "--db", url])

    assert shown.exit_code == 0, shown.output
    assert "quarantined" in shown.output
    assert f"project-1: quarantined orchestration_sessions id {session} system_prompt" in (
        " ".join(shown.output.split())
    )
    assert [p["quarantined"] for p in as_json["projects"]] == [1, 1]
    assert verified.exit_code == 1
    assert "2 legacy texts quarantined by backfill" in " ".join(verified.output.split())
