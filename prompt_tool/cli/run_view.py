"""How a backfill run is shown: the same figures in `orch-migrate status` (a table),
`status --watch` (a live table on a terminal, one plain line per refresh through a pipe, one JSON
object per line with ``--json``) and the running backfill's own progress bar.

The figures come from :mod:`prompt_tool.migrate.backfill.observe` (the ledger); this module only
lays them out. Stored text (scopes, throttle reasons) is printed literally, never as markup.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column
from rich.text import Text
from sqlalchemy import Engine

from prompt_tool.cli._runtime import literal, stderr, stdout, table, write_out
from prompt_tool.db.engine import connect
from prompt_tool.migrate.backfill.observe import (
    EXCLUDES_WAITING,
    WAITING_STATES,
    RunView,
    observe,
    recent_backfills,
    write_metrics,
)
from prompt_tool.migrate.backfill.types import BackfillProgress

__all__ = [
    "REFRESH_S",
    "backfill_progress",
    "backfills_table",
    "duration",
    "eta_text",
    "progress_detail",
    "view_line",
    "watch",
]

# How often `status --watch` refreshes, and at most how often the progress bar reads the ledger.
REFRESH_S = 2.0


def duration(seconds: float) -> str:
    """``1:02:03`` or ``2:03``, rounded to the second."""
    minutes, secs = divmod(round(max(seconds, 0.0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_text(view: RunView) -> str:
    """``ETA 2:03 (1:50-2:40)``, with ``ETA excludes waiting`` while the run waits; empty when
    there is no ETA (a run that ended, no batch yet)."""
    if view.eta_s is None:
        return ""
    shown = f"ETA {duration(view.eta_s)}"
    if view.eta_low_s is not None and view.eta_high_s is not None:
        shown += f" ({duration(view.eta_low_s)}-{duration(view.eta_high_s)})"
    return f"{shown}, {view.eta_note}" if view.eta_note else shown


def _rate(rows_per_second: float | None) -> str:
    return "-" if rows_per_second is None else f"{rows_per_second:,.0f} rows/s"


def _hold(view: RunView) -> str:
    if view.hold_p50_ms is None or view.hold_p99_ms is None:
        return "-"
    return f"p50 {view.hold_p50_ms:,.0f} ms, p99 {view.hold_p99_ms:,.0f} ms"


def _done(view: RunView) -> str:
    total = "?" if view.total is None else f"{view.total:,}"
    return f"{view.done:,}/{total}"


def _where(view: RunView) -> str:
    """live: what its controller does (and why it waits); otherwise its state and status."""
    if view.live:
        activity = view.activity or "working"
        return f"{activity}: {view.throttle_reason}" if view.throttle_reason else activity
    return view.state if view.status in (view.state, "") else f"{view.state} ({view.status})"


def view_line(view: RunView) -> str:
    """One run on one plain line."""
    parts = [
        f"backfill #{view.run_id} {view.scope} {_where(view)}",
        f"{_done(view)} sessions",
        _rate(view.rows_per_second),
        eta_text(view),
        f"batch {view.batch_size:,}" if view.batch_size is not None else "",
        f"lock hold {_hold(view)}",
        f"retries {view.retries}, errors {view.errors}, quarantined {view.quarantined}",
        f"waited {duration(view.waited_s)}" if view.waited_s else "",
    ]
    return "; ".join(part for part in parts if part)


def backfills_table(views: Sequence[RunView]) -> Any:
    """The backfills as a table (every value literal)."""
    return table(
        "backfills",
        [
            "run",
            "scope",
            "state",
            "done",
            "rate",
            "eta",
            "batch",
            "lock hold",
            "retries",
            "errors",
            "quarantined",
        ],
        [
            (
                f"#{view.run_id}",
                view.scope,
                _where(view),
                _done(view),
                _rate(view.rows_per_second),
                eta_text(view) or "-",
                "-" if view.batch_size is None else f"{view.batch_size:,}",
                _hold(view),
                view.retries,
                view.errors,
                view.quarantined,
            )
            for view in views
        ],
    )


def _jsonable(view: RunView) -> dict[str, Any]:
    return {
        key: value.isoformat() if isinstance(value, datetime) else value
        for key, value in dataclasses.asdict(view).items()
    }


def _now() -> str:
    return datetime.now(UTC).astimezone().strftime("%H:%M:%S")


def _fetch(engine: Engine, metrics_file: str | None) -> list[RunView]:
    with connect(engine) as connection:
        views = recent_backfills(connection)
    if metrics_file is not None:
        write_metrics(metrics_file, views)
    return views


def _screen(views: Sequence[RunView], interval_s: float) -> RenderableType:
    header = literal(f"{_now()}  refreshing every {interval_s:g}s; Ctrl-C to stop")
    if not views:
        return Group(header, literal("no backfill runs recorded yet"))
    notes = [literal(EXCLUDES_WAITING, style="yellow")] if any(v.eta_note for v in views) else []
    return Group(header, backfills_table(views), *notes)


def watch(
    engine: Engine, *, interval_s: float = REFRESH_S, as_json: bool, metrics_file: str | None
) -> None:
    """Show the running and latest backfills every ``interval_s`` seconds until Ctrl-C, which
    ends it quietly. On a terminal a live table; piped, one plain line per refresh (no escape
    sequences); with ``as_json`` one JSON object per line. ``metrics_file`` is rewritten at each
    refresh."""
    try:
        if as_json or not stdout.is_terminal:
            while True:
                views = _fetch(engine, metrics_file)
                if as_json:
                    line = json.dumps(
                        {
                            "at": datetime.now(UTC).isoformat(),
                            "backfills": [_jsonable(v) for v in views],
                        },
                        ensure_ascii=False,
                    )
                else:
                    line = f"{_now()} " + (" | ".join(map(view_line, views)) or "no backfill runs")
                write_out(line + "\n")
                sys.stdout.flush()
                time.sleep(interval_s)
        with Live(console=stdout, auto_refresh=False, transient=False) as live:
            while True:
                live.update(_screen(_fetch(engine, metrics_file), interval_s), refresh=True)
                time.sleep(interval_s)
    except KeyboardInterrupt:
        return
    except BrokenPipeError:  # `status --watch | head -3`: the reader has had what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return


# --- the running backfill's own progress bar ----------------------------------------------------


def progress_detail(progress: BackfillProgress, view: RunView | None) -> str:
    """What the progress bar shows beside done/total: rows/s, ETA range, batch size, lock hold,
    quarantined, and why the run waits. ``view`` (the ledger's, when the run is recorded) gives
    the last minute's rate, the ETA range and the lock hold; without one, the rate is the
    run's own since it started, waits left out."""
    parts: list[str] = []
    # Why the run waits comes first: on a narrow terminal the end of the line is cut off.
    if progress.state != "working":
        # Its first clause (a pause's advice is for `status`, not for a line cut short).
        reason = (progress.reason or "").split("; ")[0]
        parts.append(f"{progress.state}: {reason}" if reason else progress.state)
    if view is not None:
        parts += [_rate(view.rows_per_second), eta_text(_now_at(view, progress))]
    else:
        working = progress.elapsed_s - progress.waited_s
        if progress.done > 0 and working > 0:
            rate = progress.done / working
            left = max(0, progress.total - progress.done) / rate
            note = f", {EXCLUDES_WAITING}" if progress.state in WAITING_STATES else ""
            parts += [_rate(rate), f"ETA {duration(left)}{note}"]
    size = progress.batch_size or (view.batch_size if view is not None else None)
    if size:
        parts.append(f"batch {size:,}")
    if view is not None and view.hold_p50_ms is not None:
        parts.append(f"lock hold {_hold(view)}")
    quarantined = max(progress.quarantined, view.quarantined if view is not None else 0)
    if quarantined:
        parts.append(f"quarantined {quarantined:,}")
    return ", ".join(part for part in parts if part and part != "-")


def _now_at(view: RunView, progress: BackfillProgress) -> RunView:
    """``view`` (read up to 2 s ago) with its ETA scaled to the sessions left now."""
    if not view.remaining or view.eta_s is None:
        return view
    left = max(0, progress.total - progress.done) / view.remaining
    return dataclasses.replace(
        view,
        eta_s=view.eta_s * left,
        eta_low_s=None if view.eta_low_s is None else view.eta_low_s * left,
        eta_high_s=None if view.eta_high_s is None else view.eta_high_s * left,
    )


class _Detail(ProgressColumn):
    """The detail text, literally (a throttle reason may hold ``[``)."""

    def __init__(self, width: int) -> None:
        # One line whatever the terminal's width: cut short with an ellipsis, never wrapped (a
        # wrapped live line leaves copies of itself behind on a narrow terminal).
        super().__init__(Column(no_wrap=True, overflow="ellipsis", max_width=width))

    def render(self, task: Task) -> Text:
        text = literal(str(task.fields.get("detail", "")))
        text.no_wrap, text.overflow = True, "ellipsis"
        return text


class _Refreshing:
    """The run's view from the ledger, read again at most every REFRESH_S seconds."""

    def __init__(self, engine: Engine | None) -> None:
        self.engine = engine
        self.view: RunView | None = None
        self.read_at = 0.0
        self.failed: Exception | None = None

    def get(self, run_id: int | None) -> RunView | None:
        if self.engine is None or run_id is None:
            return None
        if self.view is None or time.monotonic() - self.read_at >= REFRESH_S:
            self.read_at = time.monotonic()
            try:
                with connect(self.engine) as connection:
                    self.view = observe(connection, run_id)
            except Exception as error:  # noqa: BLE001 - the bar must never stop the run
                self.failed = error  # and the last view read stays shown
        return self.view


@contextmanager
def backfill_progress(
    enabled: bool, engine: Engine | None = None
) -> Iterator[Callable[[BackfillProgress], None]]:
    """The backfill's progress bar on a terminal (stderr), silent otherwise or when not
    ``enabled``: done/total, rows/s, ETA range, batch size, lock hold, quarantined, and the
    controller's state and reason. With ``engine``, the figures of the run's ledger view (read
    at most every 2 s on a short connection of its own) are shown: the same as `status --watch`.
    """
    if not enabled or not sys.stderr.isatty():
        yield lambda progress: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=20),
        TaskProgressColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} sessions"),
        TimeElapsedColumn(),
        # What the other columns leave of the terminal's width (they take about 64).
        _Detail(max(16, stderr.width - 64)),
    )
    refreshing = _Refreshing(engine)
    with Progress(*columns, console=stderr, transient=True) as bar:
        tasks: list[TaskID] = []

        def update(progress: BackfillProgress) -> None:
            detail = progress_detail(progress, refreshing.get(progress.run_id))
            if not tasks:
                tasks.append(
                    bar.add_task(
                        "backfill", total=progress.total, completed=progress.done, detail=detail
                    )
                )
            bar.update(tasks[0], completed=progress.done, total=progress.total, detail=detail)

        yield update
