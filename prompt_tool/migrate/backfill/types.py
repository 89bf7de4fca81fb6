"""What a backfill run is made of: its options, the scope it walks, the one frozen object every
step of the walk is handed (:class:`BackfillRun`), and the figures it reports."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, select, true

from prompt_tool.db.engine import Connectable
from prompt_tool.db.models import MigrationQuarantine, OrchestrationSession, PromptRole
from prompt_tool.db.projects import projects_by_slug
from prompt_tool.errors import InvalidInputError
from prompt_tool.migrate.matching import ExistingTemplateMatcher
from prompt_tool.settings import HealthLimits, Settings

__all__ = [
    "QUARANTINED_SCOPE",
    "UNREADABLE_NAMED",
    "BackfillOptions",
    "BackfillProgress",
    "BackfillRun",
    "BackfillScope",
    "BackfillSummary",
    "BatchNotes",
    "BatchResult",
    "PlannedBatch",
    "RunWindow",
    "TextKey",
    "application_name",
    "unreadable_name",
]

TextKey = tuple[int, str, str]  # (project id, role, sha256 of the legacy text)
QUARANTINED_SCOPE = "+quarantined"  # how a --retry-quarantined run's scope key ends
UNREADABLE_NAMED = 10  # unreadable legacy texts a summary names (all are counted)
_SESSIONS = OrchestrationSession.__table__


@dataclass(frozen=True, slots=True)
class BackfillOptions:
    projects: Sequence[str] = ()
    batch_size: int = 1000
    sleep_ms: int = 0
    limit: int | None = None
    dry_run: bool = False
    wait: bool = False
    # Link to an existing template version that renders the legacy text before importing it.
    match_existing: bool = False
    max_retries: int = 5
    # The batch size adapts so one batch's transaction stays near this (see walk.next_batch_size).
    target_batch_ms: int = 200
    # Processes sharing the run (PostgreSQL; SQLite has one writer and uses one): see workers.
    workers: int = 1
    # The steered batch size never goes below this (nor above batch_size): see steering.
    min_batch_size: int = 50
    # Health signals (see health): limits (None: settings.backfill_health); all off when False.
    health: HealthLimits | None = None
    health_checks: bool = True
    # SQL returning true while the run should wait (the operator's own signal).
    throttle_query: str | None = None
    # The hours the run may work, local time, e.g. "22:00-06:00"; outside them it waits.
    window: RunWindow | None = None
    # Rows that cannot be imported are quarantined; past this many the run stops.
    max_errors: int = 100
    # Walk only the quarantined sessions of the scope, again.
    retry_quarantined: bool = False
    # Prometheus text file, rewritten atomically every few seconds (node_exporter textfile).
    metrics_file: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise InvalidInputError("--workers must be at least 1")
        if self.batch_size < 1:
            raise InvalidInputError("--batch-size must be at least 1")
        if self.sleep_ms < 0 or (self.limit is not None and self.limit < 1):
            raise InvalidInputError("--sleep-ms must be >= 0 and --limit >= 1")
        if self.target_batch_ms < 1 or self.min_batch_size < 1 or self.max_errors < 0:
            raise InvalidInputError(
                "--target-ms and --min-batch-size must be at least 1, --max-errors at least 0"
            )

    @property
    def smallest_batch(self) -> int:
        """The lower bound of the steered batch size (never above --batch-size)."""
        return min(self.min_batch_size, self.batch_size)


@dataclass(frozen=True, slots=True)
class RunWindow:
    """The hours of the day (local time) a run may work: ``22:00-06:00`` spans midnight."""

    start_minute: int
    end_minute: int

    @classmethod
    def parse(cls, text: str) -> RunWindow:
        """``HH:MM-HH:MM``; anything else is refused in one line."""
        try:
            start, end = (part.strip() for part in text.split("-"))
            minutes = [_minute_of_day(start), _minute_of_day(end)]
        except ValueError:
            raise InvalidInputError(
                f"--window {text!r} is not HH:MM-HH:MM (local time, e.g. 22:00-06:00)"
            ) from None
        if minutes[0] == minutes[1]:
            raise InvalidInputError(
                f"--window {text!r} is empty: its start and end are the same time"
            )
        return cls(minutes[0], minutes[1])

    def contains(self, minute_of_day: int) -> bool:
        if self.start_minute < self.end_minute:
            return self.start_minute <= minute_of_day < self.end_minute
        return minute_of_day >= self.start_minute or minute_of_day < self.end_minute

    def __str__(self) -> str:
        return f"{_clock(self.start_minute)}-{_clock(self.end_minute)}"


def _minute_of_day(clock: str) -> int:
    hours, minutes = clock.split(":")
    if not (hours.isdigit() and minutes.isdigit() and len(minutes) == 2):
        raise ValueError(clock)
    if int(hours) > 23 or int(minutes) > 59:
        raise ValueError(clock)
    return int(hours) * 60 + int(minutes)


def _clock(minute_of_day: int) -> str:
    return f"{minute_of_day // 60:02d}:{minute_of_day % 60:02d}"


@dataclass(frozen=True, slots=True)
class BackfillProgress:
    done: int
    total: int
    batches: int
    elapsed_s: float
    # What the run's controller is doing: "working", "throttled", "paused", "outside window",
    # "cancelling"; and why, when it waits (the signal and its value).
    state: str = "working"
    reason: str | None = None
    batch_size: int = 0
    run_id: int | None = None
    waited_s: float = 0.0  # all the time the run waited so far (left out of rates and ETAs)
    quarantined: int = 0


@dataclass(frozen=True, slots=True)
class BackfillScope:
    """The projects a run walks: ``projects`` (id -> slug), every project when not ``scoped``."""

    projects: Mapping[int, str]
    scoped: bool
    # --retry-quarantined: only the scope's sessions in the quarantine (see quarantine).
    quarantined_only: bool = False

    @classmethod
    def of(cls, connection: Connection, options: BackfillOptions) -> BackfillScope:
        """The scope ``options`` select (unknown project slugs are refused in one line)."""
        return cls(
            projects_by_slug(connection, options.projects),
            bool(options.projects),
            quarantined_only=options.retry_quarantined,
        )

    @property
    def project_ids(self) -> list[int]:
        return list(self.projects)

    @property
    def slugs(self) -> list[str]:
        return sorted(self.projects.values())

    @property
    def key(self) -> str:
        """How the ledger names the scope: a run resumes the last run of the same key."""
        key = ",".join(self.slugs) if self.scoped else "*"
        # A retry of the quarantine resumes only a retry: its checkpoints skip other sessions.
        return key + QUARANTINED_SCOPE if self.quarantined_only else key

    def sessions(self) -> ColumnElement[bool]:
        """The condition on ``orchestration_sessions`` that keeps the scope's sessions."""
        kept = _SESSIONS.c.project_id.in_(self.project_ids) if self.scoped else true()
        if self.quarantined_only:
            return and_(kept, _SESSIONS.c.id.in_(select(MigrationQuarantine.session_id)))
        return kept


@dataclass
class BatchResult:
    """What one batch found and did: the figures its ledger row records."""

    last_id: int
    sessions: int
    created: int = 0
    matched: int = 0
    relinked: int = 0
    removed: int = 0
    unchanged: int = 0
    templates: int = 0
    unreadable_rows: list[tuple[int, str]] = field(default_factory=list)  # (session, role)
    quarantined: int = 0  # (session, role) rows newly quarantined by this batch
    # What the controller records with the batch, read when the ledger row is written.
    notes: BatchNotes | None = None


@dataclass
class BatchNotes:
    """What the run's controller records with the batch in flight (``migration_batches.counts``):
    the size it asked for and why, the retries and backoff it took, and how long the run waited
    (throttled, paused, outside its window) before it."""

    size: int = 0
    adjust: str = "first"  # what made this size: first, grow, shrink, hold, timeout
    retries: int = 0
    backoff_ms: float = 0.0
    waited_ms: float = 0.0
    began: float = field(default_factory=time.perf_counter)  # the attempt's transaction start

    def as_counts(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "adjust": self.adjust,
            "retries": self.retries,
            "backoff_ms": round(self.backoff_ms, 1),
            "waited_ms": round(self.waited_ms, 1),
            "hold_ms": round((time.perf_counter() - self.began) * 1000, 1),
        }


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    """A planned batch (its ledger row) claimed by one worker for one transaction."""

    batch_id: int
    worker: str
    run_id: int
    key_hi: int  # the end of its range (a smaller batch leaves the rest pending)


def application_name(run_id: int | None) -> str:
    """How a run's connections name themselves to the server (``pg_stat_activity``): how the
    health check finds the sessions blocked behind the run."""
    return f"orch-migrate backfill {run_id if run_id is not None else 'dry run'}"


def unreadable_name(session_id: int, role: str) -> str:
    """How a summary names an unreadable legacy text: table, id and column."""
    return f"{OrchestrationSession.__tablename__} id {session_id} {PromptRole(role).legacy_column}"


@dataclass
class BackfillSummary:
    run_id: int | None
    dry_run: bool
    projects: list[str]
    key_upper_bound: int
    resumed_after: int | None = None
    batches: int = 0
    sessions_scanned: int = 0
    references_created: int = 0
    references_matched: int = 0
    references_relinked: int = 0
    references_removed: int = 0
    references_unchanged: int = 0
    templates_created: int = 0
    templates_adopted: int = 0
    retried: int = 0
    elapsed_s: float = 0.0
    workers: int = 1
    batch_seconds: list[float] = field(default_factory=list, repr=False)
    # Tables analysed before the walk: the planner had no statistics, or stale ones.
    statistics_refreshed: list[str] = field(default_factory=list)
    # Exit codes of --workers processes that died; the run finished their batches itself.
    workers_lost: list[int] = field(default_factory=list)
    # Legacy texts that are not valid UTF-8: left as they are, on the legacy path, not linked.
    unreadable: int = 0
    unreadable_rows: list[str] = field(default_factory=list)  # the first few, named
    # (session, role) rows this run newly quarantined: not importable, left on the legacy path.
    quarantined: int = 0
    total: int = 0  # sessions the run set out to walk
    # The controller: the batch size it settled on, the time it waited and why, who cancelled.
    batch_size: int = 0
    waited_s: float = 0.0
    waited_for: list[str] = field(default_factory=list)  # each distinct reason, first seen
    cancelled_by: str | None = None
    # Health signals the run could not read (a missing privilege), each in one line.
    health_problems: list[str] = field(default_factory=list)
    # Why the checkpoint of the run it resumes was not trusted (it started over instead).
    restarted: str | None = None

    @property
    def changed(self) -> bool:
        return bool(
            self.references_created
            or self.references_relinked
            or self.references_removed
            or self.templates_created
            or self.templates_adopted
        )

    def add(self, result: BatchResult) -> None:
        """Count one batch of this process's walk in."""
        self.batches += 1
        self.sessions_scanned += result.sessions
        self.references_created += result.created
        self.references_matched += result.matched
        self.references_relinked += result.relinked
        self.references_removed += result.removed
        self.references_unchanged += result.unchanged
        self.templates_created += result.templates
        self.quarantined += result.quarantined
        self.note_unreadable(len(result.unreadable_rows), result.unreadable_rows)

    def note_unreadable(self, count: int, rows: Sequence[Sequence[Any]]) -> None:
        """Add a batch's unreadable legacy texts (the first few by name)."""
        self.unreadable += count
        for session_id, role in rows:
            if len(self.unreadable_rows) < UNREADABLE_NAMED:
                self.unreadable_rows.append(unreadable_name(int(session_id), str(role)))

    def describe(self) -> str:
        refreshed = (
            f"; planner statistics refreshed first ({', '.join(self.statistics_refreshed)})"
            if self.statistics_refreshed
            else ""
        )
        lost = (
            f"; {len(self.workers_lost)} of {self.workers} workers ended early (exit "
            f"{', '.join(map(str, self.workers_lost))}), their batches were finished by this one"
            if self.workers_lost
            else ""
        )
        return (
            self._describe_changes()
            + self._describe_unreadable()
            + self._describe_quarantined()
            + refreshed
            + lost
            + self._describe_control()
        )

    def _describe_control(self) -> str:
        parts = list(self.health_problems)
        if self.restarted:
            parts.append(self.restarted)
        if self.waited_s >= 0.05:
            why = f" ({'; '.join(self.waited_for[:3])})" if self.waited_for else ""
            parts.append(f"waited {self.waited_s:.1f}s{why}")
        if self.cancelled_by:
            parts.append(
                f"cancelled by {self.cancelled_by}: what is committed stands and the next run "
                "carries on from it"
            )
        return "".join(f"; {part}" for part in parts)

    def _describe_quarantined(self) -> str:
        if not self.quarantined:
            return ""
        rows = "row" if self.quarantined == 1 else "rows"
        return f"; {self.quarantined:,} {rows} quarantined (see `orch-migrate status`)"

    def _describe_unreadable(self) -> str:
        if not self.unreadable:
            return ""
        shown = ", ".join(self.unreadable_rows)
        more = ", ..." if self.unreadable > len(self.unreadable_rows) else ""
        texts = "legacy text" if self.unreadable == 1 else "legacy texts"
        return (
            f"; {self.unreadable:,} {texts} unreadable (not valid UTF-8), left unchanged on "
            f"the legacy path and not linked: {shown}{more}; fix their bytes and run backfill "
            "again to link them"
        )

    def _describe_changes(self) -> str:
        verb = "would change" if self.dry_run else "changed"
        if not self.changed:
            return (
                f"backfill: nothing to do; {self.sessions_scanned:,} sessions already linked "
                f"({self.batches} batches, {self.elapsed_s:.1f}s)"
            )
        return (
            f"backfill {verb}: {self.references_created:,} references created"
            + (
                f" ({self.references_matched:,} to existing templates)"
                if self.references_matched
                else ""
            )
            + ", "
            f"{self.references_relinked:,} re-linked (stale), {self.references_removed:,} removed, "
            f"{self.templates_created:,} templates imported"
            + (
                f" ({self.templates_adopted:,} left by a downgrade taken back)"
                if self.templates_adopted
                else ""
            )
            + f"; {self.sessions_scanned:,} sessions in "
            f"{self.batches} batches, {self.retried} retries, {self.elapsed_s:.1f}s"
        )


@dataclass(frozen=True, slots=True)
class BackfillRun:
    """One run as every step of its walk sees it, instead of a dozen threaded parameters.

    Frozen: what changes as the run goes lives in objects of their own, the ``summary`` (its
    figures) and ``dry_run_seen``. A worker process builds its own from the planning process's
    configuration.
    """

    engine: Connectable  # its lock and statement waits bounded by ``settings``
    settings: Settings
    options: BackfillOptions
    scope: BackfillScope
    run_id: int | None  # None: a dry run, recorded nowhere
    summary: BackfillSummary
    after: int = 0  # the walk starts after this key: 0, or a resumed run's last checkpoint
    upper: int = 0  # and ends at this one, fixed when the run started (newer are dual-written)
    total: int = 0  # sessions to walk, what progress is shown against
    started: float = field(default_factory=time.monotonic)
    progress: Callable[[BackfillProgress], None] | None = None
    matcher: ExistingTemplateMatcher | None = None
    # The pending ranges of an interrupted planned run (--workers), carried on by this one.
    carried: tuple[tuple[int, int], ...] = ()
    # Texts a dry run counted as imports: later batches see them missing again, count them once.
    dry_run_seen: set[TextKey] = field(default_factory=set)
    # The controller's record of the batch in flight (this process's).
    notes: BatchNotes = field(default_factory=BatchNotes)
