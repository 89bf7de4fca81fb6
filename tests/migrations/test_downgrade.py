"""`db downgrade` of 0002 is an exact inverse for the legacy tables, never half-applied, and loses
nothing a person wrote: archived and restored, refused, or discarded only when asked.

The head is above 0002 (0003, the backfill quarantine): each test goes down to 0001, through
0003's downgrade (it only drops its table) to 0002's, the one under test."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from prompt_tool.cli.orch_migrate import app as orch_migrate
from prompt_tool.cli.prompt_tool import app as prompt_tool_app
from prompt_tool.db import online_ddl, schema
from prompt_tool.errors import MigrationRefusedError, SchemaError
from prompt_tool.migrate.backfill import BackfillOptions, backfill
from prompt_tool.migrate.backfill import batch as backfill_batch
from prompt_tool.migrate.backfill import command as backfill_command
from prompt_tool.migrate.fingerprint import changed_tables, fingerprint_connection
from prompt_tool.migrate.restore import restore
from prompt_tool.migrate.retract import ArchiveOutdatedError, UserDataWouldBeLostError
from prompt_tool.migrate.verify import verify
from prompt_tool.settings import get_settings
from tests.cli_run import run_cli

REPO = Path(__file__).resolve().parents[2]
HEAD = schema.history()[-1].revision
BIN = Path(sys.executable).parent
# What people make with templates, compared row by row across the archive's round trip.
PEOPLES_WORK = {
    "prompts": "SELECT * FROM prompts WHERE prompt_type = 'orchestration_template'"
    " AND category IS DISTINCT FROM 'imported' ORDER BY id",
    "prompt_versions": "SELECT v.* FROM prompt_versions v JOIN prompts p ON p.id = v.prompt_id"
    " WHERE p.category IS DISTINCT FROM 'imported' AND p.prompt_type = 'orchestration_template'"
    " ORDER BY v.id",
    "template_labels": "SELECT * FROM template_labels ORDER BY prompt_id, label",
    "template_events": "SELECT * FROM template_events ORDER BY id",
    "session_prompt_refs": "SELECT * FROM session_prompt_refs WHERE source = 'dual_write'"
    " ORDER BY session_id, role",
    "ab_tests": "SELECT * FROM ab_tests WHERE target_role IS NOT NULL ORDER BY id",
    "ab_test_variants": "SELECT a.* FROM ab_test_variants a JOIN ab_tests t ON t.id = a.ab_test_id"
    " WHERE t.target_role IS NOT NULL ORDER BY a.id",
}


@pytest.fixture
def at_0001(empty_db_url: str) -> tuple[str, Any]:
    """A legacy deployment at 0001 with sample data, and its fingerprint then."""
    schema.upgrade(empty_db_url, "0001")
    code, _, err = run_cli(
        orch_migrate,
        ["orch-migrate", "sample-data", "--sessions", "400", "--db", empty_db_url],
    )
    assert code == 0, err
    return empty_db_url, _fingerprint(empty_db_url)


def _fingerprint(url: str) -> Any:
    from prompt_tool.db.engine import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return fingerprint_connection(connection)
    finally:
        engine.dispose()


def _cli(app: Any, *args: str) -> tuple[int, str, str]:
    return run_cli(app, ["tool", *args])


def _peoples_work(url: str, dialect: str) -> None:
    """As a person would: a template with two versions and a label, an A/B test of them, and a
    session created through it."""
    folder = Path(tempfile.mkdtemp())
    first, second = folder / "v1.j2", folder / "v2.j2"
    first.write_bytes(b"Plan {{ goal }}.\r\n")
    second.write_bytes(b"Plan {{ goal }}!")
    for args in (
        ["roles", "grant", "ops", "admin", "--global"],
        ["templates", "create", "planner", "--project", "project-1", "--file", str(first)],
        ["templates", "update", "planner", "--project", "project-1", "--file", str(second)],
        ["templates", "label", "planner", "stable", "1", "--project", "project-1"],
        [
            "ab", "create", "wording", "--template", "planner", "--role", "planner",
            "--project", "project-1", "--variant", "a=1", "--variant", "b=2",
        ],
        [
            "sessions", "create", "--project", "project-1", "--name", "launch",
            "--planner", "planner", "--var", "goal=the launch",
        ],
    ):  # fmt: skip
        code, out, err = _cli(prompt_tool_app, *args, "--as", "ops", "--db", url)
        assert code == 0, f"{args}: {out}{err}"


def _rows(engine: Engine) -> dict[str, list[Any]]:
    with engine.connect() as connection:
        return {
            table: [tuple(row) for row in connection.execute(text(query))]
            for table, query in PEOPLES_WORK.items()
        }


def _revision(url: str) -> str | None:
    return schema.current(url).current


# --- revision forms ---------------------------------------------------------------------------


def test_every_revision_form_alembic_users_type_is_accepted(at_0001: tuple[str, Any]) -> None:
    url, _ = at_0001
    for args, reached in (
        (["db", "upgrade", "+1"], "0002"),
        (["db", "downgrade", "-1"], "0001"),
        (["db", "upgrade", "head", "--json"], HEAD),
        (["db", "downgrade", "0001", "--json"], "0001"),
        (["db", "upgrade", "0002"], "0002"),
        (["db", "downgrade", "--json", "-1"], "0001"),
    ):
        code, out, err = _cli(orch_migrate, *args, "--db", url)
        assert code == 0, f"{args}: {out}{err}"
        assert _revision(url) == reached, args


@pytest.mark.parametrize("target", ["base", f"-{len(schema.history())}"])
def test_going_below_0001_is_refused_unless_asked_and_changes_nothing(
    at_0001: tuple[str, Any], target: str
) -> None:
    url, before = at_0001
    schema.upgrade(url)
    code, _, err = _cli(orch_migrate, "db", "downgrade", target, "--db", url)
    assert code == 2
    assert err.count("\n") == 1 and "i-understand-this-drops-legacy-tables" in err
    assert _revision(url) == "0001"  # down to 0001 done, the step below refused
    assert changed_tables(before, _fingerprint(url)) == []
    code, _, err = _cli(
        orch_migrate, "db", "downgrade", "base", "--i-understand-this-drops-legacy-tables",
        "--db", url,
    )  # fmt: skip
    assert code == 0, err
    assert _revision(url) is None


def test_plain_alembic_below_0001_is_refused_in_one_line(at_0001: tuple[str, Any]) -> None:
    url, before = at_0001
    result = subprocess.run(
        [str(BIN / "alembic"), "-x", f"db={url}", "downgrade", "-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "refused: going below 0001" in result.stderr
    assert _revision(url) == "0001"
    assert changed_tables(before, _fingerprint(url)) == []


# --- the exact inverse --------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_the_fingerprint_at_0001_equals_the_one_after_upgrade_backfill_downgrade(
    at_0001: tuple[str, Any], engine_for: Any, workers: int
) -> None:
    url, before = at_0001
    schema.upgrade(url)
    engine = engine_for(url)
    summary = backfill(engine, BackfillOptions(workers=workers, batch_size=97))
    assert summary.templates_created > 0
    engine.dispose()

    state = schema.downgrade(url, "0001")

    assert state.current == "0001"
    assert state.removed["prompts"] == summary.templates_created
    assert changed_tables(before, _fingerprint(url)) == []
    assert schema.check(url).consistent


def test_peoples_work_without_an_archive_is_refused_and_nothing_changes(
    at_0001: tuple[str, Any], engine_for: Any, dialect: str
) -> None:
    url, _ = at_0001
    schema.upgrade(url)
    engine = engine_for(url)
    backfill(engine)
    _peoples_work(url, dialect)
    work, middle = _rows(engine), _fingerprint(url)
    engine.dispose()

    with pytest.raises(UserDataWouldBeLostError, match="--archive DIR"):
        schema.downgrade(url, "0001")
    code, _, err = _cli(orch_migrate, "db", "downgrade", "-1", "--db", url)  # 0002 -> 0001

    assert code == 2 and err.count("\n") == 1 and "2 template versions" in err
    assert _revision(url) == "0002"
    assert changed_tables(middle, _fingerprint(url)) == []
    assert _rows(engine) == work
    assert verify(engine).passed


def test_peoples_work_is_archived_and_restored_exactly_after_a_reupgrade(
    at_0001: tuple[str, Any], engine_for: Any, dialect: str, tmp_path: Path
) -> None:
    url, before = at_0001
    schema.upgrade(url)
    engine = engine_for(url)
    backfill(engine)
    _peoples_work(url, dialect)
    work = _rows(engine)
    assert all(work.values()), work
    engine.dispose()

    state = schema.downgrade(url, "0001", archive=tmp_path / "archive")

    assert state.archive is not None and state.current == "0001"
    assert state.dropped["template_permissions"] == 1  # the grant: said, not archived
    after = _fingerprint(url)
    # Every legacy row is as before the upgrade; the one new row is the session a person created
    # through templates, whose legacy text was written with it.
    assert changed_tables(before, after) == ["orchestration_sessions"]
    sessions = after.by_table()["orchestration_sessions"]
    assert sessions.rows == before.by_table()["orchestration_sessions"].rows + 1

    schema.upgrade(url)
    restored = restore(engine, tmp_path / "archive")
    assert restored.inserted > 0
    assert _rows(engine) == work
    # The backfill links the rest again and leaves the restored links where they point: at the
    # template versions the session was created with.
    backfill(engine)
    assert _rows(engine) == work
    assert verify(engine).passed


def test_discarding_peoples_work_is_an_explicit_choice(
    at_0001: tuple[str, Any], engine_for: Any, dialect: str
) -> None:
    url, before = at_0001
    schema.upgrade(url)
    _peoples_work(url, dialect)

    state = schema.downgrade(url, "0001", discard_user_templates=True)

    assert state.discarded and state.current == "0001"
    assert changed_tables(before, _fingerprint(url)) == ["orchestration_sessions"]


def test_an_archive_that_cannot_be_written_refuses_the_downgrade(
    at_0001: tuple[str, Any], dialect: str, tmp_path: Path
) -> None:
    url, _ = at_0001
    schema.upgrade(url)
    _peoples_work(url, dialect)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    middle = _fingerprint(url)

    code, _, err = _cli(orch_migrate, "db", "downgrade", "0001", "--archive",
                        str(tmp_path / "full"), "--db", url)  # fmt: skip

    assert code == 2 and err.count("\n") == 1 and "not empty" in err
    assert _revision(url) == "0002"
    assert changed_tables(middle, _fingerprint(url)) == []


# --- complete or not started ------------------------------------------------------------------


@pytest.fixture
def short_lock_timeout(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PROMPT_TOOL_LOCK_TIMEOUT_MS", "300")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.mark.parametrize("locked", ["session_prompt_refs", "prompts"])
def test_a_downgrade_held_up_by_a_lock_leaves_the_schema_whole_and_runs_again(
    at_0001: tuple[str, Any], engine_for: Any, dialect: str, short_lock_timeout: Any, locked: str
) -> None:
    if dialect != "postgresql":
        pytest.skip("table locks held by another session are a PostgreSQL matter")
    url, before = at_0001
    schema.upgrade(url)
    engine = engine_for(url)
    backfill(engine)
    holder = engine_for(url).connect()
    holder.execute(text(f"SELECT count(*) FROM {locked}"))  # ACCESS SHARE until rollback

    with pytest.raises(SchemaError, match="gave up waiting for a table lock"):
        schema.downgrade(url, "0001")

    assert _revision(url) == "0002"
    assert schema.check(url).consistent
    schema.upgrade(url)  # back to head: a backfill writes 0003's quarantine
    backfill(engine)  # the ON CONFLICT indexes are all there
    assert verify(engine).passed
    holder.rollback()
    holder.close()
    engine.dispose()
    assert schema.downgrade(url, "0001").current == "0001"
    assert changed_tables(before, _fingerprint(url)) == []


def test_a_downgrade_beside_a_running_backfill_ends_consistent(
    at_0001: tuple[str, Any], engine_for: Any
) -> None:
    url, before = at_0001
    schema.upgrade(url)
    engine = engine_for(url)
    errors: list[BaseException] = []

    def run_backfill() -> None:
        try:
            backfill(engine_for(url), BackfillOptions(batch_size=20))
        except BaseException as error:
            errors.append(error)

    writer = threading.Thread(target=run_backfill)
    writer.start()
    try:
        outcome: Any = schema.downgrade(url, "0001")
    except SchemaError as error:
        outcome = error
    writer.join()

    assert schema.check(url).consistent
    if _revision(url) != "0001":  # the downgrade gave way: the schema is whole, run it again
        engine.dispose()
        outcome = schema.downgrade(url, "0001")
    assert _revision(url) == "0001", outcome
    assert changed_tables(before, _fingerprint(url)) == []


def _written_just_before_the_locks(
    monkeypatch: pytest.MonkeyPatch, write: Callable[[], object]
) -> None:
    """Run ``write`` (it commits on its own connections) once the downgrade's last transaction
    has removed the new system's rows and before it takes its table locks: a commit there is
    what the LOCK waits for, and what that transaction's DELETEs never saw."""
    lock_in_order = online_ddl.lock_in_order

    def write_then_lock(tables: Any) -> None:
        if "session_prompt_refs" in tables:  # 0002's last transaction, not 0003's
            write()
        lock_in_order(tables)

    monkeypatch.setattr(online_ddl, "lock_in_order", write_then_lock)


def test_a_backfill_batch_committed_just_before_the_downgrade_locks_is_taken_back(
    at_0001: tuple[str, Any], engine_for: Any, dialect: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if dialect != "postgresql":
        pytest.skip("SQLite has one writer: nothing commits inside the downgrade")
    url, before = at_0001
    schema.upgrade(url)
    batches: list[Any] = []
    # 0003's downgrade has dropped the quarantine by then (a real backfill's next batch fails on
    # it): the batch is written as by a backfill that had passed its checks, minus the quarantine.
    monkeypatch.setattr(backfill_command, "require_known_revision", lambda *_, **__: "0003")
    monkeypatch.setattr(backfill_batch, "held", lambda *_: set())
    _written_just_before_the_locks(
        monkeypatch,
        lambda: batches.append(backfill(engine_for(url), BackfillOptions(batch_size=20, limit=20))),
    )

    state = schema.downgrade(url, "0001")

    assert batches[0].templates_created > 0
    assert state.current == "0001"
    assert state.removed["prompts"] == batches[0].templates_created
    assert changed_tables(before, _fingerprint(url)) == []
    assert schema.check(url).consistent


def test_a_template_created_just_before_the_downgrade_locks_refuses_it(
    at_0001: tuple[str, Any], dialect: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if dialect != "postgresql":
        pytest.skip("SQLite has one writer: nothing commits inside the downgrade")
    url, before = at_0001
    schema.upgrade(url)
    (tmp_path / "v1.j2").write_text("Plan {{ goal }}.")
    code, out, err = _cli(prompt_tool_app, "roles", "grant", "ops", "admin", "--global",
                          "--as", "ops", "--db", url)  # fmt: skip
    assert code == 0, out + err
    created: list[tuple[int, str, str]] = []
    _written_just_before_the_locks(
        monkeypatch,
        lambda: created.append(
            _cli(prompt_tool_app, "templates", "create", "planner", "--project", "project-1",
                 "--file", str(tmp_path / "v1.j2"), "--as", "ops", "--db", url)
        ),
    )  # fmt: skip

    with pytest.raises(ArchiveOutdatedError, match=r"1 template, .* were written while it ran"):
        schema.downgrade(url, "0001")

    assert created[0][0] == 0, created
    assert _revision(url) == "0002"
    assert schema.check(url).consistent
    monkeypatch.undo()
    assert schema.downgrade(url, "0001", discard_user_templates=True).current == "0001"
    assert changed_tables(before, _fingerprint(url)) == []


def _killed_at(url: str, delay: float, action: list[str]) -> None:
    process = subprocess.Popen(
        [str(BIN / "orch-migrate"), "db", *action, "--db", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(delay)  # where it dies, not a wait for a result: any point must do
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_a_downgrade_or_upgrade_killed_anywhere_leaves_a_consistent_schema(
    at_0001: tuple[str, Any], engine_for: Any
) -> None:
    url, before = at_0001
    schema.upgrade(url)
    backfill(engine_for(url))
    for delay in (0.3, 0.6, 0.9, 1.2, 1.6, 2.2):
        action = ["downgrade", "0001"] if _revision(url) == HEAD else ["upgrade"]
        _killed_at(url, delay, action)
        assert schema.check(url).drift == [] or _revision(url) == "0001", schema.check(url)
        if _revision(url) == "0001" and not schema.check(url).consistent:
            schema.upgrade(url)  # an upgrade killed in its concurrent part: finish it
        assert schema.check(url).consistent
    if _revision(url) != HEAD:
        schema.upgrade(url)
    engine = engine_for(url)
    backfill(engine)
    assert verify(engine).passed
    engine.dispose()
    schema.downgrade(url, "0001")
    assert changed_tables(before, _fingerprint(url)) == []


def test_an_interrupted_upgrade_is_reported_and_finished_by_db_upgrade(
    at_0001: tuple[str, Any],
) -> None:
    url, _ = at_0001
    schema.upgrade(url)
    schema.stamp(url, "0001")  # what an upgrade stopped in its concurrent part records

    code, out, err = _cli(orch_migrate, "db", "check", "--db", url)
    assert code == 1 and "db upgrade" in err
    with pytest.raises(SchemaError, match="finish it with `orch-migrate db upgrade`"):
        schema.downgrade(url, "0001")

    schema.upgrade(url)
    code, out, _ = _cli(orch_migrate, "db", "check", "--db", url)
    assert code == 0 and "exactly what its revision says" in out


def test_a_refusal_reaches_plain_alembic_as_one_line_too(
    at_0001: tuple[str, Any], dialect: str
) -> None:
    url, _ = at_0001
    schema.upgrade(url)
    _peoples_work(url, dialect)
    result = subprocess.run(
        [str(BIN / "alembic"), "-x", f"db={url}", "downgrade", "0001"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "-x archive=DIR" in result.stderr
    assert _revision(url) == "0002"
    assert issubclass(UserDataWouldBeLostError, MigrationRefusedError)


@pytest.mark.parametrize("holder", ["table lock", "old snapshot"])
def test_an_upgrade_held_up_by_a_lock_leaves_a_consistent_schema_and_runs_again(
    at_0001: tuple[str, Any], engine_for: Any, dialect: str, short_lock_timeout: Any, holder: str
) -> None:
    if dialect != "postgresql":
        pytest.skip("table locks held by another session are a PostgreSQL matter")
    url, before = at_0001
    holding = engine_for(url).connect()
    if holder == "table lock":  # the transactional part's ALTER TABLE gives up: nothing applied
        holding.execute(text("SELECT count(*) FROM prompts"))
    else:  # a snapshot the concurrent index builds wait for: the transactional part is applied
        holding.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        holding.execute(text("SELECT count(*) FROM orchestration_sessions"))

    with pytest.raises(SchemaError, match="gave up waiting for a table lock"):
        schema.upgrade(url)

    assert _revision(url) == "0001"
    check = schema.check(url)
    if holder == "table lock":
        assert check.consistent, check.drift
    else:
        assert not check.consistent and "db upgrade" in check.drift[0]
    holding.rollback()
    holding.close()
    assert schema.upgrade(url).current == HEAD
    assert schema.check(url).consistent
    assert changed_tables(before, _fingerprint(url)) == []


def test_readers_and_writers_never_wait_past_lock_timeout_during_a_downgrade(
    at_0001: tuple[str, Any], engine_for: Any, dialect: str, short_lock_timeout: Any
) -> None:
    if dialect != "postgresql":
        pytest.skip("concurrent sessions waiting on locks are a PostgreSQL matter")
    url, _ = at_0001
    schema.upgrade(url)
    backfill(engine_for(url))
    done = threading.Event()
    waits: list[float] = []
    failures: list[BaseException] = []

    def application() -> None:
        engine = engine_for(url)
        while not done.is_set():
            started = time.perf_counter()
            try:
                with engine.begin() as connection:
                    connection.execute(
                        text("SELECT system_prompt FROM orchestration_sessions WHERE id = 1")
                    )
                    connection.execute(
                        text(
                            "INSERT INTO orchestration_sessions (project_id, name, system_prompt)"
                            " VALUES (1, 'during the downgrade', 'hello')"
                        )
                    )
            except BaseException as error:
                failures.append(error)
                return
            waits.append(time.perf_counter() - started)

    threads = [threading.Thread(target=application) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        schema.downgrade(url, "0001")
    finally:
        done.set()
        for thread in threads:
            thread.join()

    assert not failures, failures
    assert len(waits) > 10
    lock_timeout_s = get_settings().migration_lock_timeout_ms / 1000
    assert max(waits) < lock_timeout_s, f"an application transaction waited {max(waits):.3f} s"
