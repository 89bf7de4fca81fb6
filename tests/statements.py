"""The SQL an engine runs inside a block: for tests that a path costs a fixed number of
statements whatever the rows, or reads a table only when it must."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event


@contextmanager
def statements_run(engine: Engine) -> Iterator[list[str]]:
    """The statements run on ``engine`` inside the block, in order."""
    statements: list[str] = []

    def record(_connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)
