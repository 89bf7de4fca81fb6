"""`orch-migrate backfill`: every legacy text becomes a template reference that renders it back
byte for byte; idempotent, resumable after SIGKILL, guarded, safe under concurrent writes."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text, update

from prompt_tool.db.models import OrchestrationSession, Prompt, SessionPromptRef
from prompt_tool.migrate.backfill import BackfillBusyError, BackfillOptions, backfill
from prompt_tool.migrate.verify import verify


def _state(engine: Engine) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Everything a backfill writes, in a comparable form."""
    with engine.connect() as connection:
        references = connection.execute(
            text(
                "SELECT r.session_id, r.role, r.legacy_hash, v.content, p.name "
                "FROM session_prompt_refs r JOIN prompt_versions v ON v.id = r.prompt_version_id "
                "JOIN prompts p ON p.id = v.prompt_id ORDER BY r.session_id, r.role"
            )
        ).all()
        templates = connection.execute(
            text(
                "SELECT p.project_id, p.name, count(v.id) FROM prompts p "
                "JOIN prompt_versions v ON v.prompt_id = p.id "
                "WHERE p.name LIKE 'imported/%' GROUP BY p.project_id, p.name "
                "ORDER BY p.project_id, p.name"
            )
        ).all()
    return [tuple(r) for r in references], [tuple(t) for t in templates]


def unlink_everything(engine: Engine) -> None:
    """Undo every backfill: references, and the templates it imported."""
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM session_prompt_refs"))
        connection.execute(text("DELETE FROM template_labels"))
        connection.execute(
            text(
                "DELETE FROM prompt_versions WHERE prompt_id IN "
                "(SELECT id FROM prompts WHERE name LIKE 'imported/%')"
            )
        )
        connection.execute(text("DELETE FROM prompts WHERE name LIKE 'imported/%'"))


def test_backfill_links_every_text_and_the_templates_give_it_back_byte_for_byte(
    legacy_engine: Engine,
) -> None:
    summary = backfill(legacy_engine, BackfillOptions(batch_size=97))
    assert summary.sessions_scanned == 600
    assert summary.references_created > 1500
    report = verify(legacy_engine)
    assert report.passed, report.mismatches
    totals = report.totals()
    assert totals.matched == totals.checked == summary.references_created


def test_null_stays_null_and_an_empty_string_is_a_real_text(legacy_engine: Engine) -> None:
    backfill(legacy_engine)
    with legacy_engine.connect() as connection:
        linked_nulls = connection.execute(
            text(
                "SELECT count(*) FROM session_prompt_refs r JOIN orchestration_sessions s "
                "ON s.id = r.session_id WHERE r.role = 'planner' AND s.planner_prompt IS NULL"
            )
        ).scalar_one()
        empty_linked = connection.execute(
            text(
                "SELECT count(*) FROM session_prompt_refs r JOIN orchestration_sessions s "
                "ON s.id = r.session_id WHERE r.role = 'system' AND s.system_prompt = ''"
            )
        ).scalar_one()
    assert linked_nulls == 0
    assert empty_linked > 0


def test_texts_are_deduplicated_into_one_template_per_project_role_and_text(
    legacy_engine: Engine,
) -> None:
    backfill(legacy_engine)
    with legacy_engine.connect() as connection:
        distinct_texts = connection.execute(
            text(
                "SELECT count(*) FROM (SELECT DISTINCT project_id, planner_prompt "
                "FROM orchestration_sessions WHERE planner_prompt IS NOT NULL) t"
            )
        ).scalar_one()
        planner_templates = connection.execute(
            text("SELECT count(*) FROM prompts WHERE name LIKE 'imported/planner/%'")
        ).scalar_one()
    assert planner_templates == distinct_texts


def test_a_second_run_changes_nothing_and_says_so(legacy_engine: Engine) -> None:
    backfill(legacy_engine)
    before = _state(legacy_engine)
    again = backfill(legacy_engine)
    assert not again.changed
    assert "nothing to do" in again.describe()
    assert _state(legacy_engine) == before


def test_dry_run_reports_and_writes_nothing(legacy_engine: Engine) -> None:
    planned = backfill(legacy_engine, BackfillOptions(dry_run=True))
    assert planned.references_created > 0 and planned.templates_created > 0
    assert _state(legacy_engine) == ([], [])
    done = backfill(legacy_engine)
    assert (done.references_created, done.templates_created) == (
        planned.references_created,
        planned.templates_created,
    )


def test_a_legacy_text_changed_after_backfill_is_relinked_next_run(legacy_engine: Engine) -> None:
    backfill(legacy_engine)
    with legacy_engine.begin() as connection:
        connection.execute(
            update(OrchestrationSession)
            .where(OrchestrationSession.id == 7)
            .values(planner_prompt="rewritten {{ by }} an old app", system_prompt=None)
        )
    assert verify(legacy_engine).totals().stale == 2
    again = backfill(legacy_engine)
    assert (again.references_relinked, again.references_removed) == (1, 1)
    assert verify(legacy_engine).passed


def test_project_and_limit_select_what_is_backfilled(legacy_engine: Engine) -> None:
    summary = backfill(legacy_engine, BackfillOptions(projects=["project-2"], limit=50))
    assert summary.sessions_scanned == 50
    with legacy_engine.connect() as connection:
        projects = (
            connection.execute(
                text(
                    "SELECT DISTINCT s.project_id FROM session_prompt_refs r "
                    "JOIN orchestration_sessions s ON s.id = r.session_id"
                )
            )
            .scalars()
            .all()
        )
        project_2 = connection.execute(
            text("SELECT id FROM projects WHERE slug = 'project-2'")
        ).scalar_one()
    assert projects == [project_2]


def test_unknown_project_is_refused(legacy_engine: Engine) -> None:
    with pytest.raises(Exception, match="no project with slug 'nope'"):
        backfill(legacy_engine, BackfillOptions(projects=["nope"]))


def test_writes_from_another_connection_during_the_run_are_handled(
    legacy_engine: Engine,
) -> None:
    from prompt_tool.compat import create_session
    from prompt_tool.db.models import Scope
    from prompt_tool.templates import TemplateAddress, TemplateManager

    manager = TemplateManager(legacy_engine)
    manager.grant("root", "root", "admin", None)
    manager.create(TemplateAddress("plan", Scope.GLOBAL), "plan {{ x }}", actor="root")
    created: list[int] = []

    def meanwhile(progress: Any) -> None:
        if progress.batches == 2:
            created.append(
                create_session(
                    manager, "project-1", {"planner": "plan"}, {"x": 1}, name="new"
                ).session_id
            )
            with legacy_engine.begin() as connection:
                connection.execute(
                    update(OrchestrationSession)
                    .where(OrchestrationSession.id == 3)
                    .values(synthesis_prompt="changed while the backfill ran")
                )

    backfill(legacy_engine, BackfillOptions(batch_size=100), progress=meanwhile)
    report = verify(legacy_engine)
    # Session 3, edited after its batch: stale (or unmigrated, had the role been NULL).
    assert report.totals().stale + report.totals().unmigrated == 1
    assert report.totals().mismatched == 0
    backfill(legacy_engine)
    assert verify(legacy_engine).passed
    with legacy_engine.connect() as connection:
        source = connection.execute(
            select(SessionPromptRef.source).where(SessionPromptRef.session_id == created[0])
        ).scalar_one()
    assert source == "dual_write"  # newer than the run's bound: left to the dual write


@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgresql"], indirect=True)
def test_a_second_concurrent_run_exits_with_a_clear_message_or_waits(
    legacy_engine: Engine,
) -> None:
    from prompt_tool.migrate.backfill.command import _lock_key

    with legacy_engine.connect() as holder:
        project_ids = holder.execute(text("SELECT id FROM projects ORDER BY id")).scalars().all()
        holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _lock_key(project_ids[1])})
        holder.commit()
        with pytest.raises(
            BackfillBusyError,
            match="another backfill is running for project project-2",
        ):
            backfill(legacy_engine)

        outcome: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: outcome.setdefault(
                "summary", backfill(legacy_engine, BackfillOptions(wait=True))
            )
        )
        worker.start()
        # Wait until the second run is queued on the lock (a condition, not a fixed sleep).
        with legacy_engine.connect() as observer:
            while not observer.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            ).scalar_one():
                observer.rollback()
        holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _lock_key(project_ids[1])})
        holder.commit()
        worker.join(timeout=60)
    assert outcome["summary"].sessions_scanned == 600


KILLER = """
import os, signal, sys
from sqlalchemy import event
from prompt_tool.db.engine import make_engine
from prompt_tool.migrate.backfill import BackfillOptions, backfill

engine = make_engine(sys.argv[1])
kill_at = int(sys.argv[2])
count = [0]

@event.listens_for(engine, "after_cursor_execute")
def maybe_die(*args):
    count[0] += 1
    if count[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

backfill(engine, BackfillOptions(batch_size=50))
"""


@pytest.mark.parametrize("kill_at", [7, 19, 33, 52])
def test_a_run_killed_at_any_point_ends_like_an_uninterrupted_one(
    legacy_url: str, legacy_engine: Engine, kill_at: int, tmp_path: Any
) -> None:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    died = subprocess.run(
        [sys.executable, str(script), legacy_url, str(kill_at)], capture_output=True, check=False
    )
    assert died.returncode == -signal.SIGKILL, died.stderr.decode()[-2000:]

    resumed = backfill(legacy_engine, BackfillOptions(batch_size=50))
    state = _state(legacy_engine)

    assert verify(legacy_engine).passed
    with legacy_engine.connect() as connection:
        imported = connection.execute(
            select(func.count()).select_from(Prompt).where(Prompt.name.like("imported/%"))
        ).scalar_one()
    assert imported == len(state[1])  # no duplicate templates
    assert all(count == 1 for *_, count in state[1])
    assert resumed.sessions_scanned <= 600
    assert not backfill(legacy_engine).changed


def test_uninterrupted_and_resumed_runs_end_in_the_same_state(
    empty_db_url: str, engine_for: Any, tmp_path: Any
) -> None:
    from prompt_tool.db import schema
    from prompt_tool.migrate import load_legacy_sample

    url_a, engine_a = empty_db_url, engine_for(empty_db_url)
    schema.upgrade(url_a, "0001")
    load_legacy_sample(url_a, sessions=300, projects=2, seed=9)
    schema.upgrade(url_a)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    subprocess.run([sys.executable, str(script), url_a, "31"], capture_output=True, check=False)
    backfill(engine_a, BackfillOptions(batch_size=50))
    resumed = _state(engine_a)

    # The same data, backfilled in one go, gives the same references and templates.
    unlink_everything(engine_a)
    backfill(engine_a, BackfillOptions(batch_size=1000))
    assert _state(engine_a) == resumed
