"""A downgrade takes back the rows the backfill imported, so the backfill after the next upgrade
imports them again and round trips never grow `prompts`. Deployments downgraded by an older
prompt-tool still hold those rows as plain legacy prompts: the backfill takes them back instead
of importing every text again."""

from __future__ import annotations

from sqlalchemy import Engine, func, select, text

from prompt_tool.db import schema
from prompt_tool.db.models import Prompt
from prompt_tool.db.revisions import BASELINE
from prompt_tool.migrate.backfill import BackfillOptions, backfill
from prompt_tool.migrate.verify import verify

_OLD_LEFTOVERS = {
    "prompts": ("id", "project_id", "name", "content", "category", "is_template"),
    "prompt_versions": ("id", "prompt_id", "version", "content", "created_by", "change_note"),
}


def _prompts(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(Prompt)).scalar_one()


def _round_trip(url: str, engine: Engine) -> None:
    """Downgrade and upgrade as an older prompt-tool did: imported rows left as legacy rows."""
    with engine.connect() as connection:
        kept = {
            table: connection.execute(
                text(
                    f"SELECT {', '.join(columns)} FROM {table} WHERE "
                    + (
                        "category = 'imported'"
                        if table == "prompts"
                        else "prompt_id IN (SELECT id FROM prompts WHERE category = 'imported')"
                    )
                )
            ).all()
            for table, columns in _OLD_LEFTOVERS.items()
        }
    engine.dispose()
    schema.downgrade(url, BASELINE)
    with engine.begin() as connection:
        for table, columns in _OLD_LEFTOVERS.items():
            connection.execute(
                text(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                    f"({', '.join(':' + c for c in columns)})"
                ),
                [dict(zip(columns, row, strict=True)) for row in kept[table]],
            )
    engine.dispose()
    schema.upgrade(url)


def test_a_round_trip_takes_the_imported_rows_back_and_the_next_backfill_makes_them_again(
    legacy_url: str, legacy_engine: Engine
) -> None:
    before = _prompts(legacy_engine)
    first = backfill(legacy_engine)
    legacy_engine.dispose()
    schema.downgrade(legacy_url, BASELINE)
    assert _prompts(legacy_engine) == before
    schema.upgrade(legacy_url)

    again = backfill(legacy_engine)

    assert again.templates_created == first.templates_created > 0
    assert again.references_created == first.references_created
    assert _prompts(legacy_engine) == before + first.templates_created
    assert verify(legacy_engine).passed


def test_the_backfill_takes_back_what_an_older_downgrade_left_behind(
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
