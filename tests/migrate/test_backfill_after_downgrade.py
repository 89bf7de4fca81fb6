"""A downgrade keeps the rows the backfill imported; the backfill after the next upgrade takes
them back instead of importing every text again, so round trips do not grow `prompts`."""

from __future__ import annotations

from sqlalchemy import Engine, func, select

from prompt_tool.db import schema
from prompt_tool.db.models import Prompt
from prompt_tool.migrate.backfill import BackfillOptions, backfill
from prompt_tool.migrate.verify import verify


def _prompts(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(Prompt)).scalar_one()


def _round_trip(url: str, engine: Engine) -> None:
    engine.dispose()
    schema.downgrade(url, "-1")
    schema.upgrade(url)


def test_the_backfill_after_a_round_trip_adopts_what_it_imported(
    legacy_url: str, legacy_engine: Engine
) -> None:
    first = backfill(legacy_engine)
    prompts = _prompts(legacy_engine)
    _round_trip(legacy_url, legacy_engine)

    again = backfill(legacy_engine, BackfillOptions(batch_size=113))

    assert again.templates_adopted == first.templates_created > 0
    assert again.templates_created == 0
    assert again.references_created == first.references_created
    assert _prompts(legacy_engine) == prompts
    assert verify(legacy_engine).passed
    assert "taken back" in again.describe()


def test_a_dry_run_counts_the_adoptions_and_writes_nothing(
    legacy_url: str, legacy_engine: Engine
) -> None:
    first = backfill(legacy_engine)
    _round_trip(legacy_url, legacy_engine)

    dry = backfill(legacy_engine, BackfillOptions(dry_run=True))
    real = backfill(legacy_engine)

    assert dry.templates_adopted == real.templates_adopted == first.templates_created
    assert dry.templates_created == 0


def test_a_project_scoped_run_adopts_only_that_projects_rows(
    legacy_url: str, legacy_engine: Engine
) -> None:
    backfill(legacy_engine)
    _round_trip(legacy_url, legacy_engine)

    one = backfill(legacy_engine, BackfillOptions(projects=["project-2"]))
    rest = backfill(legacy_engine)

    assert one.templates_adopted > 0 and rest.templates_adopted > 0
    assert one.templates_created == rest.templates_created == 0
