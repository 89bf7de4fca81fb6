from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from prompt_tool.cli import orch_migrate
from prompt_tool.db.url import normalize_url, redact, resolve_url
from prompt_tool.errors import ConfigurationError, DatabaseUnavailableError
from prompt_tool.settings import DEFAULT_DATABASE_URL, Settings, get_settings


def test_postgresql_urls_use_psycopg_3() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"


def test_unsupported_databases_are_refused_with_the_supported_forms() -> None:
    with pytest.raises(ConfigurationError, match=r"sqlite:/// or postgresql://"):
        normalize_url("mysql://root@localhost/db")


def test_unparseable_url_is_refused_with_an_example() -> None:
    with pytest.raises(ConfigurationError, match="postgresql://user@host"):
        normalize_url("not a url")


def test_passwords_never_appear_in_messages() -> None:
    assert "s3cret" not in redact("postgresql://user:s3cret@host/db")


def test_url_comes_from_flag_then_environment_then_embedded_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PROMPT_TOOL_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    assert resolve_url(None, create=True) == DEFAULT_DATABASE_URL == "sqlite:///prompt_tool.db"
    monkeypatch.setenv("PROMPT_TOOL_DATABASE_URL", "postgresql://env@h/db")
    get_settings.cache_clear()
    assert resolve_url(None) == "postgresql://env@h/db"
    assert resolve_url("sqlite:///explicit.db", create=True) == "sqlite:///explicit.db"
    get_settings.cache_clear()


def test_a_missing_sqlite_file_is_refused_unless_the_command_creates_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatabaseUnavailableError, match=r"no database file at .*typo\.db; run"):
        resolve_url("sqlite:///typo.db")
    assert resolve_url("sqlite:///typo.db", create=True) == "sqlite:///typo.db"
    (tmp_path / "there.db").touch()
    assert resolve_url("sqlite:///there.db") == "sqlite:///there.db"
    assert resolve_url("sqlite://") == "sqlite://"
    assert not (tmp_path / "typo.db").exists()


def test_a_read_command_on_a_mistyped_path_says_so_and_creates_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(orch_migrate.app, ["verify", "--db", "sqlite:///typo.db"])
    created = CliRunner().invoke(orch_migrate.app, ["db", "upgrade", "--db", "sqlite:///new.db"])

    assert result.exit_code == 2
    assert "no database file at" in result.output
    assert not (tmp_path / "typo.db").exists()
    assert created.exit_code == 0, created.output
    assert (tmp_path / "new.db").exists()


def test_malformed_settings_name_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="PROMPT_TOOL_LOCK_TIMEOUT_MS"):
        Settings.from_env({"PROMPT_TOOL_LOCK_TIMEOUT_MS": "soon"})
    with pytest.raises(ConfigurationError, match="PROMPT_TOOL_TEMPLATES_ENABLED"):
        Settings.from_env({"PROMPT_TOOL_TEMPLATES_ENABLED": "maybe"})


def test_postgres_scheme_from_hosted_platforms_means_postgresql_with_psycopg_3() -> None:
    assert normalize_url("postgres://u:p@h:5432/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").get_backend_name() == "postgresql"
    assert "p@" not in redact(normalize_url("postgres://u:p@h:5432/db"))


def test_an_empty_url_is_refused_instead_of_falling_back_to_the_default() -> None:
    with pytest.raises(ConfigurationError, match="--db is empty"):
        resolve_url("")
    with pytest.raises(ConfigurationError, match="--db is empty"):
        resolve_url("  ", create=True)
    with pytest.raises(ConfigurationError, match="URL is empty"):
        normalize_url("")


def test_an_empty_db_option_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(orch_migrate.app, ["db", "upgrade", "--db", ""])
    assert result.exit_code == 2
    assert "--db is empty" in result.output
    assert not (tmp_path / "prompt_tool.db").exists()
