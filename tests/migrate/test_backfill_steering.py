"""The backfill's control loop: the batch size steered toward the target time within its bounds,
a lock timeout shrinking the batch at once (never a retry at the same size), every adjustment
recorded with its batch, waits while throttled or outside the window, and a checkpoint trusted
only by a run like the one that made it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select, text, update

from prompt_tool.db.models import MigrationBatch, MigrationRun, Scope
from prompt_tool.migrate.backfill import BackfillOptions, BackfillProgress, backfill
from prompt_tool.migrate.backfill.observe import observe
from prompt_tool.migrate.backfill.remote import ControlAction, request
from prompt_tool.migrate.backfill.steering import steered_size
from prompt_tool.migrate.backfill.types import RunWindow
from prompt_tool.migrate.verify import verify
from prompt_tool.settings import get_settings
from prompt_tool.templates import TemplateAddress, TemplateManager
from tests.migrate.test_backfill import unlink_everything

_DEADLINE_S = 60


def until(condition: Any, what: str, deadline_s: float = _DEADLINE_S) -> Any:
    """Poll ``condition`` until it returns something truthy (a deadline, not a sleep)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _batch_notes(engine: Engine, run_id: int) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(MigrationBatch.counts)
            .where(MigrationBatch.run_id == run_id)
            .order_by(MigrationBatch.key_lo)
        ).scalars()
        return [row or {} for row in rows]


# -- the size rule ------------------------------------------------------------------------------


def test_a_fast_batch_grows_the_next_by_at_most_half() -> None:
    options = BackfillOptions(batch_size=10_000, target_batch_ms=200)
    assert steered_size(200, 0.000_01, options) == (300, "grow")


def test_a_slow_batch_shrinks_the_next_at_once_to_what_fits_the_target() -> None:
    options = BackfillOptions(batch_size=10_000, target_batch_ms=200)
    # 2 ms a session: 90 sessions take 90% of 200 ms.
    assert steered_size(1_000, 0.002, options) == (90, "shrink")


def test_a_batch_near_the_target_holds_its_size() -> None:
    options = BackfillOptions(batch_size=10_000, target_batch_ms=200)
    assert steered_size(1_000, 0.18 / 1_000, options) == (1_000, "hold")


def test_the_size_stays_within_its_bounds() -> None:
    options = BackfillOptions(batch_size=500, min_batch_size=100, target_batch_ms=200)
    assert steered_size(400, 0.000_001, options)[0] == 500
    assert steered_size(400, 1.0, options)[0] == 100
    # --batch-size below --min-batch-size: the batch size is the bound.
    assert BackfillOptions(batch_size=20, min_batch_size=50).smallest_batch == 20


def test_a_window_spans_midnight_and_a_bad_one_is_refused() -> None:
    window = RunWindow.parse("22:00-06:00")
    assert window.contains(23 * 60) and window.contains(5 * 60 + 59)
    assert not window.contains(6 * 60) and not window.contains(12 * 60)
    assert str(window) == "22:00-06:00"
    for bad in ("22-06", "25:00-01:00", "10:00-10:00", "soon"):
        with pytest.raises(Exception, match="--window"):
            RunWindow.parse(bad)


# -- a run under its controller -----------------------------------------------------------------


def test_every_batch_records_its_size_what_set_it_and_its_lock_hold(
    legacy_engine: Engine,
) -> None:
    summary = backfill(legacy_engine, BackfillOptions(batch_size=400, target_batch_ms=5_000))
    assert summary.run_id is not None
    notes = _batch_notes(legacy_engine, summary.run_id)
    assert notes[0]["adjust"] == "first" and notes[0]["size"] == 200
    # Far under a 5 s target: every later batch grew (1.5x at most) up to --batch-size.
    assert [note["size"] for note in notes[1:3]] == [300, 400]
    assert {note["adjust"] for note in notes[1:3]} == {"grow"}
    assert all(note["hold_ms"] >= 0 and note["retries"] == 0 for note in notes)
    assert sum(note["size"] >= 1 for note in notes) == summary.batches


@pytest.fixture
def postgres_only(legacy_engine: Engine) -> Engine:
    if legacy_engine.dialect.name != "postgresql":
        pytest.skip("a lock timeout is PostgreSQL's")
    return legacy_engine


@pytest.fixture
def held_reference(postgres_only: Engine) -> Iterator[tuple[Engine, Connection]]:
    """Another transaction inserts (and holds, uncommitted) a reference of session 150: a batch
    that covers it waits on it until the holder rolls back."""
    engine = postgres_only
    manager = TemplateManager(engine)
    manager.grant("root", "root", "admin", None)
    manager.create(TemplateAddress("held", Scope.GLOBAL), "x", actor="root")
    holder = engine.connect()
    holder.execute(
        text(
            "INSERT INTO session_prompt_refs (session_id, role, prompt_version_id, source) "
            "VALUES (150, 'system', (SELECT max(id) FROM prompt_versions), 'test')"
        )
    )
    yield engine, holder
    holder.rollback()
    holder.close()


def test_a_lock_timeout_shrinks_the_batch_at_once_and_the_run_finishes(
    held_reference: tuple[Engine, Connection],
) -> None:
    engine, holder = held_reference
    settings = get_settings().with_(migration_lock_timeout_ms=150)
    result: dict[str, Any] = {}

    def run() -> None:
        result["summary"] = backfill(
            engine, BackfillOptions(batch_size=1_000, max_retries=10), settings=settings
        )

    runner = threading.Thread(target=run)
    runner.start()

    def shrunk() -> dict[str, Any] | None:
        with engine.connect() as connection:
            for counts in connection.execute(
                text("SELECT counts FROM migration_batches")
            ).scalars():
                if counts.get("adjust") == "timeout":
                    return dict(counts)
        return None

    first_after_timeout = until(shrunk, "a batch committed after a lock timeout")
    holder.rollback()
    runner.join(_DEADLINE_S)
    assert first_after_timeout["size"] == 100  # half of the first batch's 200, at once
    assert first_after_timeout["retries"] == 1 and first_after_timeout["backoff_ms"] > 0
    summary = result["summary"]
    assert summary.sessions_scanned == 600 and summary.retried >= 1
    assert verify(engine).passed


def test_a_run_held_by_the_throttle_query_waits_says_why_and_finishes_once_released(
    legacy_engine: Engine,
) -> None:
    with legacy_engine.begin() as connection:
        connection.execute(text("CREATE TABLE hold_backfill (id INTEGER)"))
        connection.execute(text("INSERT INTO hold_backfill VALUES (1)"))
    seen: list[BackfillProgress] = []
    result: dict[str, Any] = {}

    def run() -> None:
        result["summary"] = backfill(
            legacy_engine,
            BackfillOptions(throttle_query="SELECT EXISTS (SELECT 1 FROM hold_backfill)"),
            progress=seen.append,
        )

    runner = threading.Thread(target=run)
    runner.start()
    until(lambda: any(p.state == "throttled" for p in seen), "the run to be throttled")
    throttled = next(p for p in seen if p.state == "throttled")
    assert throttled.reason == "throttle query returned true"
    assert throttled.done == 0  # nothing walked while held
    with legacy_engine.begin() as connection:
        connection.execute(text("DELETE FROM hold_backfill"))
    runner.join(_DEADLINE_S)
    summary = result["summary"]
    assert summary.sessions_scanned == 600
    assert summary.waited_s > 0 and summary.waited_for == ["throttle query returned true"]
    assert "waited" in summary.describe() and "throttle query returned true" in summary.describe()
    assert verify(legacy_engine).passed


def test_a_run_outside_its_window_waits_and_a_cancel_stops_it_keeping_nothing_half_done(
    legacy_engine: Engine,
) -> None:
    now = time.localtime()
    later = (now.tm_hour * 60 + now.tm_min + 120) % 1440
    closed = RunWindow(later, (later + 60) % 1440)  # opens in two hours
    seen: list[BackfillProgress] = []
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            backfill(legacy_engine, BackfillOptions(window=closed), progress=seen.append)
        except Exception as error:
            result["error"] = error

    runner = threading.Thread(target=run)
    runner.start()
    until(lambda: any(p.state == "outside window" for p in seen), "the run to wait")
    waiting = next(p for p in seen if p.state == "outside window")
    assert waiting.reason is not None and str(closed) in waiting.reason
    request(legacy_engine, ControlAction.CANCEL, waiting.run_id)
    runner.join(_DEADLINE_S)
    assert "cancelled by" in str(result["error"])
    with legacy_engine.connect() as connection:
        status, references = connection.execute(
            text(
                "SELECT status, (SELECT count(*) FROM session_prompt_refs) FROM migration_runs "
                "WHERE id = :run"
            ),
            {"run": waiting.run_id},
        ).one()
    assert (status, references) == ("cancelled", 0)
    # The next run carries on (here: from the start, nothing was committed) and finishes.
    assert backfill(legacy_engine).sessions_scanned == 600


def _interrupted_after(engine: Engine, limit: int) -> int:
    """A run that stopped after ``limit`` sessions, as Ctrl-C leaves it."""
    summary = backfill(engine, BackfillOptions(limit=limit, batch_size=100))
    assert summary.run_id is not None
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE migration_runs SET status = 'interrupted' WHERE id = :run"),
            {"run": summary.run_id},
        )
    return summary.run_id


def test_a_compatible_resume_carries_on_from_the_checkpoint(legacy_engine: Engine) -> None:
    _interrupted_after(legacy_engine, 200)
    resumed = backfill(legacy_engine)
    assert resumed.resumed_after is not None and resumed.sessions_scanned == 400
    assert resumed.restarted is None


def test_a_checkpoint_of_another_code_version_is_not_trusted_the_run_starts_over(
    legacy_engine: Engine,
) -> None:
    run_id = _interrupted_after(legacy_engine, 200)
    with legacy_engine.begin() as connection:
        params = connection.execute(
            select(MigrationRun.params).where(MigrationRun.id == run_id)
        ).scalar_one()
        assert params is not None
        params["checkpoint"]["code_version"] = "0.0.1"
        connection.execute(
            update(MigrationRun).where(MigrationRun.id == run_id).values(params=params)
        )
    unlink_everything(legacy_engine)  # what another version's batches did is not trusted
    restarted = backfill(legacy_engine)
    assert restarted.sessions_scanned == 600 and restarted.resumed_after is None
    assert restarted.restarted is not None and "code version '0.0.1'" in restarted.restarted
    assert "started over" in restarted.describe()
    assert verify(legacy_engine).passed


def test_a_verify_that_found_faults_after_the_checkpoint_makes_the_run_start_over(
    legacy_engine: Engine,
) -> None:
    run_id = _interrupted_after(legacy_engine, 200)
    with legacy_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO migration_runs (kind, status, summary) VALUES "
                "('verify', 'completed', :summary)"
            ),
            {
                "summary": '{"passed": false, "corrupted_versions": [], '
                '"projects": {"p": {"mismatched": 3, "render_errors": 0, "stale": 0}}}'
            },
        )
    restarted = backfill(legacy_engine)
    assert restarted.sessions_scanned == 600
    assert restarted.restarted is not None
    assert f"after run {run_id}'s checkpoint" in restarted.restarted
    assert "3 mismatched" in restarted.restarted


def test_the_eta_range_contains_the_real_finish_of_a_steady_run(legacy_engine: Engine) -> None:
    predicted: dict[str, float] = {}

    def at_a_third(progress: BackfillProgress) -> None:
        if predicted or progress.run_id is None or progress.done < 200:
            return
        with legacy_engine.connect() as connection:
            view = observe(connection, progress.run_id)
        assert view.eta_low_s is not None and view.eta_high_s is not None
        now = time.monotonic()
        predicted.update(low=now + view.eta_low_s, high=now + view.eta_high_s)

    # Steady: a fixed size (15 sessions) and pace (a pause after every batch).
    options = BackfillOptions(batch_size=15, min_batch_size=15, sleep_ms=100)
    backfill(legacy_engine, options, progress=at_a_third)
    finished = time.monotonic()
    assert predicted["low"] <= finished <= predicted["high"], (predicted, finished)
