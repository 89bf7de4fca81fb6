"""A flag change takes effect where readers read the flag, or is refused in one line saying where
the flag lives. While readers read a flagd file (``PROMPT_TOOL_FLAG_PROVIDER=flagd-file``) or any
other provider given with ``flags.use_provider``, `flag set` / `flag unset` and the library writes
behind them refuse and write nothing; `flag get` and `flag list` show what the read path gets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_run import run_cli
from openfeature.provider.in_memory_provider import InMemoryFlag, InMemoryProvider
from sqlalchemy import Engine, select, text

from prompt_tool import flags
from prompt_tool.cli._runtime import new_app
from prompt_tool.cli.flag_commands import flag_app
from prompt_tool.compat import SessionReader
from prompt_tool.db.models import FeatureFlagEvent, FeatureFlagState, OrchestrationSession
from prompt_tool.errors import ConfigurationError
from prompt_tool.flags import FlagService, ProviderKind, Variant

app = new_app("test host for the flag sub-app")
app.add_typer(flag_app, name="flag")

BY_ENV = "(PROMPT_TOOL_FLAG_PROVIDER=flagd-file)"


def cli(*args: str) -> tuple[int, str, str]:
    return run_cli(app, ["orch-migrate", "flag", *args])


def cli_json(*args: str) -> Any:
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def url(db: Engine, head_db_url: str) -> str:
    """The database of ``db`` (projects acme, beta, gamma), as a URL for the CLI."""
    return head_db_url


def flag_tables(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the flag's two tables, to prove a refused command wrote nothing."""
    with engine.connect() as connection:
        return {
            model.__tablename__: [
                tuple(row)
                for row in connection.execute(
                    select(model.__table__).order_by(*model.__table__.primary_key.columns)
                )
            ]
            for model in (FeatureFlagState, FeatureFlagEvent)
        }


def legacy_session(engine: Engine, project: str) -> int:
    with engine.begin() as connection:
        project_id = connection.execute(
            text("SELECT id FROM projects WHERE slug = :slug"), {"slug": project}
        ).scalar_one()
        return int(
            connection.execute(
                OrchestrationSession.__table__.insert()
                .values(project_id=project_id, name=project, planner_prompt="Plan it.")
                .returning(OrchestrationSession.id)
            ).scalar_one()
        )


def stale_rows(db: Engine) -> None:
    """Rows written while the database was read, which disagree with the example flagd file
    (it lists acme: templates)."""
    flags.set_default(db, "legacy", actor="ops")
    flags.set_variant(db, "acme", "shadow", sample_rate=0.5, actor="ops")
    flags.set_variant(db, "beta", "templates", actor="ops")


PROJECT = '"orchestration-templates" targeting for project acme'
DEFAULT = '"orchestration-templates" defaultVariant'
REFUSED = [
    pytest.param(("set", "--project", "acme", "legacy"), PROJECT, id="set"),
    # The switch forward: the readiness check (which would refuse templates here, nothing is
    # backfilled) is not even reached, --force or not.
    pytest.param(("set", "--project", "acme", "templates"), PROJECT, id="templates"),
    pytest.param(("set", "--project", "acme", "templates", "--force"), PROJECT, id="forced"),
    pytest.param(("set", "--default", "legacy"), DEFAULT, id="default"),
    pytest.param(("unset", "--project", "acme"), PROJECT, id="unset"),
    pytest.param(("unset", "--default"), DEFAULT, id="unset-default"),
]


@pytest.mark.parametrize(("args", "what"), REFUSED)
def test_flag_set_under_flagd_provider_is_refused_and_writes_nothing(
    db: Engine,
    url: str,
    flagd_by_env: Callable[[], Path],
    args: tuple[str, ...],
    what: str,
) -> None:
    stale_rows(db)
    before = flag_tables(db)
    path = flagd_by_env()

    code, out, err = cli(*args, "--as", "alice", "--db", url)

    assert code == 2
    assert out == ""
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1
    assert f"the flag is read from the flagd file {path} {BY_ENV}, not the database" in err
    assert "nothing was changed" in err
    assert f"edit its {what} there" in err
    assert err.rstrip().endswith("or unset PROMPT_TOOL_FLAG_PROVIDER to use the database")
    assert flag_tables(db) == before


def test_flag_get_and_list_under_flagd_show_what_the_read_path_gets(
    db: Engine, url: str, flagd_by_env: Callable[[], Path]
) -> None:
    stale_rows(db)
    sessions = {slug: legacy_session(db, slug) for slug in ("acme", "beta", "gamma")}
    path = flagd_by_env()

    # The CLI first, as a fresh `orch-migrate` process would run it.
    listing = cli_json("list", "--db", url)
    statuses = {slug: cli_json("get", "--project", slug, "--db", url) for slug in sessions}
    with FlagService(db) as service:
        evaluated = service.variants_for((slug, None) for slug in sessions)
        read = SessionReader(db, flags=service).read_many(sessions.values())
    readers_get = {slug: read[session_id].variant for slug, session_id in sessions.items()}

    assert readers_get["acme"] == "templates"  # the file lists acme; the database says shadow
    assert {slug: d.variant.value for slug, d in evaluated.items()} == readers_get
    assert {p["project_slug"]: p["variant"] for p in listing["projects"]} == readers_get
    assert {slug: s["variant"] for slug, s in statuses.items()} == readers_get
    for where in [listing["read_from"], *(s["read_from"] for s in statuses.values())]:
        assert (where["kind"], where["flagd_file"]) == ("flagd-file", str(path))
    assert {p["source"] for p in listing["projects"]} == {"provider"}
    assert {s["source"] for s in statuses.values()} == {"provider"}
    assert listing["provider"] == statuses["acme"]["provider"] == "FlagdProvider"
    # The stored rows stay in the JSON (same keys as before), beside what readers get.
    assert [o["project_slug"] for o in listing["overrides"]] == ["acme", "beta"]


def test_flag_get_and_list_tables_under_flagd_name_the_file_and_never_show_database_rows_as_read(
    db: Engine, url: str, flagd_by_env: Callable[[], Path]
) -> None:
    stale_rows(db)
    path = flagd_by_env()

    code, out, err = cli("list", "--db", url)
    assert code == 0, err
    flat = " ".join(out.split())
    assert f"read from the flagd file {path} {BY_ENV}" in flat
    assert (
        "Not read: the database's flag rows (default legacy, acme shadow, beta templates)" in flat
    )
    acme = next(line for line in out.splitlines() if " acme " in line)
    assert "templates" in acme and "shadow" not in acme

    code, out, err = cli("get", "--project", "acme", "--db", url)
    assert code == 0, err
    lines = out.splitlines()
    assert "templates" in next(line for line in lines if " variant " in line)
    assert "(not read)" in " ".join(" ".join(line.split()) for line in lines)
    assert not any(line.split("│")[1].strip() == "override" for line in lines if "│" in line)


def test_flag_history_under_flagd_says_the_flag_is_read_from_the_file(
    db: Engine, url: str, flagd_by_env: Callable[[], Path]
) -> None:
    flags.set_variant(db, "acme", "shadow", actor="ops")
    path = flagd_by_env()

    code, out, err = cli("history", "--json", "--db", url)

    assert code == 0
    assert [e["new_variant"] for e in json.loads(out)] == ["shadow"]
    assert err.strip().splitlines() == [
        f"note: the flag is read from the flagd file {path} {BY_ENV}; this is the history of "
        "the database's rows, which readers do not read"
    ]


@pytest.mark.parametrize("bound", [False, True], ids=["configured-only", "provider-bound"])
def test_library_writes_under_flagd_provider_are_refused_and_write_nothing(
    db: Engine, flagd_by_env: Callable[[], Path], bound: bool
) -> None:
    stale_rows(db)
    before = flag_tables(db)
    path = flagd_by_env()
    if bound:
        flags.configure_provider_from_env()
    asked: list[flags.PendingChange] = []
    writes: list[Callable[[], flags.FlagChange]] = [
        lambda: flags.set_variant(db, "acme", "legacy", actor="ops", guard=asked.append),
        lambda: flags.set_default(db, "templates", actor="ops", guard=asked.append),
        lambda: flags.unset_variant(db, "acme", actor="ops"),
        lambda: flags.unset_default(db, actor="ops"),
    ]

    for write in writes:
        with pytest.raises(flags.FlagReadElsewhereError) as refused:
            write()
        assert isinstance(refused.value, ConfigurationError)
        assert refused.value.exit_code == 2
        message = str(refused.value)
        assert f"the flagd file {path} {BY_ENV}" in message and "\n" not in message

    assert asked == []  # refused before any guard (readiness) is asked
    assert flag_tables(db) == before


def test_where_the_flag_lives_is_the_same_before_and_after_the_flagd_file_is_bound(
    flagd_by_env: Callable[[], Path],
) -> None:
    path = flagd_by_env()

    configured = flags.flag_location()
    flags.configure_provider_from_env()
    bound = flags.flag_location()

    assert configured == bound
    assert (bound.kind, bound.flagd_file, bound.provider) == (
        ProviderKind.FLAGD_FILE,
        str(path),
        "FlagdProvider",
    )


def _in_memory(variant: str) -> InMemoryProvider:
    return InMemoryProvider(
        {flags.FLAG_KEY: InMemoryFlag(variant, {v.value: v.value for v in Variant})}
    )


@pytest.mark.parametrize(
    ("make", "where"),
    [
        (lambda _: _in_memory("templates"), "the OpenFeature provider 'In-Memory Provider'"),
        (flags.flagd_file_provider, "the flagd file {path}"),
    ],
    ids=["in-memory", "flagd-file-in-code"],
)
def test_writes_under_a_provider_given_in_code_are_refused_naming_it(
    db: Engine,
    url: str,
    example_flagd_file: Path,
    make: Callable[[Path], Any],
    where: str,
) -> None:
    stale_rows(db)
    before = flag_tables(db)
    flags.use_provider(make(example_flagd_file))
    expected = f"the flag is read from {where.format(path=example_flagd_file)} (flags.use_provider)"

    with pytest.raises(flags.FlagReadElsewhereError) as refused:
        flags.set_variant(db, "acme", "legacy", actor="ops")
    code, out, err = cli("set", "--project", "acme", "legacy", "--db", url)

    assert expected in str(refused.value)
    assert str(refused.value).endswith("or call flags.reset_provider() to use the database")
    assert (code, out) == (2, "")
    assert expected in err and len(err.strip().splitlines()) == 1
    assert flag_tables(db) == before

    flags.reset_provider()
    assert flags.set_variant(db, "acme", "legacy", actor="ops").changed


def test_a_database_provider_in_code_takes_writes_to_its_own_database_only(
    db: Engine,
    other_head_db_url: str,
    engine_for: Any,
    projects_in: Callable[..., dict[str, int]],
) -> None:
    other: Engine = engine_for(other_head_db_url)
    projects_in(other, "acme")
    flags.use_provider(flags.DatabaseFlagProvider(db))

    assert flags.set_variant(db, "acme", "templates", actor="ops").changed
    with FlagService(db) as service:
        assert service.variant_for("acme").variant is Variant.TEMPLATES
    before = flag_tables(other)
    with pytest.raises(flags.FlagReadElsewhereError, match="not this database: nothing was"):
        flags.set_variant(other, "acme", "legacy", actor="ops")
    assert flag_tables(other) == before


def test_flag_set_with_a_malformed_provider_setting_is_refused_and_writes_nothing(
    db: Engine, url: str, fresh_process_env: Callable[[dict[str, str]], None]
) -> None:
    before = flag_tables(db)
    fresh_process_env({"PROMPT_TOOL_FLAG_PROVIDER": "launchdarkly"})

    code, out, err = cli("set", "--project", "acme", "legacy", "--db", url)

    assert (code, out) == (2, "")
    assert "PROMPT_TOOL_FLAG_PROVIDER='launchdarkly' is not a flag provider" in err
    assert "use one of database, flagd-file" in err
    assert flag_tables(db) == before


def test_flag_list_on_the_database_shows_each_projects_effective_variant_and_who_set_it(
    db: Engine, url: str
) -> None:
    flags.set_default(db, "shadow", sample_rate=0.2, actor="bob")
    flags.set_variant(db, "acme", "templates", actor="alice")

    listing = cli_json("list", "--db", url)
    code, out, err = cli("list", "--db", url)

    assert listing["read_from"]["kind"] == "database"
    assert listing["provider"] == "prompt-tool-database"
    assert [(p["project_slug"], p["variant"], p["source"]) for p in listing["projects"]] == [
        ("acme", "templates", "override"),
        ("beta", "shadow", "default"),
        ("gamma", "shadow", "default"),
    ]
    assert listing["projects"][1]["sample_rate"] == 0.2
    assert code == 0, err
    assert "Not read" not in out
    acme = next(line for line in out.splitlines() if " acme " in line)
    assert "templates" in acme and "override" in acme and "alice" in acme


def test_the_kill_switch_shows_every_project_reading_legacy(
    db: Engine, url: str, fresh_process_env: Callable[[dict[str, str]], None]
) -> None:
    flags.set_variant(db, "acme", "templates", actor="ops")
    fresh_process_env({"PROMPT_TOOL_TEMPLATES_ENABLED": "0"})

    listing = cli_json("list", "--db", url)

    assert listing["kill_switch"] is True
    assert {(p["variant"], p["source"]) for p in listing["projects"]} == {("legacy", "kill_switch")}
