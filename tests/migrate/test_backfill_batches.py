"""The backfill's batch internals: a template's name always names its content, the versions a
run remembers are committed ones, and references go in as one statement on both dialects."""

from __future__ import annotations

from sqlalchemy import Engine, delete, func, or_, select, update

from prompt_tool.core import content_hash, literal_template
from prompt_tool.db.models import (
    OrchestrationSession,
    Project,
    Prompt,
    PromptRole,
    SessionPromptRef,
)
from prompt_tool.migrate.backfill import BackfillOptions, ImportedVersions, backfill
from prompt_tool.migrate.backfill.batch import (
    _find_imported,
    _import_templates,
    _link,
    _read_texts,
    _RoleState,
)
from prompt_tool.migrate.backfill.quarantine import ImportLimits
from prompt_tool.settings import get_settings


def _first_session(engine: Engine) -> tuple[int, int, str]:
    with engine.connect() as connection:
        row = connection.execute(
            select(
                OrchestrationSession.id,
                OrchestrationSession.project_id,
                OrchestrationSession.system_prompt,
            )
            .where(OrchestrationSession.system_prompt.is_not(None))
            .order_by(OrchestrationSession.id)
            .limit(1)
        ).one()
    return row[0], row[1], row[2]


def test_a_text_changed_since_the_batch_read_it_is_not_imported_under_its_old_hash(
    legacy_engine: Engine,
) -> None:
    session_id, project_id, legacy = _first_session(legacy_engine)
    key = (project_id, "system", content_hash(legacy))
    with legacy_engine.begin() as connection:
        connection.execute(
            update(OrchestrationSession)
            .where(OrchestrationSession.id == session_id)
            .values(system_prompt=legacy + " (edited)")
        )
        # Read again, the text no longer hashes to the key: nothing is imported under it.
        assert _read_texts(connection, {key: session_id}) == {}
        assert _import_templates(connection, _read_texts(connection, {key: session_id})) == set()
        assert _find_imported(connection, {key}) == {}


def test_an_imported_text_is_found_again_by_its_key(legacy_engine: Engine) -> None:
    session_id, project_id, legacy = _first_session(legacy_engine)
    key = (project_id, "system", content_hash(legacy))
    with legacy_engine.begin() as connection:
        texts = _read_texts(connection, {key: session_id})
        assert _import_templates(connection, texts) == {key}
        found = _find_imported(connection, {key})
        assert set(found) == {key}
        source = connection.execute(
            select(Prompt.content).where(Prompt.name == f"imported/system/{key[2]}")
        ).scalar_one()
    assert source == literal_template(legacy)


def test_versions_imported_by_a_rolled_back_batch_are_not_remembered(
    legacy_engine: Engine,
) -> None:
    session_id, project_id, legacy = _first_session(legacy_engine)
    key = (project_id, "system", content_hash(legacy))
    remembered = ImportedVersions()
    state = _RoleState(session_id, project_id, "system", key[2], None, False)
    with legacy_engine.connect() as connection:
        limits = ImportLimits.from_settings(get_settings())
        assert _link(connection, [state], remembered, limits, dry_run=False).created == {key}
        connection.rollback()  # the batch failed: its template is gone
        assert remembered.resolve(connection, {key}) == {}


def test_backfill_links_every_text_in_one_run_on_both_dialects(legacy_engine: Engine) -> None:
    summary = backfill(legacy_engine)
    with legacy_engine.connect() as connection:
        references = connection.execute(select(func.count()).select_from(SessionPromptRef))
        assert references.scalar_one() == summary.references_created > 0


def test_a_scoped_run_steps_over_key_windows_without_sessions_of_its_scope(
    legacy_engine: Engine,
) -> None:
    """Batches read bounded key windows (whatever the planner's statistics): windows holding
    none of the scope, such as a gap of deleted sessions, are stepped over, none is lost."""
    with legacy_engine.begin() as connection:
        ids = (
            connection.execute(select(OrchestrationSession.id).order_by(OrchestrationSession.id))
            .scalars()
            .all()
        )
        connection.execute(
            delete(OrchestrationSession).where(OrchestrationSession.id.in_(ids[100:300]))
        )
        project_id, slug = connection.execute(
            select(Project.id, Project.slug).order_by(Project.id).limit(1)
        ).one()
        with_text = or_(
            *(
                OrchestrationSession.__table__.c[role.legacy_column].is_not(None)
                for role in PromptRole
            )
        )
        expected = set(
            connection.execute(
                select(OrchestrationSession.id).where(
                    OrchestrationSession.project_id == project_id, with_text
                )
            ).scalars()
        )
    summary = backfill(legacy_engine, BackfillOptions(projects=(slug,), batch_size=5))
    assert summary.batches > 1
    with legacy_engine.connect() as connection:
        linked = connection.execute(
            select(SessionPromptRef.session_id, OrchestrationSession.project_id)
            .join(OrchestrationSession, OrchestrationSession.id == SessionPromptRef.session_id)
            .distinct()
        ).all()
    assert {session for session, _ in linked} == expected
    assert {project for _, project in linked} == {project_id}
