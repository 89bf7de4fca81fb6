"""Projects looked up by slug: what every command that takes --project relies on."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text

from prompt_tool.db.projects import projects_by_slug
from prompt_tool.errors import NotFoundError


def _ids(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT slug, id FROM projects"))
        return {slug: project_id for slug, project_id in rows}


def test_no_slug_means_every_project_in_id_order(db_engine: Engine) -> None:
    ids = _ids(db_engine)
    with db_engine.connect() as connection:
        found = projects_by_slug(connection, [])
    assert list(found.items()) == sorted((i, slug) for slug, i in ids.items())


def test_named_projects_only(db_engine: Engine) -> None:
    with db_engine.connect() as connection:
        found = projects_by_slug(connection, ["beta"])
    assert found == {_ids(db_engine)["beta"]: "beta"}


def test_every_unknown_slug_is_named_in_one_error(db_engine: Engine) -> None:
    with db_engine.connect() as connection, pytest.raises(NotFoundError) as raised:
        projects_by_slug(connection, ["nope", "acme", "ghost", "nope"])
    assert str(raised.value).startswith("no project with slug 'nope', 'ghost'; ")
    assert "projects list" in str(raised.value)
