"""check_connection says something true for each dialect: a file for SQLite, a server otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from prompt_tool.db.engine import check_connection, make_engine
from prompt_tool.errors import DatabaseUnavailableError


def test_a_sqlite_file_that_cannot_be_opened_names_the_path_not_a_server(tmp_path: Path) -> None:
    missing_dir = tmp_path / "no-such-dir" / "x.db"
    engine = make_engine(f"sqlite:///{missing_dir}")
    with pytest.raises(DatabaseUnavailableError) as raised:
        check_connection(engine)
    message = str(raised.value)
    assert str(missing_dir) in message
    assert "directory exists" in message
    assert "server is running" not in message
    assert "\n" not in message


def test_a_postgresql_server_that_does_not_answer_still_says_so() -> None:
    engine = make_engine("postgres://nobody@127.0.0.1:1/db", connect_args={"connect_timeout": 2})
    with pytest.raises(DatabaseUnavailableError, match="server is running"):
        check_connection(engine)
