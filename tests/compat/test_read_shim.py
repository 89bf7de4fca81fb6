"""The read shim: each project's flag picks where prompts come from; reads never break."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, event, text, update
from statements import statements_run

from prompt_tool import flags
from prompt_tool.compat import (
    PromptSource,
    RolePrompt,
    SessionPrompts,
    SessionReader,
    create_session,
    set_session_template,
    update_session_variables,
)
from prompt_tool.compat.types import new_role_prompt, new_session_prompts
from prompt_tool.db import schema
from prompt_tool.db.models import OrchestrationSession, PromptRole, Scope
from prompt_tool.migrate.backfill import backfill
from prompt_tool.migrate.verify import verify
from prompt_tool.settings import Settings
from prompt_tool.templates import TemplateAddress, TemplateManager

ROLES = {"system": "system", "planner": "planner", "synthesis": "synthesis"}


def _legacy_session(engine: Engine, project: str, texts: dict[str, str | None]) -> int:
    with engine.begin() as connection:
        project_id = connection.execute(
            text("SELECT id FROM projects WHERE slug = :slug"), {"slug": project}
        ).scalar_one()
        return int(
            connection.execute(
                OrchestrationSession.__table__.insert()
                .values(project_id=project_id, name="legacy", **texts)
                .returning(OrchestrationSession.id)
            ).scalar_one()
        )


def test_two_projects_read_through_their_own_variant_in_one_process(
    manager: TemplateManager, reader: SessionReader, set_flag: Any
) -> None:
    acme = create_session(manager, "acme", ROLES, {"topic": "billing"}, name="a")
    beta = create_session(manager, "beta", ROLES, {"topic": "billing"}, name="b")
    set_flag("acme", "templates")
    set_flag("beta", "legacy")

    read = reader.read_many([acme.session_id, beta.session_id])

    assert read[acme.session_id].variant == "templates"
    assert read[acme.session_id].planner.source is PromptSource.TEMPLATE
    assert read[beta.session_id].planner.source is PromptSource.LEGACY
    assert read[acme.session_id].texts() == read[beta.session_id].texts()
    assert read[acme.session_id].planner.text == (
        "The planner prompt about billing.\r\nBe exact: {{raw}}"
    )


def test_dual_written_text_is_the_same_under_every_variant(
    manager: TemplateManager, reader: SessionReader, set_flag: Any
) -> None:
    created = create_session(manager, "acme", ROLES, {"topic": "x"}, name="s")
    seen = []
    for variant in ("legacy", "shadow", "templates"):
        set_flag("acme", variant)
        seen.append(reader.read(created.session_id).texts())
    assert seen[0] == seen[1] == seen[2]
    assert seen[0]["planner"] == created.texts["planner"]


def test_kill_switch_forces_legacy(
    db_engine: Engine, manager: TemplateManager, set_flag: Any
) -> None:
    created = create_session(manager, "acme", ROLES, {"topic": "x"}, name="s")
    set_flag("acme", "templates")
    service = flags.FlagService(db_engine, Settings(redis_url=None, templates_enabled=False))
    try:
        read = SessionReader(db_engine, flags=service, manager=manager).read(created.session_id)
    finally:
        service.close()
    assert read.variant == "legacy"
    assert read.system.source is PromptSource.LEGACY


def test_templates_falls_back_to_legacy_for_a_session_not_yet_backfilled(
    db_engine: Engine, reader: SessionReader, set_flag: Any
) -> None:
    session_id = _legacy_session(db_engine, "acme", {"planner_prompt": "old {{ text }}"})
    set_flag("acme", "templates")
    read = reader.read(session_id)
    assert (read.planner.text, read.planner.source) == ("old {{ text }}", PromptSource.UNMIGRATED)
    assert read.system.text is None


def test_legacy_text_changed_after_the_reference_wins_as_stale(
    db_engine: Engine, manager: TemplateManager, reader: SessionReader, set_flag: Any
) -> None:
    created = create_session(manager, "acme", ROLES, {"topic": "x"}, name="s")
    with db_engine.begin() as connection:
        connection.execute(
            update(OrchestrationSession)
            .where(OrchestrationSession.id == created.session_id)
            .values(planner_prompt="edited by an old app version")
        )
    set_flag("acme", "templates")
    planner = reader.read(created.session_id).planner
    assert (planner.text, planner.source) == ("edited by an old app version", PromptSource.STALE)


def test_a_backfilled_plain_text_is_served_from_its_version_until_the_legacy_text_changes(
    db_engine: Engine, reader: SessionReader, set_flag: Any
) -> None:
    texts = {"system_prompt": "Plain words.", "planner_prompt": "Plain words."}
    first = _legacy_session(db_engine, "acme", texts)
    second = _legacy_session(db_engine, "acme", texts)
    backfill(db_engine)
    set_flag("acme", "templates")

    before = reader.read_many([first, second])
    with db_engine.begin() as connection:
        connection.execute(
            update(OrchestrationSession)
            .where(OrchestrationSession.id == first)
            .values(system_prompt="Edited by an old app version.")
        )
    after = reader.read_many([first, second])

    for read in (before[first], before[second], after[second]):
        assert (read.system.role, read.planner.role) == (PromptRole.SYSTEM, PromptRole.PLANNER)
        assert read.texts() == {
            "system": "Plain words.",
            "planner": "Plain words.",
            "synthesis": None,
        }
        assert read.system.source is read.planner.source is PromptSource.TEMPLATE
        assert read.system.version_id is not None
    assert after[first].system.text == "Edited by an old app version."
    assert after[first].system.source is PromptSource.STALE
    assert after[first].planner.source is PromptSource.TEMPLATE


def test_a_backfilled_text_with_braces_is_served_from_its_version_without_rendering(
    db_engine: Engine,
    reader: SessionReader,
    set_flag: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jinja_looking = "Dear {{ user }},\r\n{% if x %} {# note #} {{'{'}} { lone"
    session_id = _legacy_session(db_engine, "acme", {"planner_prompt": jinja_looking})
    backfill(db_engine)
    set_flag("acme", "templates")

    def no_rendering(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("an imported text needs no rendering")

    monkeypatch.setattr(reader.manager, "render_resolved", no_rendering)
    planner = reader.read(session_id).planner

    assert (planner.text, planner.source) == (jinja_looking, PromptSource.TEMPLATE)


def test_shadow_returns_legacy_and_publishes_a_mismatch_without_the_full_text(
    db_engine: Engine,
    manager: TemplateManager,
    reader: SessionReader,
    publisher: Any,
    set_flag: Any,
) -> None:
    created = create_session(manager, "acme", ROLES, {"topic": "secret-topic"}, name="s")
    with db_engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE session_prompt_refs SET legacy_hash = 'x', variables = :vars "
                "WHERE role = 'planner'"
            ),
            {"vars": '{"topic": "other"}'},
        )
    set_flag("acme", "shadow", sample_rate=1.0)

    read = reader.read(created.session_id)

    assert read.planner.text == created.texts["planner"]
    assert read.planner.source is PromptSource.LEGACY
    (event,) = publisher.events
    assert (event.kind, event.role, event.session_id) == ("mismatch", "planner", created.session_id)
    assert event.legacy_hash != event.rendered_hash
    assert len(event.diff.splitlines()) <= 8
    assert reader.shadow_counts.snapshot()["acme"] == {"matched": 2, "mismatched": 1}


def test_shadow_sampling_at_zero_compares_nothing(
    manager: TemplateManager, reader: SessionReader, publisher: Any, set_flag: Any
) -> None:
    created = create_session(manager, "acme", ROLES, {"topic": "x"}, name="s")
    set_flag("acme", "shadow", sample_rate=0.0)
    reader.read(created.session_id)
    assert reader.shadow_counts.snapshot() == {}
    assert publisher.events == []


@pytest.mark.parametrize(("sample_rate", "references_read"), [(0.0, False), (1.0, True)])
def test_shadow_reads_references_only_for_the_sessions_it_compares(
    db_engine: Engine,
    manager: TemplateManager,
    reader: SessionReader,
    set_flag: Any,
    sample_rate: float,
    references_read: bool,
) -> None:
    created = create_session(manager, "acme", ROLES, {"topic": "x"}, name="s")
    set_flag("acme", "shadow", sample_rate=sample_rate)
    reader.read(created.session_id)  # warm the flag cache

    with statements_run(db_engine) as statements:
        read = reader.read(created.session_id)

    assert read.texts() == created.texts
    assert any("session_prompt_refs" in sql for sql in statements) is references_read


def test_a_role_relinked_while_a_batch_is_read_reads_as_stale_not_as_an_error(
    db_engine: Engine, manager: TemplateManager, reader: SessionReader, set_flag: Any
) -> None:
    manager.create(TemplateAddress("terse", Scope.GLOBAL), "Terse on {{ topic }}.", actor="root")
    created = create_session(manager, "acme", ROLES, {"topic": "tax"}, name="s")
    set_flag("acme", "templates")
    reader.read(created.session_id)  # warm the flag and version caches

    relinked: list[bool] = []

    def relink_before_the_full_references_are_read(*args: Any) -> None:
        if "legacy_hash" in args[2] and not relinked:
            relinked.append(True)
            set_session_template(manager, created.session_id, "planner", "terse")

    relink = relink_before_the_full_references_are_read
    event.listen(db_engine, "before_cursor_execute", relink)
    try:
        planner = reader.read(created.session_id).planner
    finally:
        event.remove(db_engine, "before_cursor_execute", relink)

    # The batch read the text before the relink and the reference after it: the text wins.
    assert (planner.text, planner.source) == (created.texts["planner"], PromptSource.STALE)
    assert planner.version_id is not None
    assert reader.read(created.session_id).planner.text == "Terse on tax."


def test_a_template_that_fails_to_render_serves_the_legacy_text(
    db_engine: Engine,
    manager: TemplateManager,
    reader: SessionReader,
    publisher: Any,
    set_flag: Any,
) -> None:
    manager.create(
        TemplateAddress("strict", Scope.GLOBAL),
        "needs {{ value }}",
        actor="root",
        variables=[{"name": "value", "type": "string"}],
    )
    created = create_session(manager, "acme", {"planner": "strict"}, {"value": "v"}, name="s")
    with db_engine.begin() as connection:
        connection.execute(text("UPDATE session_prompt_refs SET variables = '{}'"))
    set_flag("acme", "templates")
    planner = reader.read(created.session_id).planner
    assert (planner.text, planner.source) == ("needs v", PromptSource.RENDER_ERROR)
    assert [e.kind for e in publisher.events] == ["render_error"]


def test_editing_variables_re_renders_the_legacy_text_in_the_same_transaction(
    manager: TemplateManager, reader: SessionReader, set_flag: Any
) -> None:
    created = create_session(manager, "acme", ROLES, {"topic": "old"}, name="s")
    update_session_variables(manager, created.session_id, {"topic": "new"})
    set_flag("acme", "legacy")
    assert "about new." in (reader.read(created.session_id).planner.text or "")
    set_flag("acme", "templates")
    read = reader.read(created.session_id)
    assert read.planner.source is PromptSource.TEMPLATE
    assert "about new." in (read.planner.text or "")


def test_switching_a_role_to_another_template_rewrites_its_legacy_text(
    manager: TemplateManager, reader: SessionReader
) -> None:
    manager.create(TemplateAddress("terse", Scope.GLOBAL), "Terse on {{ topic }}.", actor="root")
    created = create_session(manager, "acme", ROLES, {"topic": "tax"}, name="s")
    set_session_template(manager, created.session_id, "planner", "terse")
    assert reader.read(created.session_id).planner.text == "Terse on tax."


def test_batch_read_costs_the_same_statements_for_10_and_1000_sessions(
    db_engine: Engine, manager: TemplateManager, reader: SessionReader, set_flag: Any
) -> None:
    ids = [
        create_session(manager, "acme", ROLES, {"topic": f"t{i % 7}"}, name=f"s{i}").session_id
        for i in range(10)
    ]
    set_flag("acme", "templates")
    reader.read_many(ids)  # warm the flag cache

    def count(session_ids: list[int]) -> int:
        with statements_run(db_engine) as statements:
            read = reader.read_many(session_ids)
        assert all(p.planner.source is PromptSource.TEMPLATE for p in read.values())
        return len(statements)

    small = count(ids)
    with db_engine.begin() as connection:
        rows = (
            connection.execute(
                text(
                    "SELECT session_id, role, prompt_version_id, variables, legacy_hash, source "
                    "FROM session_prompt_refs WHERE session_id = :id"
                ),
                {"id": ids[0]},
            )
            .mappings()
            .all()
        )
        session = (
            connection.execute(
                text("SELECT * FROM orchestration_sessions WHERE id = :id"), {"id": ids[0]}
            )
            .mappings()
            .one()
        )
        new_ids = []
        for i in range(990):
            new_id = connection.execute(
                OrchestrationSession.__table__.insert()
                .values(
                    project_id=session["project_id"],
                    name=f"bulk{i}",
                    system_prompt=session["system_prompt"],
                    planner_prompt=session["planner_prompt"],
                    synthesis_prompt=session["synthesis_prompt"],
                )
                .returning(OrchestrationSession.id)
            ).scalar_one()
            new_ids.append(new_id)
        connection.execute(
            text(
                "INSERT INTO session_prompt_refs "
                "(session_id, role, prompt_version_id, variables, legacy_hash, source) "
                "VALUES (:session_id, :role, :prompt_version_id, :variables, :legacy_hash, :source)"
            ),
            [
                {**row, "session_id": new_id, "variables": '{"topic": "t0"}'}
                for new_id in new_ids
                for row in rows
            ],
        )
    assert count(ids + new_ids) == small


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"], indirect=True)
def test_a_template_session_reads_the_same_after_alembic_downgrade(
    head_db_url: str, manager: TemplateManager, reader: SessionReader, set_flag: Any
) -> None:
    created = create_session(manager, "acme", ROLES, {"topic": "rollback"}, name="s")
    set_flag("acme", "templates")
    through_templates = reader.read(created.session_id).texts()
    manager.engine.dispose()
    reader.flags.close()

    schema.downgrade(head_db_url, "-1", discard_user_templates=True)

    from prompt_tool.db.engine import make_engine

    engine = make_engine(head_db_url)
    try:
        with engine.connect() as connection:
            row = (
                connection.execute(
                    text(
                        "SELECT system_prompt, planner_prompt, synthesis_prompt "
                        "FROM orchestration_sessions WHERE id = :id"
                    ),
                    {"id": created.session_id},
                )
                .mappings()
                .one()
            )
    finally:
        engine.dispose()
    assert {column.removesuffix("_prompt"): value for column, value in row.items()} == (
        through_templates
    )


def test_the_fast_constructors_build_the_same_objects_as_the_dataclasses() -> None:
    # The reader builds its results through each slot's setter, not __init__: the objects must
    # be indistinguishable from ones built the ordinary way, every field included.
    system = new_role_prompt(PromptRole.SYSTEM, "s", PromptSource.TEMPLATE, 7)
    planner = new_role_prompt(PromptRole.PLANNER, None, PromptSource.LEGACY)
    synthesis = new_role_prompt(PromptRole.SYNTHESIS, "y", PromptSource.STALE, 9)
    assert system == RolePrompt(PromptRole.SYSTEM, "s", PromptSource.TEMPLATE, 7)
    assert planner == RolePrompt(PromptRole.PLANNER, None, PromptSource.LEGACY)
    assert planner.version_id is None
    built = new_session_prompts(1, "acme", "templates", system, planner, synthesis)
    assert built == SessionPrompts(1, "acme", "templates", system, planner, synthesis)
    assert repr(built) == repr(SessionPrompts(1, "acme", "templates", system, planner, synthesis))
    assert hash(system) == hash(RolePrompt(PromptRole.SYSTEM, "s", PromptSource.TEMPLATE, 7))


def test_a_global_template_whose_include_differs_per_project_reads_each_projects_text(
    db_engine: Engine, manager: TemplateManager, reader: SessionReader, set_flag: Any
) -> None:
    """One global version, rendered in one batch for two projects whose `signature` differ."""
    manager.create(TemplateAddress("signature", Scope.GLOBAL), "-- everyone", actor="root")
    for project in ("acme", "beta"):
        manager.create(
            TemplateAddress("signature", Scope.PROJECT, project=project),
            f"-- the {project} team",
            actor="root",
        )
    manager.create(
        TemplateAddress("signed", Scope.GLOBAL),
        'Hello {{ topic }} {% include "signature" %}',
        actor="root",
    )
    acme = create_session(manager, "acme", {"system": "signed"}, {"topic": "x"}, name="a")
    beta = create_session(manager, "beta", {"system": "signed"}, {"topic": "x"}, name="b")
    set_flag("acme", "templates")
    set_flag("beta", "templates")

    read = reader.read_many([acme.session_id, beta.session_id])

    assert read[acme.session_id].system.text == "Hello x -- the acme team"
    assert read[beta.session_id].system.text == "Hello x -- the beta team"
    assert {read[s].system.source for s in read} == {PromptSource.TEMPLATE}
    report = verify(db_engine)
    assert report.passed, report.mismatches


def test_a_read_names_each_roles_template_version_and_needs_no_connection_of_its_own(
    db_engine: Engine, manager: TemplateManager, reader: SessionReader, set_flag: Any
) -> None:
    created = create_session(manager, "acme", ROLES, {"topic": "x"}, name="s")
    set_flag("acme", "templates")
    reader.read(created.session_id)  # warm the flag cache: flags are read on connections apart
    with db_engine.connect() as connection:
        checkouts: list[object] = []

        def checked_out(*args: object) -> None:
            checkouts.append(args)

        event.listen(db_engine.pool, "checkout", checked_out)
        try:
            read = reader.read(created.session_id, connection=connection)
        finally:
            event.remove(db_engine.pool, "checkout", checked_out)
    assert checkouts == []  # every statement on the caller's connection
    for role, prompt in read.by_role().items():
        assert prompt.source is PromptSource.TEMPLATE
        assert (prompt.template, prompt.version) == (role.value, 1)
        assert prompt.version_id is not None

    set_flag("acme", "legacy")
    legacy = reader.read(created.session_id).planner
    assert (legacy.version_id, legacy.template, legacy.version) == (None, None, None)
