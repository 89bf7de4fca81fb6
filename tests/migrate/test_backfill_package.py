"""The backfill package's shape: its modules import one another one way, a run's state travels
as one frozen object (no function takes more than six parameters), and the ledger's statuses
are enums whose values are what the ledger has always stored."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
from sqlalchemy import Engine

import prompt_tool.migrate.backfill as package
from prompt_tool.db.dialect import allows_worker_processes
from prompt_tool.migrate.backfill.ledger import BatchStatus
from prompt_tool.migrate.backfill.types import (
    BackfillOptions,
    BackfillRun,
    BackfillScope,
    BackfillSummary,
)
from prompt_tool.migrate.backfill.workers import effective_workers
from prompt_tool.settings import get_settings

_FOLDER = Path(package.__file__).parent
# Each module may import only those after it.
_LAYERS = (
    "command",
    "observe",
    "estimate",
    "workers",
    "walk",
    "steering",
    "remote",
    "health",
    "batch",
    "quarantine",
    "ledger",
    "types",
)
_MAX_PARAMETERS = 6


def _trees() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in _FOLDER.glob("*.py")}


def test_the_modules_import_one_another_one_way() -> None:
    assert set(_trees()) == {"__init__", *_LAYERS}
    for name, tree in _trees().items():
        if name == "__init__":
            continue
        below = set(_LAYERS[_LAYERS.index(name) + 1 :])
        imported = {
            node.module.rsplit(".", 1)[-1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("prompt_tool.migrate.backfill.")
        }
        assert imported <= below, f"{name} imports {sorted(imported - below)} from above it"


def test_no_function_threads_more_than_six_parameters() -> None:
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                arguments = node.args
                count = len(arguments.posonlyargs + arguments.args + arguments.kwonlyargs)
                count -= bool(arguments.args and arguments.args[0].arg in {"self", "cls"})
                assert count <= _MAX_PARAMETERS, f"{name}.{node.name} takes {count}"


def test_the_package_exports_what_its_importers_use() -> None:
    assert sorted(package.__all__) == sorted(
        [
            "IMPORTED_PREFIX",
            "BackfillBusyError",
            "BackfillOptions",
            "BackfillProgress",
            "BackfillSummary",
            "BackfillWorkerError",
            "ImportedVersions",
            "backfill",
            "imported_name",
        ]
    )
    assert inspect.isfunction(package.backfill)
    assert list(inspect.signature(package.backfill).parameters) == [
        "engine",
        "options",
        "progress",
        "settings",
    ]


def test_batch_statuses_are_the_values_the_ledger_stores() -> None:
    assert [status.value for status in BatchStatus] == ["pending", "done"]


def test_a_run_is_frozen_and_names_its_scope(legacy_engine: Engine) -> None:
    scope = BackfillScope({2: "project-2", 1: "project-1"}, scoped=True)
    run = BackfillRun(
        legacy_engine,
        get_settings(),
        BackfillOptions(),
        scope,
        None,
        BackfillSummary(None, True, scope.slugs, 0),
    )

    with pytest.raises(dataclasses.FrozenInstanceError):
        run.after = 5  # type: ignore[misc]
    assert scope.key == "project-1,project-2"
    assert BackfillScope({}, scoped=False).key == "*"
    assert run.scope.project_ids == [2, 1]


def test_workers_run_as_processes_only_where_they_can_share_writes(
    legacy_engine: Engine,
) -> None:
    shares = legacy_engine.dialect.name == "postgresql"
    assert allows_worker_processes(legacy_engine) is shares
    assert effective_workers(legacy_engine, 3) == (3 if shares else 1)
    with legacy_engine.connect() as connection:
        assert not allows_worker_processes(connection)
        assert effective_workers(connection, 3) == 1
