"""Who may do what: a denied action names who, what and the role needed, and writes nothing."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, func, select

from prompt_tool.core.errors import PermissionDenied
from prompt_tool.db.engine import make_session_factory, session_scope
from prompt_tool.db.models import Prompt, Scope, TemplatePermission
from prompt_tool.templates import TemplateAddress, TemplateManager, grant_role, list_grants
from prompt_tool.templates.permissions import revoke_role

ACME = TemplateAddress("planner", Scope.PROJECT, project="acme")


def _prompts(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(Prompt)).scalar_one())


def test_global_templates_need_a_global_admin(manager: TemplateManager, db_engine: Engine) -> None:
    with pytest.raises(
        PermissionDenied, match=r"ed may not edit template 'tone' \(global\).*global admin"
    ):
        manager.create(TemplateAddress("tone", Scope.GLOBAL), "x", actor="ed")
    assert _prompts(db_engine) == 0
    manager.create(TemplateAddress("tone", Scope.GLOBAL), "x", actor="root")


def test_project_templates_need_an_editor_of_that_project(
    manager: TemplateManager, db_engine: Engine
) -> None:
    with pytest.raises(PermissionDenied, match=r"vi may not edit .* needs role editor .* acme"):
        manager.create(ACME, "x", actor="vi")
    with pytest.raises(PermissionDenied, match="needs role editor"):
        manager.create(TemplateAddress("p", Scope.PROJECT, project="beta"), "x", actor="ed")
    assert _prompts(db_engine) == 0
    manager.create(ACME, "x", actor="ed")


def test_viewers_read_but_do_not_write(manager: TemplateManager) -> None:
    manager.create(ACME, "x", actor="ed")
    assert manager.show(ACME, actor="vi").source == "x"
    with pytest.raises(PermissionDenied):
        manager.update(ACME, "y", actor="vi")
    with pytest.raises(PermissionDenied, match="needs role viewer"):
        manager.show(ACME, actor="stranger")


def test_custom_templates_belong_to_their_owner(manager: TemplateManager) -> None:
    mine = TemplateAddress("planner", Scope.CUSTOM, project="acme", owner="vi")
    manager.create(mine, "my own", actor="vi")
    with pytest.raises(PermissionDenied, match="belong to vi only"):
        manager.update(mine, "hijacked", actor="ed")
    assert [t.owner for t in manager.list_templates(actor="ed", scope=Scope.CUSTOM)] == []
    assert [t.owner for t in manager.list_templates(actor="vi", scope=Scope.CUSTOM)] == ["vi"]


def test_denied_label_move_writes_nothing(manager: TemplateManager) -> None:
    manager.create(ACME, "one", actor="ed")
    manager.update(ACME, "two", actor="ed")
    with pytest.raises(PermissionDenied):
        manager.move_label(ACME, "production", 2, actor="vi")
    assert manager.resolve("planner", project="acme").version == 1


def test_first_global_admin_bootstraps_then_only_admins_grant(db_engine: Engine) -> None:
    factory = make_session_factory(db_engine)
    with session_scope(factory) as session, pytest.raises(PermissionDenied):
        grant_role(session, "ed", "ed", "admin", None)  # root already exists
    with (
        session_scope(factory) as session,
        pytest.raises(PermissionDenied, match="needs role admin"),
    ):
        grant_role(session, "ed", "vi", "editor", "acme")
    with session_scope(factory) as session:
        grant_role(session, "root", "ed", "admin", "acme")
    with session_scope(factory) as session:
        grant_role(session, "ed", "vi", "editor", "acme")
        roles = {(g.user, g.project): g.role for g in list_grants(session, "acme")}
    assert roles[("vi", "acme")] == "editor"


def test_revoke_removes_the_role(db_engine: Engine) -> None:
    factory = make_session_factory(db_engine)
    with session_scope(factory) as session:
        revoke_role(session, "root", "vi", "acme")
    with db_engine.connect() as connection:
        left = (
            connection.execute(
                select(TemplatePermission.user_name).where(
                    TemplatePermission.project_id.is_not(None)
                )
            )
            .scalars()
            .all()
        )
    assert left == ["ed"]
