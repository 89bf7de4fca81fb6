"""Seeing a backfill run: the figures of :mod:`prompt_tool.migrate.backfill.observe` from ledger
rows written by hand (rate with the waited time left out, the ETA's range, lock hold p50/p99, a
run without batches, a dead run), and the Prometheus text file (its format read back, written
atomically)."""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, insert, text, update

from prompt_tool.db.models import (
    MigrationBatch,
    MigrationQuarantine,
    MigrationRun,
    OrchestrationSession,
    Project,
)
from prompt_tool.errors import InvalidInputError
from prompt_tool.migrate.backfill import observe as observe_module
from prompt_tool.migrate.backfill.observe import (
    EXCLUDES_WAITING,
    MetricsWriter,
    RunView,
    check_metrics_path,
    eta_range,
    metrics_text,
    observe,
    percentile,
    recent_backfills,
    sampled_batches_query,
    server_now,
    write_metrics,
)


@pytest.fixture
def engine(head_db_url: str, engine_for: Any) -> Engine:
    made: Engine = engine_for(head_db_url)
    return made


def _here(**extra: Any) -> dict[str, Any]:
    return {"scope": "acme", "host": socket.gethostname(), "pid": os.getpid(), **extra}


def _run(
    connection: Connection,
    status: str = "running",
    params: dict[str, Any] | None = None,
    summary: dict[str, Any] | None = None,
) -> int:
    return int(
        connection.execute(
            insert(MigrationRun)
            .values(
                kind="backfill",
                status=status,
                params=params if params is not None else _here(),
                summary=summary,
            )
            .returning(MigrationRun.id)
        ).scalar_one()
    )


def _live(**figures: Any) -> dict[str, Any]:
    return {
        "live": {
            "state": "working",
            "reason": None,
            "batch_size": 100,
            "done": 0,
            "total": 1000,
            "waited_s": 0.0,
            "quarantined": 0,
            "errors": 0,
            "workers": 1,
            "updated_at": "2026-01-01T00:00:00+00:00",
            **figures,
        }
    }


def _batch(
    connection: Connection,
    run_id: int,
    key_lo: int,
    *,
    rows: int,
    finished: datetime,
    hold_s: float = 0.1,
    **counts: Any,
) -> None:
    connection.execute(
        insert(MigrationBatch).values(
            run_id=run_id,
            key_lo=key_lo,
            key_hi=key_lo + rows,
            status="done",
            rows_seen=rows,
            counts={"hold_ms": hold_s * 1000, **counts},
            started_at=finished - timedelta(seconds=hold_s),
            finished_at=finished,
        )
    )


def _steady(connection: Connection, run_id: int, holds: list[float]) -> datetime:
    """A batch of 100 rows every 2 s up to now, each after a 1 s wait (the first one's wait
    lies before the span), with the given transaction times; and an old batch, 5 minutes ago,
    that is out of the last minute."""
    now = server_now(connection)
    _batch(connection, run_id, 0, rows=100, finished=now - timedelta(minutes=5), waited_ms=0)
    count = len(holds)
    for index, hold in enumerate(holds):
        finished = now - timedelta(seconds=2 * (count - index)) + timedelta(seconds=0.1)
        _batch(
            connection,
            run_id,
            1000 + 100 * index,
            rows=100,
            finished=finished,
            hold_s=hold,
            waited_ms=1000.0,
            size=100 + index,
        )
    return now


def test_rows_per_second_count_the_last_minute_and_leave_the_waited_time_out(
    engine: Engine,
) -> None:
    with engine.begin() as connection:
        run_id = _run(connection, summary=_live(done=550, total=1000))
        _steady(connection, run_id, [0.1] * 5)
    with engine.connect() as connection:
        view = observe(connection, run_id)
    # From the first batch's start to the last one's end, 2 s x 4 + 0.1 s hold = 8.1 s, less the
    # four waits between them (1 s each): 500 rows in 4.1 s of work; the old batch is left out.
    assert view.rows_per_second == pytest.approx(500 / 4.1, rel=1e-6)
    # The live figure is published about once a second: the ledger's 6 batches are further on.
    assert (view.done, view.total, view.remaining, view.batches) == (600, 1000, 400, 6)
    assert view.state == "live" and view.activity == "working"
    assert view.batch_size == 100  # the live state's, not the last batch's
    assert view.waited_s == pytest.approx(5.0)  # the ledger's 5 waits beat the live 0 s


def test_the_eta_range_comes_from_the_spread_of_batch_throughput(engine: Engine) -> None:
    with engine.begin() as connection:
        run_id = _run(connection, summary=_live(done=600, total=1000))
        _steady(connection, run_id, [0.05, 0.1, 0.1, 0.1, 0.2])
    with engine.connect() as connection:
        view = observe(connection, run_id)
    rate = view.rows_per_second
    assert rate is not None
    # Throughputs 2000, 1000, 1000, 1000, 500 rows/s: p10 = 0.7 and p90 = 1.6 of the median.
    assert view.eta_s == pytest.approx(400 / rate)
    assert view.eta_low_s == pytest.approx(400 / (rate * 1.6) - 1.0)
    assert view.eta_high_s == pytest.approx(400 / (rate * 0.7) + 1.0)
    assert view.eta_note is None


def test_on_a_steady_run_the_eta_range_holds_the_real_finish(engine: Engine) -> None:
    """A run of 200 batches of 100 rows, each transaction 40-120 ms (seeded) plus 10 ms between
    batches, and a 2 s throttle before every tenth: seen half way, the range holds the time
    its other half works (the waits left out, as the ETA says)."""
    draw = random.Random(7)
    holds = [draw.uniform(0.04, 0.12) for _ in range(200)]
    with engine.begin() as connection:
        run_id = _run(connection, summary=_live(done=10_000, total=20_000, workers=1))
        now = server_now(connection)
        finished = now - timedelta(seconds=sum(hold + 0.01 for hold in holds[:100]) + 20)
        for index, hold in enumerate(holds[:100]):
            waited = 2.0 if index % 10 == 0 else 0.0
            finished += timedelta(seconds=waited + hold + 0.01)
            _batch(
                connection,
                run_id,
                index * 100,
                rows=100,
                finished=finished,
                hold_s=hold,
                waited_ms=waited * 1000,
            )
    with engine.connect() as connection:
        view = observe(connection, run_id)
    real = sum(hold + 0.01 for hold in holds[100:])
    assert view.eta_s is not None and view.eta_low_s is not None and view.eta_high_s is not None
    assert view.eta_low_s <= real <= view.eta_high_s
    assert view.eta_s == pytest.approx(real, rel=0.25)


def test_a_steady_run_gets_a_range_of_at_least_a_fifth_either_side() -> None:
    found = eta_range(1000, 100.0, [100.0] * 10)
    assert found == pytest.approx((10.0, 1000 / 120 - 1.0, 1000 / 80 + 1.0))
    few = eta_range(1000, 100.0, [100.0] * 2)  # two batches tell little: half either side
    assert few == pytest.approx((10.0, 1000 / 150 - 1.0, 1000 / 50 + 1.0))
    assert eta_range(1000, 0.0, []) is None


def test_a_waiting_run_says_its_eta_excludes_the_waiting(engine: Engine) -> None:
    reason = "replica replay lag 2,400 ms (limit 1,500 ms) [standby-1]"
    with engine.begin() as connection:
        run_id = _run(
            connection, summary=_live(state="throttled", reason=reason, done=600, total=1000)
        )
        _steady(connection, run_id, [0.1] * 5)
    with engine.connect() as connection:
        view = observe(connection, run_id)
    assert view.waiting and view.activity == "throttled"
    assert view.throttle_reason == reason
    assert view.eta_note == EXCLUDES_WAITING
    assert view.eta_s == pytest.approx(400 / (500 / 4.1))  # the working rate, waits left out


def test_lock_hold_p50_and_p99_come_from_the_batches_transaction_times(engine: Engine) -> None:
    with engine.begin() as connection:
        run_id = _run(connection, status="completed", summary={"sessions_scanned": 100})
        now = server_now(connection)
        for index in range(100):
            _batch(
                connection,
                run_id,
                index,
                rows=1,
                finished=now - timedelta(seconds=100 - index),
                hold_s=(index + 1) / 1000,
            )
    with engine.connect() as connection:
        view = observe(connection, run_id)
    assert view.hold_p50_ms == pytest.approx(50.5)
    assert view.hold_p99_ms == pytest.approx(99.01)
    assert view.state == "finished" and view.eta_s is None
    assert (view.done, view.total) == (100, 100)


def test_without_hold_ms_the_hold_is_the_difference_of_the_batch_timestamps(
    engine: Engine,
) -> None:
    with engine.begin() as connection:
        run_id = _run(connection, status="completed")
        now = server_now(connection)
        for index, hold in enumerate([1.0, 2.0, 3.0]):
            connection.execute(
                insert(MigrationBatch).values(
                    run_id=run_id,
                    key_lo=index,
                    key_hi=index + 1,
                    status="done",
                    rows_seen=10,
                    counts={},
                    started_at=now - timedelta(seconds=10 - index * 3 + hold),
                    finished_at=now - timedelta(seconds=10 - index * 3),
                )
            )
    with engine.connect() as connection:
        view = observe(connection, run_id)
    assert view.hold_p50_ms == pytest.approx(2000.0)
    assert view.batch_size is None


def test_a_run_with_no_batches_has_no_rate_eta_or_lock_hold(engine: Engine) -> None:
    with engine.begin() as connection:
        run_id = _run(connection, summary=_live(total=600, batch_size=250))
    with engine.connect() as connection:
        view = observe(connection, run_id)
    assert (view.done, view.total, view.batches) == (0, 600, 0)
    assert view.rows_per_second is None and view.eta_s is None
    assert view.hold_p50_ms is None and view.hold_p99_ms is None
    assert view.batch_size == 250


def _gone_pid() -> int:
    done = subprocess.run(["true"], check=True)
    assert done.returncode == 0
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_dead_run_shows_dead_with_what_its_ledger_holds_and_no_eta(engine: Engine) -> None:
    with engine.begin() as connection:
        run_id = _run(
            connection,
            params=_here(pid=_gone_pid()),
            summary=_live(done=300, total=1000, batch_size=100),
        )
        _steady(connection, run_id, [0.1] * 3)
    with engine.connect() as connection:
        view = observe(connection, run_id)
    assert (view.state, view.status) == ("dead", "abandoned")
    assert "is gone" in view.reason
    assert view.eta_s is None and view.activity is None and not view.waiting
    assert view.done == 400  # the ledger's committed batches, not the last live figure
    assert view.batch_size == 102  # the last batch's size, as it is not live
    assert view.rows_per_second is not None  # over the last minute it ran


def test_retries_errors_and_quarantined_rows_are_totalled_from_the_whole_ledger(
    engine: Engine,
) -> None:
    with engine.begin() as connection:
        run_id = _run(connection, status="failed", summary={"errors": 3})
        connection.execute(
            update(MigrationRun).where(MigrationRun.id == run_id).values(error="too many errors")
        )
        now = server_now(connection)
        for index in range(3):
            _batch(
                connection,
                run_id,
                index * 10,
                rows=10,
                finished=now - timedelta(seconds=3 - index),
                retries=index,
                quarantined=1,
            )
    with engine.connect() as connection:
        view = observe(connection, run_id)
    assert (view.retries, view.errors, view.quarantined) == (3, 3, 3)
    assert view.error == "too many errors"
    assert view.total is None  # a failed run that never recorded its total


def test_the_quarantine_table_counts_the_rows_the_run_quarantined(engine: Engine) -> None:
    with engine.begin() as connection:
        run_id = _run(connection, status="completed")
        project = connection.execute(
            insert(Project).values(slug="acme", name="Acme").returning(Project.id)
        ).scalar_one()
        for index in range(2):
            session = connection.execute(
                insert(OrchestrationSession)
                .values(project_id=project, name=f"s{index}", system_prompt="x" * 10)
                .returning(OrchestrationSession.id)
            ).scalar_one()
            connection.execute(
                insert(MigrationQuarantine).values(
                    run_id=run_id,
                    session_id=session,
                    project_id=project,
                    role="system",
                    reason="over the template size limit",
                )
            )
    with engine.connect() as connection:
        assert observe(connection, run_id).quarantined == 2


def test_recent_backfills_are_the_running_ones_and_the_latest_newest_first(
    engine: Engine,
) -> None:
    with engine.begin() as connection:
        running = _run(connection, summary=_live())
        finished = [_run(connection, status="completed") for _ in range(4)]
        connection.execute(
            insert(MigrationRun).values(kind="verify", status="completed", params={})
        )
    with engine.connect() as connection:
        views = recent_backfills(connection, limit=3)
    assert [view.run_id for view in views] == [*reversed(finished[1:]), running]


def test_an_id_that_is_no_backfill_run_is_refused_in_one_line(engine: Engine) -> None:
    with engine.connect() as connection, pytest.raises(InvalidInputError, match="no backfill run"):
        observe(connection, 424242)


def test_the_latest_batches_are_read_along_the_run_id_key_lo_index(pg_url: str) -> None:
    from prompt_tool.db import schema
    from prompt_tool.db.engine import make_engine

    schema.upgrade(pg_url)
    engine = make_engine(pg_url)
    try:
        with engine.begin() as connection:
            run_id = _run(connection)
            connection.execute(text("SET LOCAL enable_seqscan = off"))
            query = sampled_batches_query(run_id).compile(
                engine, compile_kwargs={"literal_binds": True}
            )
            plan = "\n".join(row[0] for row in connection.execute(text(f"EXPLAIN {query}")))
    finally:
        engine.dispose()
    assert "uq_migration_batches_run_id_key_lo" in plan, plan
    assert "Sort" not in plan, plan


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0], 0.99) == pytest.approx(1.99)


# --- the Prometheus text file -------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-z_]+)\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\} (\S+)$')
_LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def _parse(text_format: str) -> tuple[dict[str, str], dict[tuple[str, frozenset[Any]], float]]:
    """(type per metric, value per (metric, labels)); every line must be a comment or a
    sample, every sample's metric declared before it."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[Any]], float] = {}
    assert text_format.endswith("\n")
    for line in text_format.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, line
        name, labels, value = match.groups()
        assert name in types, line
        pairs = frozenset((k, _unescape(v)) for k, v in _LABEL.findall(labels))
        samples[(name, pairs)] = float(value)
    return types, samples


def _view(**changes: Any) -> RunView:
    figures: dict[str, Any] = {
        "run_id": 12,
        "scope": "acme",
        "status": "running",
        "state": "live",
        "reason": "running",
        "activity": "working",
        "throttle_reason": None,
        "done": 300,
        "total": 600,
        "batches": 3,
        "rows_per_second": 150.0,
        "eta_s": 2.0,
        "eta_low_s": 1.0,
        "eta_high_s": 4.0,
        "eta_note": None,
        "batch_size": 100,
        "hold_p50_ms": 12.0,
        "hold_p99_ms": 40.0,
        "retries": 1,
        "errors": 2,
        "quarantined": 2,
        "waited_s": 1.5,
        "workers": 1,
        "started_at": None,
        "finished_at": None,
        "error": None,
        "updated_at": None,
    }
    figures.update(changes)
    return RunView(**figures)


def test_the_metrics_file_is_prometheus_text_that_reads_back() -> None:
    scope = 'a"b\\c\nd'
    reason = "blocked [sessions] 3 \\ 2"
    types, samples = _parse(
        metrics_text(
            [
                _view(),
                _view(run_id=11, scope=scope, activity="throttled", throttle_reason=reason),
            ]
        )
    )
    run = frozenset({("run", "12"), ("scope", "acme")})
    assert samples[("prompt_tool_backfill_sessions_done", run)] == 300
    assert samples[("prompt_tool_backfill_sessions_total", run)] == 600
    assert samples[("prompt_tool_backfill_rows_per_second", run)] == 150
    assert samples[("prompt_tool_backfill_eta_seconds", run)] == 2
    assert samples[("prompt_tool_backfill_eta_low_seconds", run)] == 1
    assert samples[("prompt_tool_backfill_eta_high_seconds", run)] == 4
    assert samples[("prompt_tool_backfill_batch_size", run)] == 100
    assert samples[("prompt_tool_backfill_throttled", run | {("reason", "")})] == 0
    assert samples[("prompt_tool_backfill_lock_hold_seconds", run | {("quantile", "0.5")})] == 0.012
    assert samples[("prompt_tool_backfill_lock_hold_seconds", run | {("quantile", "0.99")})] == 0.04
    assert samples[("prompt_tool_backfill_errors_total", run)] == 2
    assert samples[("prompt_tool_backfill_quarantined", run)] == 2
    assert samples[("prompt_tool_backfill_waited_seconds_total", run)] == 1.5
    other = frozenset({("run", "11"), ("scope", scope), ("reason", reason)})
    assert samples[("prompt_tool_backfill_throttled", other)] == 1  # labels escaped and back
    assert types["prompt_tool_backfill_sessions_done"] == "gauge"
    assert types["prompt_tool_backfill_errors_total"] == "counter"


def test_unknown_figures_are_left_out_of_the_metrics_file() -> None:
    _, samples = _parse(metrics_text([_view(eta_s=None, eta_low_s=None, eta_high_s=None)]))
    assert not any(name.startswith("prompt_tool_backfill_eta") for name, _ in samples)


def test_the_metrics_file_is_replaced_whole_never_seen_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "backfill.prom"
    big = [_view(run_id=run, scope="s" * 200) for run in range(300)]
    expected = {metrics_text(big), metrics_text(big[:1])}
    replaced: list[str] = []
    real_replace = os.replace

    def recording_replace(source: Any, destination: Any) -> None:
        replaced.append(str(destination))
        real_replace(source, destination)

    monkeypatch.setattr(observe_module.os, "replace", recording_replace)
    write_metrics(target, big[:1])
    stop = threading.Event()
    seen: list[str] = []

    def read() -> None:
        while not stop.is_set():
            seen.append(target.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for index in range(40):
            write_metrics(target, big if index % 2 else big[:1])
    finally:
        stop.set()
        reader.join()
    assert seen and set(seen) <= expected
    assert replaced and set(replaced) == {str(target)}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["backfill.prom"]  # no temp left
    assert target.stat().st_mode & 0o644 == 0o644


def test_a_metrics_path_that_cannot_be_written_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError) as missing:
        check_metrics_path(str(tmp_path / "nowhere" / "backfill.prom"))
    assert "does not exist" in str(missing.value) and "\n" not in str(missing.value)
    with pytest.raises(InvalidInputError, match="is a directory"):
        check_metrics_path(str(tmp_path))
    assert check_metrics_path(str(tmp_path / "backfill.prom")) == tmp_path / "backfill.prom"
    assert list(tmp_path.iterdir()) == []  # the probe is gone
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(InvalidInputError, match="cannot write"):
            check_metrics_path(str(locked / "backfill.prom"))


def test_the_metrics_writer_refreshes_and_writes_a_last_time_when_stopped(
    engine: Engine, tmp_path: Path
) -> None:
    target = tmp_path / "backfill.prom"
    with engine.begin() as connection:
        run_id = _run(connection, summary=_live(done=10, total=100))
    writer = MetricsWriter(engine, target, interval_s=0.05).start()
    try:
        first = target.read_text()
        assert f'prompt_tool_backfill_sessions_done{{run="{run_id}",scope="acme"}} 10' in first
        with engine.begin() as connection:
            connection.execute(
                update(MigrationRun)
                .where(MigrationRun.id == run_id)
                .values(status="completed", summary={"total": 100})
            )
            _batch(connection, run_id, 0, rows=100, finished=server_now(connection))
    finally:
        writer.stop()
    last = target.read_text()
    assert f'prompt_tool_backfill_sessions_done{{run="{run_id}",scope="acme"}} 100' in last
    assert writer.last_error is None and writer.writes >= 2
