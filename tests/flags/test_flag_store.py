"""The flag's stored state: set, unset, default, list, and the audit trail of every change."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select

from prompt_tool import flags
from prompt_tool.db.engine import make_session_factory, session_scope
from prompt_tool.db.models import FeatureFlagEvent, FeatureFlagState, Project
from prompt_tool.errors import InvalidInputError, NotFoundError, PromptToolError
from prompt_tool.flags import DecisionSource, Variant


def _rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(FeatureFlagState)) or 0)


def _events(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(FeatureFlagEvent)) or 0)


def test_a_project_override_is_read_back_as_its_effective_variant(db: Engine) -> None:
    change = flags.set_variant(db, "acme", "templates", actor="alice")

    assert change.changed
    assert (change.old_variant, change.new_variant) == (None, "templates")
    status = flags.get_variant(db, "acme")
    assert status.variant is Variant.TEMPLATES
    assert status.source is DecisionSource.OVERRIDE
    assert status.override is not None and status.override.updated_by == "alice"


def test_projects_without_override_follow_the_default_then_builtin_legacy(db: Engine) -> None:
    assert flags.get_variant(db, "beta").source is DecisionSource.BUILTIN_DEFAULT
    assert flags.get_variant(db, "beta").variant is Variant.LEGACY

    flags.set_default(db, "shadow", actor="ops")
    flags.set_variant(db, "acme", "templates", actor="ops")

    beta = flags.get_variant(db, "beta")
    assert (beta.variant, beta.source) == (Variant.SHADOW, DecisionSource.DEFAULT)
    assert flags.get_variant(db, "acme").variant is Variant.TEMPLATES

    flags.unset_default(db, actor="ops")
    beta = flags.get_variant(db, "beta")
    assert (beta.variant, beta.source) == (Variant.LEGACY, DecisionSource.BUILTIN_DEFAULT)


def test_unsetting_an_override_returns_the_project_to_the_default(db: Engine) -> None:
    flags.set_default(db, "shadow", actor="ops")
    flags.set_variant(db, "acme", "legacy", actor="ops")

    change = flags.unset_variant(db, "acme", actor="ops")

    assert (change.old_variant, change.new_variant, change.changed) == ("legacy", None, True)
    assert flags.get_variant(db, "acme").source is DecisionSource.DEFAULT


def test_every_change_is_recorded_with_who_and_when(db: Engine) -> None:
    before = datetime.now(UTC) - timedelta(minutes=5)
    flags.set_variant(db, "acme", "shadow", actor="alice", sample_rate=0.1)
    flags.set_variant(db, "acme", "templates", actor="bob")
    flags.set_default(db, "shadow", actor="carol")
    flags.set_variant(db, "beta", "legacy", actor="dave")
    flags.unset_variant(db, "acme", actor="erin")

    history = flags.flag_history(db)
    assert [(e.project_slug, e.old_variant, e.new_variant, e.actor) for e in history] == [
        ("acme", None, "shadow", "alice"),
        ("acme", "shadow", "templates", "bob"),
        (None, None, "shadow", "carol"),
        ("beta", None, "legacy", "dave"),
        ("acme", "templates", None, "erin"),
    ]
    after = datetime.now(UTC) + timedelta(minutes=5)
    assert all(e.at is not None and before <= e.at <= after for e in history)
    assert [e.actor for e in flags.flag_history(db, "acme")] == ["alice", "bob", "erin"]
    assert [e.actor for e in flags.flag_history(db, limit=2)] == ["dave", "erin"]


def test_setting_the_same_state_again_writes_and_records_nothing(db: Engine) -> None:
    flags.set_variant(db, "acme", "shadow", actor="alice", sample_rate=0.2)

    again = flags.set_variant(db, "acme", "shadow", actor="bob")
    nothing_to_unset = flags.unset_variant(db, "beta", actor="bob")

    assert not again.changed and again.event_id is None
    assert not nothing_to_unset.changed
    assert _events(db) == 1


@pytest.mark.parametrize("variant", ["TEMPLATES", "on", "", "template"])
def test_an_unknown_variant_is_refused_naming_the_choices(db: Engine, variant: str) -> None:
    with pytest.raises(InvalidInputError) as refused:
        flags.set_variant(db, "acme", variant, actor="alice")

    assert "legacy, shadow or templates" in str(refused.value)
    assert refused.value.exit_code == 2
    assert _rows(db) == 0 and _events(db) == 0


def test_an_unknown_project_is_not_found(db: Engine) -> None:
    with pytest.raises(NotFoundError, match="no project with slug 'nope'"):
        flags.set_variant(db, "nope", "templates", actor="alice")
    with pytest.raises(NotFoundError):
        flags.get_variant(db, "nope")
    with pytest.raises(NotFoundError):
        flags.flag_history(db, "nope")


def test_the_shadow_sample_rate_is_stored_returned_by_get_and_kept(db: Engine) -> None:
    flags.set_variant(db, "acme", "shadow", actor="alice", sample_rate=0.1)
    status = flags.get_variant(db, "acme")
    assert status.sample_rate == pytest.approx(0.1)
    assert status.override is not None and status.override.shadow_sample_rate == pytest.approx(0.1)

    # Switching away and back keeps the chosen rate instead of jumping to every read.
    flags.set_variant(db, "acme", "templates", actor="alice")
    assert flags.get_variant(db, "acme").sample_rate == 0.0
    flags.set_variant(db, "acme", "shadow", actor="alice")
    assert flags.get_variant(db, "acme").sample_rate == pytest.approx(0.1)

    change = flags.set_variant(db, "acme", "shadow", actor="alice", sample_rate=0.5)
    assert change.changed and change.shadow_sample_rate == pytest.approx(0.5)
    assert flags.get_variant(db, "acme").sample_rate == pytest.approx(0.5)


def test_shadow_without_a_rate_compares_every_read(db: Engine) -> None:
    flags.set_variant(db, "acme", "shadow", actor="alice")

    assert flags.get_variant(db, "acme").sample_rate == flags.DEFAULT_SHADOW_SAMPLE_RATE == 1.0


@pytest.mark.parametrize(
    ("variant", "rate", "message"),
    [
        ("shadow", 1.5, "between 0 and 1"),
        ("shadow", -0.1, "between 0 and 1"),
        ("shadow", float("nan"), "between 0 and 1"),
        ("templates", 0.1, "only applies to the shadow variant"),
    ],
)
def test_a_bad_sample_rate_is_refused(db: Engine, variant: str, rate: float, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        flags.set_variant(db, "acme", variant, actor="alice", sample_rate=rate)
    assert _rows(db) == 0


def test_list_shows_the_default_every_override_and_projects_without_one(db: Engine) -> None:
    flags.set_default(db, "shadow", actor="ops", sample_rate=0.05)
    flags.set_variant(db, "gamma", "templates", actor="ops")
    flags.set_variant(db, "acme", "legacy", actor="ops")

    listing = flags.list_flags(db)

    assert listing.default is not None
    assert (listing.default.variant, listing.default.shadow_sample_rate) == ("shadow", 0.05)
    assert [(s.project_slug, s.variant) for s in listing.overrides] == [
        ("acme", "legacy"),
        ("gamma", "templates"),
    ]
    assert listing.without_override == ["beta"]
    assert listing.builtin_default == "legacy"
    assert not listing.kill_switch


def test_a_guard_sees_the_change_first_and_can_refuse_it(db: Engine) -> None:
    seen: list[flags.PendingChange] = []

    class NotReadyError(PromptToolError):
        pass

    def refuse_templates(change: flags.PendingChange) -> None:
        seen.append(change)
        if change.new_variant is Variant.TEMPLATES:
            raise NotReadyError("acme is not ready for templates; use --force")

    flags.set_variant(db, "acme", "shadow", actor="alice", guard=refuse_templates)
    with pytest.raises(NotReadyError):
        flags.set_variant(db, "acme", "templates", actor="alice", guard=refuse_templates)

    assert [(c.old_variant, c.new_variant) for c in seen] == [
        (None, Variant.SHADOW),
        ("shadow", Variant.TEMPLATES),
    ]
    assert seen[1].project_slug == "acme" and seen[1].actor == "alice"
    assert flags.get_variant(db, "acme").variant is Variant.SHADOW
    assert _events(db) == 1


def test_an_empty_actor_is_refused(db: Engine) -> None:
    with pytest.raises(InvalidInputError, match="--as USER"):
        flags.set_variant(db, "acme", "templates", actor="  ")


def test_two_operators_racing_on_a_new_override_both_succeed(db: Engine) -> None:
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def operator(name: str, variant: str) -> None:
        barrier.wait()
        try:
            flags.set_variant(db, "acme", variant, actor=name)
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=operator, args=("alice", "shadow")),
        threading.Thread(target=operator, args=("bob", "templates")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert _rows(db) == 1
    history = flags.flag_history(db, "acme")
    assert len(history) == 2
    assert history[0].old_variant is None
    assert history[1].old_variant == history[0].new_variant
    assert flags.get_variant(db, "acme").variant.value == history[1].new_variant


def test_deleting_a_project_takes_its_override_along(db: Engine) -> None:
    flags.set_variant(db, "acme", "templates", actor="alice")
    with session_scope(make_session_factory(db)) as session:
        session.delete(session.scalars(select(Project).where(Project.slug == "acme")).one())

    assert flags.list_flags(db).overrides == []
