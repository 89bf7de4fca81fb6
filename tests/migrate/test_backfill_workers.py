"""`orch-migrate backfill --workers N`: processes share one planned run through the ledger
(FOR UPDATE SKIP LOCKED) and end exactly where a single-worker run ends; killed, the next run
carries the pending batches on. On SQLite the plan is walked by one worker."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from prompt_tool.db.models import PromptRole
from prompt_tool.migrate.backfill import BackfillOptions, BackfillProgress, backfill
from prompt_tool.migrate.backfill.workers import effective_workers
from prompt_tool.migrate.verify import verify
from tests.migrate.test_backfill import _state, unlink_everything


def _batches(engine: Engine, run_id: int) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT key_lo, key_hi, status, rows_seen, claimed_by, "
                "finished_at IS NOT NULL AND finished_at >= started_at FROM migration_batches "
                "WHERE run_id = :run ORDER BY key_lo"
            ),
            {"run": run_id},
        ).all()
    return [tuple(row) for row in rows]


def test_workers_end_exactly_where_one_worker_ends(legacy_engine: Engine) -> None:
    single = backfill(legacy_engine)
    expected = _state(legacy_engine)
    unlink_everything(legacy_engine)

    shared = backfill(legacy_engine, BackfillOptions(workers=2, batch_size=40))

    assert _state(legacy_engine) == expected
    assert verify(legacy_engine).passed
    assert shared.workers == effective_workers(legacy_engine, 2)
    assert shared.sessions_scanned == single.sessions_scanned == 600
    assert shared.references_created == single.references_created
    assert shared.templates_created == single.templates_created
    assert not backfill(legacy_engine, BackfillOptions(workers=2)).changed


def test_every_planned_batch_is_done_once_and_the_ranges_tile_the_run(
    legacy_engine: Engine,
) -> None:
    summary = backfill(legacy_engine, BackfillOptions(workers=2, batch_size=40))
    assert summary.run_id is not None

    batches = _batches(legacy_engine, summary.run_id)
    assert len(batches) == 15 == summary.batches  # 600 sessions in batches of 40
    assert [status for _, _, status, *_ in batches] == ["done"] * 15
    assert sum(rows for *_, rows, _, _ in batches) == 600
    assert batches[0][0] == 0 and batches[-1][1] == summary.key_upper_bound
    assert all(a[1] == b[0] for a, b in itertools.pairwise(batches))  # no gap
    assert all(claimed for *_, claimed, _ in batches)  # who did it is recorded
    assert all(timed for *_, timed in batches)  # and for how long it held its locks


def test_workers_degrade_to_one_on_sqlite_and_run_more_on_postgresql(
    legacy_engine: Engine,
) -> None:
    expected = 1 if legacy_engine.dialect.name == "sqlite" else 3
    assert effective_workers(legacy_engine, 3) == expected
    with legacy_engine.connect() as connection:
        assert effective_workers(connection, 3) == 1  # the caller's transaction: one writer


def test_a_limit_plans_only_that_many_sessions(legacy_engine: Engine) -> None:
    summary = backfill(legacy_engine, BackfillOptions(workers=2, batch_size=50, limit=120))

    assert summary.sessions_scanned == 120
    with legacy_engine.connect() as connection:
        linked = connection.execute(
            text("SELECT count(DISTINCT session_id) FROM session_prompt_refs")
        ).scalar_one()
        first_unlinked = connection.execute(
            text(
                "SELECT min(id) FROM orchestration_sessions s WHERE NOT EXISTS "
                "(SELECT 1 FROM session_prompt_refs r WHERE r.session_id = s.id) "
                "AND (system_prompt IS NOT NULL OR planner_prompt IS NOT NULL "
                "OR synthesis_prompt IS NOT NULL)"
            )
        ).scalar_one()
        ordered = connection.execute(
            text("SELECT id FROM orchestration_sessions ORDER BY id LIMIT 121")
        ).scalars()
        ids = list(ordered)
    assert linked <= 120
    assert first_unlinked >= ids[120]  # the first 120 sessions, not any 120


KILLER = """
import os, signal, sys
from sqlalchemy import event
from prompt_tool.db.engine import make_engine
from prompt_tool.migrate.backfill import BackfillOptions, backfill

if __name__ == "__main__":
    engine = make_engine(sys.argv[1])
    kill_at = int(sys.argv[2])
    count = [0]

    @event.listens_for(engine, "before_cursor_execute")
    def maybe_die(connection, cursor, statement, *args):
        claim = "FROM migration_batches" in statement and "LIMIT" in statement
        if not claim:
            return
        count[0] += 1
        if count[0] == kill_at:
            os.killpg(0, signal.SIGKILL)  # every worker of the run at once, as kill -9 would

    backfill(engine, BackfillOptions(batch_size=30, workers=2))
"""


# The planning process's own claims of a range: killed as it makes its first (right after the
# plan's commit), its second, and its fourth.
@pytest.mark.parametrize("kill_at", [1, 2, 4])
def test_a_run_killed_with_its_workers_ends_like_an_uninterrupted_one(
    legacy_url: str, legacy_engine: Engine, kill_at: int, tmp_path: Any
) -> None:
    backfill(legacy_engine)
    expected = _state(legacy_engine)
    unlink_everything(legacy_engine)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)

    died = subprocess.run(
        [sys.executable, str(script), legacy_url, str(kill_at)],
        capture_output=True,
        check=False,
        start_new_session=True,  # its own process group: killpg reaches only the run
    )
    assert died.returncode == -signal.SIGKILL, died.stderr.decode()[-2000:]
    with legacy_engine.connect() as connection:
        interrupted, left_sessions = connection.execute(
            text(
                "SELECT count(DISTINCT b.id), count(s.id) FROM migration_batches b "
                "JOIN migration_runs r ON r.id = b.run_id "
                "LEFT JOIN orchestration_sessions s ON s.id > b.key_lo AND s.id <= b.key_hi "
                "WHERE r.status = 'running' AND b.status = 'pending'"
            )
        ).one()
    assert interrupted > 0  # killed midway, with batches left to carry on

    resumed = backfill(legacy_engine)  # one worker carries the planned run on

    assert _state(legacy_engine) == expected
    assert verify(legacy_engine).passed
    assert resumed.sessions_scanned == left_sessions  # only what the killed run left
    with legacy_engine.connect() as connection:
        left = connection.execute(
            text(
                "SELECT count(*) FROM migration_batches WHERE status = 'pending' AND run_id = :run"
            ),
            {"run": resumed.run_id},
        ).scalar_one()
    assert left == 0
    assert not backfill(legacy_engine, BackfillOptions(workers=2)).changed


def test_every_role_of_every_session_is_linked_once(legacy_engine: Engine) -> None:
    backfill(legacy_engine, BackfillOptions(workers=2, batch_size=25))
    with legacy_engine.connect() as connection:
        expected = sum(
            connection.execute(
                text(
                    f"SELECT count(*) FROM orchestration_sessions WHERE {role.legacy_column} "
                    "IS NOT NULL"
                )
            ).scalar_one()
            for role in PromptRole
        )
        references, distinct = connection.execute(
            text("SELECT count(*), count(DISTINCT session_id || role) FROM session_prompt_refs")
        ).one()
    assert references == distinct == expected


def test_a_big_run_refreshes_the_statistics_readers_plan_with(
    legacy_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prompt_tool.migrate.backfill import command

    monkeypatch.setattr(command, "_ANALYZE_AFTER", 100)  # 600 sessions count as big
    backfill(legacy_engine, BackfillOptions(workers=2))

    with legacy_engine.connect() as connection:
        if legacy_engine.dialect.name == "postgresql":
            rows = connection.execute(
                text("SELECT reltuples FROM pg_class WHERE relname = 'session_prompt_refs'")
            ).scalar_one()
        else:
            rows = connection.execute(
                text("SELECT count(*) FROM sqlite_stat1 WHERE tbl = 'session_prompt_refs'")
            ).scalar_one()
    assert rows > 0


def _children() -> list[int]:
    """This process's child processes (Linux /proc)."""
    found: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        children = (task / "children").read_text().split()
        found += [int(pid) for pid in children]
    return found


@pytest.mark.postgres
def test_a_worker_killed_mid_run_leaves_its_batches_to_the_others_and_the_run_succeeds(
    pg_url: str, engine_for: Any
) -> None:
    from prompt_tool.db import schema
    from prompt_tool.migrate import load_legacy_sample

    schema.upgrade(pg_url, "0001")
    load_legacy_sample(pg_url, sessions=600, projects=3, seed=5)
    schema.upgrade(pg_url)
    engine = engine_for(pg_url)
    killed: list[int] = []

    def kill_a_worker(progress: BackfillProgress) -> None:
        if not killed and progress.batches >= 1:
            for pid in _children():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break

    summary = backfill(engine, BackfillOptions(workers=2, batch_size=20), progress=kill_a_worker)
    assert killed, "no worker process to kill"
    assert summary.workers_lost == [-signal.SIGKILL]
    assert "1 of 2 workers ended early" in summary.describe()
    assert verify(engine).passed
    with engine.connect() as connection:
        pending = connection.execute(
            text("SELECT count(*) FROM migration_batches WHERE status <> 'done'")
        ).scalar_one()
        status = connection.execute(
            text("SELECT status FROM migration_runs WHERE id = :id"), {"id": summary.run_id}
        ).scalar_one()
    assert pending == 0
    assert status == "completed"
