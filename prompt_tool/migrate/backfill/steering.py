"""The control loop of a backfill run: one :class:`Steering` per process, consulted before and
after every batch.

Before a batch (:meth:`Steering.gate`) it waits while the run must not work: paused or cancelled
by ``orch-migrate backfill pause|cancel`` (read from the run's ledger row, so every worker
notices within one batch), outside the run's ``--window``, or throttled by a health signal
(:mod:`.health`: replica lag, WAL rate, autovacuum, sessions blocked behind the run, the oldest
transaction, the operator's ``--throttle-query``). Waiting happens between batches, on no open
transaction, so a waiting run holds no lock but its projects' advisory locks. The planning
process decides (it runs the health monitor and the window) and publishes what it decided in the
ledger; the worker processes follow it.

A batch (:meth:`Steering.attempt`) runs in one short transaction. A lock or statement timeout
rolls it back and retries it at once at half the size (never again at the same size); a
deadlock retries it after a backoff. After a batch the size is steered toward the target
transaction time (``--target-ms``): a moving average of the time per session (alpha 0.4) gives
the size that would take 90% of the target; the size moves there, by at most 1.5x up per
batch and at once down, within ``--min-batch-size`` and ``--batch-size``. Every batch records
its size, what set it, its retries, backoff and the time the run waited before it
(:class:`~.types.BatchNotes`).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from prompt_tool.db.dialect import is_lock_timeout, is_retryable, is_statement_timeout
from prompt_tool.db.engine import Connectable, begin, connect
from prompt_tool.errors import LockTimeoutError, PromptToolError
from prompt_tool.migrate.backfill.batch import WRITTEN_TABLES
from prompt_tool.migrate.backfill.health import HealthMonitor, Reading
from prompt_tool.migrate.backfill.ledger import live_state, publish_live
from prompt_tool.migrate.backfill.remote import ControlAction, read_request
from prompt_tool.migrate.backfill.types import (
    BackfillOptions,
    BackfillProgress,
    BackfillRun,
    BackfillSummary,
    BatchResult,
)
from prompt_tool.migrate.lock_waits import lock_wait_error

__all__ = ["FIRST_BATCH", "Pace", "Steering", "retrying", "steered_size"]

_T = TypeVar("_T")
FIRST_BATCH = 200
_ALPHA = 0.4  # weight of the newest batch in the moving average of the time per session
_AIM = 0.9  # the share of the target a batch aims at: an average batch leaves room
_GROW = 1.5  # at most this factor up after one batch
_DEADBAND = 0.1  # closer than this to the aim: the size holds
_POLL_S = 0.5  # how often a waiting run looks at its control row
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 5.0  # a throttled run re-reads its health at most this far apart
_PUBLISH_EVERY_S = 1.0
# Every table a run reads or writes: where a lock that outlasted the retries is looked for.
_TOUCHED_TABLES = (
    "orchestration_sessions",
    "projects",
    *WRITTEN_TABLES,
    "prompt_labels",
    "migration_runs",
    "migration_batches",
)


class Pace(enum.StrEnum):
    """What a run is doing, as its live state and ``status`` show it."""

    WORKING = "working"
    THROTTLED = "throttled"
    PAUSED = "paused"
    OUTSIDE_WINDOW = "outside window"
    CANCELLING = "cancelling"


_WAITING = {Pace.THROTTLED, Pace.PAUSED, Pace.OUTSIDE_WINDOW}


@dataclass(frozen=True, slots=True)
class _Hold:
    """Why the run waits now."""

    pace: Pace
    reason: str
    # How the run's summary names it among what it waited for (the reason without advice).
    short: str = ""


def steered_size(size: int, per_session_s: float, options: BackfillOptions) -> tuple[int, str]:
    """The next batch size, and what moved it (grow, shrink, hold), given the moving average of
    the time per session: the size that takes :data:`_AIM` of the target, reached by at most
    :data:`_GROW` up per batch and at once down, within the run's bounds."""
    target_s = options.target_batch_ms / 1000
    ideal = target_s * _AIM / per_session_s if per_session_s > 0 else float(options.batch_size)
    low, high = options.smallest_batch, options.batch_size
    if abs(ideal - size) <= _DEADBAND * size:
        wanted = size
    elif ideal > size:
        wanted = int(min(ideal, size * _GROW))
    else:
        wanted = int(ideal)
    wanted = max(low, min(high, wanted))
    if wanted > size:
        return wanted, "grow"
    if wanted < size:
        return wanted, "shrink"
    return size, "hold"


class Steering:
    """One process's control loop of a run (see the module). ``leader``: the planning process,
    which runs the health checks and the window and publishes the run's state; a worker process
    follows what it published."""

    def __init__(
        self, run: BackfillRun, health: HealthMonitor | None = None, *, leader: bool = True
    ) -> None:
        self.run = run
        self.health = health
        self.leader = leader
        self.size = min(run.options.batch_size, FIRST_BATCH)
        self.cancelled_by: str | None = None
        self._why = "first"
        self._per_session: float | None = None
        self._pace = Pace.WORKING
        self._reason: str | None = None
        self._published = 0.0
        self._done = 0
        run.summary.batch_size = self.size

    # -- before a batch -------------------------------------------------------------------------

    def gate(self) -> bool:
        """Wait while the run must not work; False when it is cancelled (stop the walk)."""
        began = time.monotonic()
        held = False
        backoff = _FIRST_BACKOFF_S
        health_due = began
        health_hold: _Hold | None = None
        fresh = False  # the first look uses the monitor's last sample, later ones read anew
        while True:
            hold = self._control_hold()
            if self.cancelled_by is not None:
                self._note(Pace.CANCELLING, f"cancelled by {self.cancelled_by}")
                self._finish_wait(began if held else None)
                return False
            if hold is None and self.leader:
                hold = self._window_hold()
                if hold is None and self.health is not None:
                    now = time.monotonic()
                    if now >= health_due:
                        health_hold = _throttle(
                            self.health.sample() if fresh else self.health.holding()
                        )
                        if fresh:
                            health_due = now + backoff
                            backoff = min(backoff * 2, _MAX_BACKOFF_S)
                        fresh = True
                    hold = health_hold
            if hold is None:
                self._note(Pace.WORKING, None)
                self._finish_wait(began if held else None)
                return True
            held = True
            self._note(hold.pace, hold.reason)
            short = hold.short or hold.reason
            if short not in self.run.summary.waited_for:
                self.run.summary.waited_for.append(short)
            time.sleep(_POLL_S)

    def _control_hold(self) -> _Hold | None:
        """A pause asked of the run (every process), or what the leader published (workers)."""
        run_id = self.run.run_id
        if run_id is None:
            return None
        with connect(self.run.engine) as connection:
            request = read_request(connection, run_id)
            live = {} if self.leader else live_state(connection, run_id)
        if request is not None and request.action is ControlAction.CANCEL:
            self.cancelled_by = request.by
            return None
        if request is not None and request.action is ControlAction.PAUSE:
            return _Hold(
                Pace.PAUSED,
                f"paused by {request.by} at {request.at}; `orch-migrate backfill resume` "
                "carries on",
                f"paused by {request.by}",
            )
        pace = live.get("state")
        if pace in {p.value for p in _WAITING}:
            return _Hold(Pace(pace), str(live.get("reason") or pace), f"{pace} (planning process)")
        return None

    def _window_hold(self) -> _Hold | None:
        window = self.run.options.window
        if window is None:
            return None
        now = time.localtime()
        if window.contains(now.tm_hour * 60 + now.tm_min):
            return None
        return _Hold(
            Pace.OUTSIDE_WINDOW,
            f"outside its window {window} (local time); works again at {str(window)[:5]}",
            f"outside its window {window}",
        )

    def _finish_wait(self, began: float | None) -> None:
        """Record how long the run waited before this batch (``began`` None: it did not)."""
        waited = 0.0 if began is None else time.monotonic() - began
        self.run.notes.waited_ms = waited * 1000
        self.run.summary.waited_s += waited

    def _note(self, pace: Pace, reason: str | None) -> None:
        """The run's state now: recorded in the summary, published when it changed."""
        changed = (pace, reason) != (self._pace, self._reason)
        self._pace, self._reason = pace, reason
        if changed:
            self.report(self._done, self.run.summary.batches, force=True)

    # -- a batch --------------------------------------------------------------------------------

    def attempt(
        self, work: Callable[[Connection, int], BatchResult | None], cap: int | None = None
    ) -> BatchResult | None:
        """``work(connection, size)`` in one short transaction (rolled back in a dry run). A lock
        or statement timeout retries it at once at half the size; a deadlock after a backoff.
        Past ``--max-retries``: :class:`LockTimeoutError`. The time of the attempt that
        succeeded steers the next size."""
        run, notes = self.run, self.run.notes
        size = self.size if cap is None else max(1, min(self.size, cap))
        notes.size, notes.adjust, notes.retries, notes.backoff_ms = size, self._why, 0, 0.0
        first_began = time.monotonic()
        while True:
            try:
                with begin(run.engine) as connection:
                    notes.began = time.perf_counter()
                    result = work(connection, size)
                    if run.options.dry_run:
                        connection.rollback()
                break
            except DBAPIError as error:
                timed_out = is_lock_timeout(error) or is_statement_timeout(error)
                if not (timed_out or is_retryable(error)):
                    raise
                if notes.retries >= run.options.max_retries:
                    waited = time.monotonic() - first_began
                    raise _gave_up(run, error, notes.retries + 1, waited) from None
                notes.retries += 1
                run.summary.retried += 1
                if timed_out:  # smaller at once: never the same batch again
                    size = max(run.options.smallest_batch, size // 2)
                    self.size, self._per_session = size, None
                    notes.size, notes.adjust = size, "timeout"
                pause = min(2.0, 0.05 * 2**notes.retries)
                notes.backoff_ms += pause * 1000
                time.sleep(pause)
        seconds = time.perf_counter() - notes.began
        run.summary.batch_seconds.append(seconds)
        if result is not None and not notes.retries:
            self._steer(seconds, result.sessions or size)
        elif result is not None:  # it waited for a lock: its time says nothing of its size
            self._why = "hold"
        return result

    def _steer(self, seconds: float, sessions: int) -> None:
        per_session = seconds / max(1, sessions)
        if self._per_session is None:
            self._per_session = per_session
        else:
            self._per_session = _ALPHA * per_session + (1 - _ALPHA) * self._per_session
        self.size, self._why = steered_size(self.size, self._per_session, self.run.options)
        self.run.summary.batch_size = self.size

    # -- what the run shows ---------------------------------------------------------------------

    def report(self, done: int, batches: int, *, force: bool = False) -> None:
        """Tell the progress callback how far the run is and what it does; the leader also
        publishes it in the ledger (at most about once a second, and on every change)."""
        run = self.run
        self._done = done
        if run.progress is not None:
            run.progress(
                BackfillProgress(
                    done,
                    run.total,
                    batches,
                    time.monotonic() - run.started,
                    state=self._pace.value,
                    reason=self._reason,
                    batch_size=self.size,
                    run_id=run.run_id,
                    waited_s=run.summary.waited_s,
                    quarantined=run.summary.quarantined,
                )
            )
        now = time.monotonic()
        if not self.leader or run.run_id is None:
            return
        if not force and now - self._published < _PUBLISH_EVERY_S:
            return
        self._published = now
        publish_live(run.engine, run.run_id, self.live(done))

    def live(self, done: int) -> dict[str, Any]:
        """The run's state as ``summary["live"]`` holds it (see ``observe``)."""
        summary = self.run.summary
        return {
            "state": self._pace.value,
            "reason": self._reason,
            "batch_size": self.size,
            "done": done,
            "total": self.run.total,
            "waited_s": round(summary.waited_s, 3),
            "quarantined": summary.quarantined,
            # Rows the run could not link: not valid UTF-8, or quarantined.
            "errors": summary.unreadable + summary.quarantined,
            "workers": summary.workers,
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }


def _throttle(reading: Reading | None) -> _Hold | None:
    if reading is None:
        return None
    return _Hold(Pace.THROTTLED, reading.describe(), reading.describe().split(" (limit")[0])


def retrying(
    engine: Connectable,
    options: BackfillOptions,
    work: Callable[[Connection], _T],
) -> _T:
    """``work`` in one short transaction (not a batch: the run's preparation), retried after
    lock timeouts and deadlocks with backoff, as batches are."""
    attempt = 0
    first_began = time.monotonic()
    while True:
        try:
            with begin(engine) as connection:
                return work(connection)
        except DBAPIError as error:
            if not is_retryable(error):
                raise
            if attempt >= options.max_retries:
                waited = time.monotonic() - first_began
                raise _gave_up(None, error, attempt + 1, waited, engine) from None
            attempt += 1
            time.sleep(min(2.0, 0.05 * 2**attempt))


def _gave_up(
    run: BackfillRun | None,
    error: DBAPIError,
    attempts: int,
    waited_s: float,
    engine: Connectable | None = None,
) -> PromptToolError:
    summary: BackfillSummary | None = None if run is None else run.summary
    if summary is None or not summary.batches:
        stands = "nothing was written"
    else:
        batches = "the batch" if summary.batches == 1 else f"the {summary.batches:,} batches"
        stands = (
            f"{batches} before it ({summary.sessions_scanned:,} sessions) "
            f"{'is' if summary.batches == 1 else 'are'} committed and a rerun carries on from "
            "its last checkpoint"
        )
    if not (is_lock_timeout(error) or is_statement_timeout(error)):  # a deadlock, every time
        return LockTimeoutError(
            f"backfill gave up after {attempts} attempts in {waited_s:.1f} s: each was chosen "
            f"as a deadlock victim; {stands}; run the same command again"
        )
    where = run.engine if run is not None else engine
    assert where is not None
    return lock_wait_error(
        where, "backfill", _TOUCHED_TABLES, stands=stands, attempts=attempts, waited_s=waited_s
    )
