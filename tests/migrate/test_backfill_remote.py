"""`orch-migrate backfill pause|resume|cancel`, the request side: a request lands in the run's
ledger row (who, when, every other parameter kept), on the one live backfill or the run named,
and anything else is refused in one line saying what the run is."""

from __future__ import annotations

import getpass
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, select, text, update

from prompt_tool.db.models import MigrationRun
from prompt_tool.errors import InvalidInputError, NotFoundError, UnknownRevisionError
from prompt_tool.migrate import BackfillControlOptions, ControlAction, ControlRequest, commands
from prompt_tool.migrate.backfill.remote import read_request, request
from prompt_tool.migrate.runs import MigrationRunStatus, RunKind, finish_run, start_run

PAUSE, RESUME, CANCEL = ControlAction.PAUSE, ControlAction.RESUME, ControlAction.CANCEL


def _backfill(engine: Engine, scope: str = "acme") -> int:
    """A backfill run marked running by this (live) process."""
    return start_run(engine, RunKind.BACKFILL, params={"scope": scope, "batch_size": 1000})


def _params(engine: Engine, run_id: int) -> dict[str, Any]:
    with engine.connect() as connection:
        params = connection.execute(
            select(MigrationRun.params).where(MigrationRun.id == run_id)
        ).scalar_one()
    assert isinstance(params, dict)
    return params


def _standing(engine: Engine, run_id: int) -> ControlRequest | None:
    with engine.connect() as connection:
        return read_request(connection, run_id)


def _dead_pid() -> int:
    """The id of a process that has ended (and was reaped)."""
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(ended.stdout)


def _kill(engine: Engine, run_id: int) -> None:
    """Make ``run_id`` look like the run of a process that died without a word."""
    params = {**_params(engine, run_id), "pid": _dead_pid(), "backend_pid": 2_000_000_000}
    with engine.begin() as connection:
        connection.execute(
            update(MigrationRun).where(MigrationRun.id == run_id).values(params=params)
        )


def test_a_pause_is_recorded_in_the_run_with_who_and_when_keeping_every_other_parameter(
    db_engine: Engine,
) -> None:
    run_id = _backfill(db_engine)
    before = _params(db_engine, run_id)
    asked = datetime.now(UTC).replace(microsecond=0)

    outcome = request(db_engine, PAUSE, run_id)

    params = _params(db_engine, run_id)
    control = params.pop("control")
    assert params == before
    assert control["request"] == "pause"
    assert control["by"] == f"{getpass.getuser()}@{socket.gethostname()}"
    assert datetime.fromisoformat(control["at"]) >= asked
    standing = _standing(db_engine, run_id)
    assert standing is not None and (standing.action, standing.by, standing.at) == (
        PAUSE,
        control["by"],
        control["at"],
    )
    assert (outcome.run_id, outcome.action, outcome.scope, outcome.recorded) == (
        run_id,
        PAUSE,
        "acme",
        True,
    )
    assert outcome.describe() == (
        f"backfill run {run_id} (scope acme) will pause before its next batch; "
        "`orch-migrate backfill resume` carries on"
    )


def test_a_run_without_a_request_reads_as_carry_on(db_engine: Engine) -> None:
    run_id = _backfill(db_engine)
    assert _standing(db_engine, run_id) is None
    assert _standing(db_engine, run_id + 1000) is None


def test_a_request_this_code_does_not_know_reads_as_carry_on(db_engine: Engine) -> None:
    run_id = _backfill(db_engine)
    params = {**_params(db_engine, run_id), "control": {"request": "explode", "by": "x"}}
    with db_engine.begin() as connection:
        connection.execute(
            update(MigrationRun).where(MigrationRun.id == run_id).values(params=params)
        )
    assert _standing(db_engine, run_id) is None


def test_resume_after_a_pause_records_resume(db_engine: Engine) -> None:
    run_id = _backfill(db_engine)
    request(db_engine, PAUSE, run_id)

    outcome = request(db_engine, RESUME, run_id)

    standing = _standing(db_engine, run_id)
    assert standing is not None and standing.action is RESUME
    assert outcome.recorded and outcome.before is not None and outcome.before.action is PAUSE
    assert outcome.describe() == f"backfill run {run_id} (scope acme) resumes with its next batch"


def test_resume_of_a_run_that_is_not_paused_says_so_and_changes_nothing(
    db_engine: Engine,
) -> None:
    run_id = _backfill(db_engine)
    before = _params(db_engine, run_id)

    outcome = request(db_engine, RESUME, run_id)

    assert not outcome.recorded
    assert _params(db_engine, run_id) == before
    assert outcome.describe() == (
        f"backfill run {run_id} (scope acme) is not paused (it is working); nothing to resume"
    )


def test_the_runs_own_word_on_what_it_is_doing_is_shown(db_engine: Engine) -> None:
    run_id = _backfill(db_engine)
    with db_engine.begin() as connection:
        connection.execute(
            update(MigrationRun)
            .where(MigrationRun.id == run_id)
            .values(summary={"live": {"state": "throttled", "reason": "replica lag"}})
        )

    outcome = request(db_engine, RESUME, run_id)

    assert outcome.state == "throttled"
    assert "is not paused (it is throttled)" in outcome.describe()


def test_pausing_a_paused_run_says_since_when_and_changes_nothing(db_engine: Engine) -> None:
    run_id = _backfill(db_engine)
    first = request(db_engine, PAUSE, run_id)
    paused = _params(db_engine, run_id)

    again = request(db_engine, PAUSE, run_id)

    assert first.recorded and not again.recorded
    assert _params(db_engine, run_id) == paused
    assert f"is already paused (asked by {paused['control']['by']} at " in again.describe()


def test_cancel_of_a_paused_run_wakes_it_to_stop(db_engine: Engine) -> None:
    run_id = _backfill(db_engine)
    request(db_engine, PAUSE, run_id)

    outcome = request(db_engine, CANCEL, run_id)

    standing = _standing(db_engine, run_id)
    assert standing is not None and standing.action is CANCEL
    assert outcome.recorded
    assert outcome.describe() == (
        f"backfill run {run_id} (scope acme) is paused: it wakes and stops, cancelled; what it "
        "committed stands and `orch-migrate backfill` carries on from there"
    )


def test_a_cancel_stands_neither_pause_nor_resume_undoes_it(db_engine: Engine) -> None:
    run_id = _backfill(db_engine)
    cancelled = request(db_engine, CANCEL, run_id)
    assert "will stop before its next batch, cancelled" in cancelled.describe()
    standing = _params(db_engine, run_id)

    for action in (PAUSE, RESUME, CANCEL):
        outcome = request(db_engine, action, run_id)
        assert not outcome.recorded
        assert "is already being cancelled" in outcome.describe()
    assert _params(db_engine, run_id) == standing


def test_without_a_run_id_the_one_live_backfill_is_asked(db_engine: Engine) -> None:
    finished = _backfill(db_engine, "beta")
    finish_run(db_engine, finished, MigrationRunStatus.COMPLETED)
    dead = _backfill(db_engine, "beta")
    start_run(db_engine, RunKind.VERIFY, params={})
    live = _backfill(db_engine, "*")
    _kill(db_engine, dead)

    outcome = commands.backfill_control(db_engine, BackfillControlOptions(PAUSE))

    assert outcome.run_id == live
    assert outcome.describe().startswith(f"backfill run {live} (all projects) will pause")
    assert _standing(db_engine, dead) is None


def test_without_a_live_backfill_it_says_so_in_one_line_exit_2(db_engine: Engine) -> None:
    _kill(db_engine, _backfill(db_engine))
    finish_run(db_engine, _backfill(db_engine), MigrationRunStatus.COMPLETED)

    with pytest.raises(NotFoundError) as raised:
        request(db_engine, PAUSE, None)

    assert str(raised.value) == "no backfill is running; `orch-migrate status` lists the runs"
    assert raised.value.exit_code == 2


def test_with_several_live_backfills_it_asks_which_one(db_engine: Engine) -> None:
    acme, beta = _backfill(db_engine, "acme"), _backfill(db_engine, "beta")
    everything = _backfill(db_engine, "*")

    with pytest.raises(InvalidInputError) as raised:
        request(db_engine, CANCEL, None)

    assert str(raised.value) == (
        f"3 backfill runs are live ({acme}: acme, {beta}: beta, {everything}: all projects): "
        "pass --run ID"
    )
    assert all(_standing(db_engine, run) is None for run in (acme, beta, everything))


def test_a_run_that_is_not_a_backfill_is_named_for_what_it_is(db_engine: Engine) -> None:
    verify = start_run(db_engine, RunKind.VERIFY, params={})

    with pytest.raises(InvalidInputError) as raised:
        request(db_engine, PAUSE, verify)

    assert str(raised.value) == f"run {verify} is a verify run, not a backfill; nothing to pause"


def test_a_run_that_does_not_exist_is_not_found(db_engine: Engine) -> None:
    with pytest.raises(NotFoundError) as raised:
        request(db_engine, RESUME, 4242)
    assert str(raised.value) == "no run 4242; `orch-migrate status` lists the runs"


def test_a_finished_run_says_how_and_when_it_ended(db_engine: Engine) -> None:
    completed = _backfill(db_engine)
    finish_run(db_engine, completed, MigrationRunStatus.COMPLETED)
    cancelled = _backfill(db_engine)
    finish_run(db_engine, cancelled, MigrationRunStatus.CANCELLED)

    with pytest.raises(InvalidInputError) as raised:
        request(db_engine, PAUSE, completed)
    message = str(raised.value)
    assert message.startswith(f"run {completed} completed at 20")
    assert message.endswith("; nothing to pause")

    with pytest.raises(InvalidInputError) as raised:
        request(db_engine, CANCEL, cancelled)
    assert str(raised.value).endswith(
        "; nothing to cancel; `orch-migrate backfill` carries on from it"
    )
    assert "was cancelled at" in str(raised.value)


def test_a_run_whose_process_died_is_not_live(db_engine: Engine) -> None:
    run_id = _backfill(db_engine)
    _kill(db_engine, run_id)

    with pytest.raises(InvalidInputError) as raised:
        request(db_engine, PAUSE, run_id)

    message = str(raised.value)
    assert message.startswith(f"run {run_id} is not live: its ")
    assert "is gone" in message and "\n" not in message
    assert _standing(db_engine, run_id) is None


def test_an_unknown_schema_revision_is_refused_writing_nothing(
    head_db_url: str, engine_for: Any
) -> None:
    writer: Engine = engine_for(head_db_url)
    run_id = _backfill(writer)
    with writer.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9f3a_future'"))
    before = _params(writer, run_id)

    with pytest.raises(UnknownRevisionError) as raised:
        request(engine_for(head_db_url), PAUSE, run_id)

    assert "cannot pause a backfill" in str(raised.value) and "9f3a_future" in str(raised.value)
    assert _params(writer, run_id) == before


def test_a_request_waits_for_the_rows_other_writer_and_keeps_what_it_wrote(
    db_engine: Engine,
) -> None:
    """Read-modify-write under FOR UPDATE: a writer holding the row (PostgreSQL row lock,
    SQLite's one writer) is waited for, and its change to params survives the request's."""
    run_id = _backfill(db_engine)
    holder = db_engine.connect()
    done: list[Any] = []
    try:
        transaction = holder.begin()
        row = holder.execute(
            select(MigrationRun.params).where(MigrationRun.id == run_id).with_for_update()
        ).scalar_one()
        holder.execute(
            update(MigrationRun)
            .where(MigrationRun.id == run_id)
            .values(params={**row, "checkpoint": "kept"})
        )
        asking = threading.Thread(target=lambda: done.append(request(db_engine, PAUSE, run_id)))
        asking.start()
        asking.join(timeout=0.5)
        assert not done  # it waits for the holder's transaction
        transaction.commit()
        asking.join(timeout=30)
    finally:
        holder.close()
    assert done and done[0].recorded
    params = _params(db_engine, run_id)
    assert params["checkpoint"] == "kept" and params["control"]["request"] == "pause"
