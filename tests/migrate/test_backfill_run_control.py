"""Run control from another process, on PostgreSQL with `--workers 2`: a paused run holds no
lock and no open transaction, a resumed one finishes, a cancelled one keeps what it committed
and the next run carries on from it; every worker notices within one batch."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text

from prompt_tool.db.models import MigrationBatch, MigrationRun
from prompt_tool.migrate.backfill import backfill
from prompt_tool.migrate.backfill.remote import ControlAction, request
from prompt_tool.migrate.verify import verify
from tests.migrate.test_backfill_steering import until

_DEADLINE_S = 90


_ORCH_MIGRATE = "from prompt_tool.cli.orch_migrate import main; main()"


@pytest.fixture
def postgres_engine(legacy_engine: Engine) -> Engine:
    if legacy_engine.dialect.name != "postgresql":
        pytest.skip("worker processes and server-side locks are PostgreSQL's")
    return legacy_engine


@pytest.fixture
def running(postgres_engine: Engine) -> Iterator[tuple[Engine, subprocess.Popen[str], int]]:
    """`orch-migrate backfill --workers 2` in a process of its own, slowed to small batches
    with a pause between them; yields once its run is recorded."""
    url = postgres_engine.url.render_as_string(hide_password=False)
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _ORCH_MIGRATE,
            "backfill",
            "--workers",
            "2",
            "--batch-size",
            "20",
            "--min-batch-size",
            "10",
            "--sleep-ms",
            "150",
            "--db",
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )

    def recorded() -> int | None:
        with postgres_engine.connect() as connection:
            return connection.execute(
                select(MigrationRun.id).where(
                    MigrationRun.kind == "backfill", MigrationRun.status == "running"
                )
            ).scalar()

    run_id = until(recorded, "the run to start", _DEADLINE_S)
    try:
        yield postgres_engine, process, run_id
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def _done(engine: Engine, run_id: int) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                select(func.count()).where(
                    MigrationBatch.run_id == run_id, MigrationBatch.status == "done"
                )
            ).scalar_one()
        )


def _live(engine: Engine, run_id: int) -> dict[str, Any]:
    with engine.connect() as connection:
        summary = connection.execute(
            select(MigrationRun.summary).where(MigrationRun.id == run_id)
        ).scalar()
    return dict((summary or {}).get("live") or {})


def _busy_backends(engine: Engine) -> list[tuple[Any, ...]]:
    """Backends of this database other than ours that are in a transaction or hold a lock on
    a table."""
    with engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                text(
                    "SELECT a.pid, a.state, l.relation::regclass::text FROM pg_stat_activity a "
                    "LEFT JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'relation' "
                    "WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() "
                    "AND a.backend_type = 'client backend' "
                    "AND (a.state <> 'idle' OR l.relation IS NOT NULL)"
                )
            )
        ]


def test_a_paused_run_holds_no_lock_nor_transaction_and_a_resumed_one_finishes(
    running: tuple[Engine, subprocess.Popen[str], int],
) -> None:
    engine, process, run_id = running
    until(lambda: _done(engine, run_id) >= 2, "the first batches", _DEADLINE_S)
    request(engine, ControlAction.PAUSE, None)
    until(
        lambda: _live(engine, run_id).get("state") == "paused",
        "the run to say it paused",
        _DEADLINE_S,
    )
    # Every worker stops within one batch: then nothing moves and nothing is held.
    settled = until(
        lambda: (not _busy_backends(engine)) and _done(engine, run_id),
        "every worker to finish its batch",
        _DEADLINE_S,
    )
    assert _live(engine, run_id)["reason"].startswith("paused by ")
    assert _done(engine, run_id) == settled and not _busy_backends(engine)
    assert process.poll() is None  # waiting, not gone

    request(engine, ControlAction.RESUME, run_id)
    _out, err = process.communicate(timeout=_DEADLINE_S)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert verify(engine).passed


def test_a_cancelled_run_keeps_what_it_committed_and_the_next_run_carries_on(
    running: tuple[Engine, subprocess.Popen[str], int],
) -> None:
    engine, process, run_id = running
    until(lambda: _done(engine, run_id) >= 2, "the first batches", _DEADLINE_S)
    request(engine, ControlAction.CANCEL, run_id)
    _out, err = process.communicate(timeout=_DEADLINE_S)
    assert process.returncode == 1
    assert "cancelled by" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    committed = _done(engine, run_id)
    with engine.connect() as connection:
        status, left = connection.execute(
            select(
                MigrationRun.status,
                select(func.count())
                .where(MigrationBatch.run_id == run_id, MigrationBatch.status == "pending")
                .scalar_subquery(),
            ).where(MigrationRun.id == run_id)
        ).one()
    assert status == "cancelled" and committed >= 2 and left > 0
    assert not _busy_backends(engine)  # the workers are gone too

    after = backfill(engine)
    # It carried the cancelled run's pending ranges on: not a session walked twice.
    with engine.connect() as connection:
        walked_before = connection.execute(
            select(func.coalesce(func.sum(MigrationBatch.rows_seen), 0)).where(
                MigrationBatch.run_id == run_id
            )
        ).scalar_one()
    assert after.sessions_scanned + int(walked_before) == 600
    assert verify(engine).passed
