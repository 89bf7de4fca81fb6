"""Verify trusts nothing it did not read: a template version whose text was changed in the
database (its stored digest left as it was) is reported by id, fails the verify, is never
rendered as another version that shares its original text, and blocks `flag set templates`."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, insert, select, update

from prompt_tool.cli.orch_migrate import app
from prompt_tool.db.models import OrchestrationSession, Project, PromptVersion, SessionPromptRef
from prompt_tool.migrate.backfill import backfill
from prompt_tool.migrate.status import status
from prompt_tool.migrate.verify import verify
from tests.cli_run import run_cli

TEXT = "Hello {{ name }}, you plan {% the steps %}."  # braces: rendered, not settled in SQL
ALONE = "Only {{ here }}."  # a text no other version has


@pytest.fixture
def shared_text(db_engine: Engine) -> Engine:
    """Two projects whose sessions hold the same legacy text (two imported versions, one
    text), and a third whose text no other version has."""
    with db_engine.begin() as connection:
        for slug, text, sessions in (
            ("tamper-a", TEXT, 3),
            ("tamper-b", TEXT, 3),
            ("tamper-c", ALONE, 1),
        ):
            project = connection.execute(
                insert(Project).values(slug=slug, name=slug).returning(Project.id)
            ).scalar_one()
            for n in range(sessions):
                connection.execute(
                    insert(OrchestrationSession).values(
                        project_id=project, name=f"{slug}-{n}", system_prompt=text
                    )
                )
    backfill(db_engine)
    assert verify(db_engine).passed
    return db_engine


def _versions(engine: Engine) -> list[int]:
    """The two versions of TEXT (in id order), then ALONE's."""
    with engine.connect() as connection:
        by_version = dict(
            connection.execute(
                select(SessionPromptRef.prompt_version_id, OrchestrationSession.system_prompt)
                .join(OrchestrationSession, OrchestrationSession.id == SessionPromptRef.session_id)
                .distinct()
            ).all()
        )
    shared = sorted(v for v, text in by_version.items() if text == TEXT)
    return [*shared, *(v for v, text in by_version.items() if text == ALONE)]


def _tamper(engine: Engine, version_id: int) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(PromptVersion)
            .where(PromptVersion.id == version_id)
            .values(content=PromptVersion.content + " (changed in SQL)")
        )


@pytest.mark.parametrize("which", [0, 1, 2], ids=["first-of-its-group", "later-one", "only-one"])
def test_a_version_changed_in_sql_is_reported_by_id_and_fails_verify(
    shared_text: Engine, which: int
) -> None:
    versions = _versions(shared_text)
    assert len(versions) == 3
    changed = versions[which]
    _tamper(shared_text, changed)

    report = verify(shared_text)

    assert not report.passed
    assert report.corrupted_versions == [changed]
    assert {m.version_id for m in report.mismatches} == {changed}  # intact ones still match


def test_status_and_flag_set_templates_refuse_a_project_with_a_changed_version(
    shared_text: Engine,
) -> None:
    first = _versions(shared_text)[0]
    _tamper(shared_text, first)
    projects = {p.project: p for p in status(shared_text).projects}
    blocked = [p for p in projects.values() if not p.readiness.ready]
    assert len(blocked) == 1
    assert f"template versions {first} no longer match" in " ".join(blocked[0].readiness.reasons)
    url = shared_text.url.render_as_string(hide_password=False)
    code, _out, err = run_cli(
        app, ["orch-migrate", "flag", "set", "--default", "templates", "--db", url]
    )
    assert code != 0 and "no longer match" in err


def test_the_cli_names_the_changed_version(shared_text: Engine) -> None:
    first = _versions(shared_text)[0]
    _tamper(shared_text, first)
    url = shared_text.url.render_as_string(hide_password=False)
    code, _out, err = run_cli(app, ["orch-migrate", "verify", "--db", url])
    assert code == 1
    assert f"changed in the database): {first};" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("which", [0, 1], ids=["first-of-its-group", "later-one"])
def test_reads_never_serve_a_version_under_another_ones_id(shared_text: Engine, which: int) -> None:
    """Read through the shim, in templates mode, with both versions of one text in its cache:
    each session gets its own version's text under its own version's id."""
    from prompt_tool import flags
    from prompt_tool.compat import SessionReader

    versions = _versions(shared_text)
    changed = versions[which]
    _tamper(shared_text, changed)
    for slug in ("tamper-a", "tamper-b"):
        flags.set_variant(shared_text, slug, "templates", actor="ops")
    with shared_text.connect() as connection:
        sessions = dict(
            connection.execute(
                select(SessionPromptRef.session_id, SessionPromptRef.prompt_version_id).where(
                    SessionPromptRef.prompt_version_id.in_(versions[:2])
                )
            ).all()
        )
    reader = SessionReader(shared_text)
    # Intact sessions first, then the changed one's, then intact again: a render cache keyed by
    # the stored digest would hand one version's text to the other.
    order = sorted(sessions, key=lambda s: sessions[s] == changed)
    for session_id in [*order, *order[::-1]]:
        system = reader.read(session_id).system
        assert system.version_id == sessions[session_id]
        if sessions[session_id] == changed:
            assert system.text is not None and system.text.endswith("(changed in SQL)")
        else:
            assert system.text == TEXT
