"""What every command shares: the common options, output as a table or JSON, and the one place
where errors become a one-line message and an exit code."""

from __future__ import annotations

import dataclasses
import functools
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from datetime import date, datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from prompt_tool.errors import InvalidInputError, PromptToolError
from prompt_tool.settings import get_settings

__all__ = [
    "AsOption",
    "DbOption",
    "JsonOption",
    "VarOption",
    "VarsFileOption",
    "acting_user",
    "emit",
    "errors_mapped",
    "fail",
    "new_app",
    "parse_variables",
    "run",
    "table",
]

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        metavar="URL",
        help="Database URL (default: $PROMPT_TOOL_DATABASE_URL, else sqlite:///prompt_tool.db).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)

# SQLite and PostgreSQL say "no such table" / "undefined table" when the schema is behind.
_MISSING_SCHEMA_MARKERS = ("no such table", "undefinedtable", "does not exist", "no such column")
# Checked first: 'database "x" does not exist' is a connection failure, not a missing table.
_CONNECTION_MARKERS = ("connection failed", "connection to server", "could not connect")


class _App(typer.Typer):
    """A Typer app whose every command maps errors the same way (see :func:`errors_mapped`)."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
        register = super().command(*args, **kwargs)

        def decorator(function: Callable[..., Any]) -> Any:
            register(errors_mapped(function))
            return function

        return decorator


AsOption = Annotated[
    str | None,
    typer.Option(
        "--as", metavar="USER", help="Act as USER (default: $PROMPT_TOOL_USER, else you)."
    ),
]
VarOption = Annotated[
    list[str] | None,
    typer.Option("--var", metavar="KEY=VALUE", help="A string variable (repeatable)."),
]
VarsFileOption = Annotated[
    Path | None, typer.Option("--vars-file", metavar="FILE", help="Variables from a JSON object.")
]


def acting_user(as_user: str | None) -> str:
    """Who a command acts as: --as, else PROMPT_TOOL_USER, else the operating-system user."""
    return as_user or get_settings().user or getpass.getuser()


def parse_variables(pairs: list[str] | None, vars_file: Path | None) -> dict[str, Any]:
    """``--vars-file`` (a JSON object) overlaid with ``--var KEY=VALUE`` pairs (strings)."""
    variables: dict[str, Any] = {}
    if vars_file is not None:
        try:
            loaded = json.loads(vars_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidInputError(f"no variables file at {vars_file}") from None
        except ValueError as error:
            raise InvalidInputError(f"{vars_file} is not valid JSON: {error}") from None
        if not isinstance(loaded, dict):
            raise InvalidInputError(f"{vars_file} must hold a JSON object of variables")
        variables.update(loaded)
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"--var {pair!r} must look like KEY=VALUE")
        variables[key] = value
    return variables


def new_app(help_text: str) -> typer.Typer:
    return _App(
        help=help_text,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    return value


def emit(data: Any, *, as_json: bool, render: Callable[[Any], Any]) -> None:
    """Print ``data``: as JSON with ``--json``, else whatever ``render`` builds (text or table).

    Both come from the same value, so ``--json`` never takes another code path.
    """
    if as_json:
        sys.stdout.write(json.dumps(_to_jsonable(data), indent=2, ensure_ascii=False) + "\n")
        return
    stdout.print(render(data))


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    result = Table(title=title, title_justify="left")
    for column in columns:
        result.add_column(column)
    for row in rows:
        result.add_row(*("" if cell is None else str(cell) for cell in row))
    return result


def fail(message: str, exit_code: int) -> NoReturn:
    stderr.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise SystemExit(exit_code)


def _database_message(error: SQLAlchemyError) -> str:
    origin = error.orig if isinstance(error, DBAPIError) else error
    first_line = (
        str(origin).strip().splitlines()[0] if str(origin).strip() else type(error).__name__
    )
    if any(marker in first_line.lower() for marker in _CONNECTION_MARKERS):
        return (
            f"cannot connect to the database ({first_line}); check the URL given with --db or "
            "PROMPT_TOOL_DATABASE_URL, that the server is running and that the database exists"
        )
    if any(marker in first_line.lower() for marker in _MISSING_SCHEMA_MARKERS):
        return (
            f"the database schema is not what this command needs ({first_line}); "
            "run `orch-migrate db upgrade` first"
        )
    return f"database error: {first_line}"


def errors_mapped(function: Callable[..., Any]) -> Callable[..., Any]:
    """The one place errors become a one-line message and an exit code.

    0 ok, 1 a check or render failed, 2 bad input or configuration; never a traceback for
    anything the user can fix.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except PromptToolError as error:
            fail(str(error), error.exit_code)
        except SQLAlchemyError as error:
            if get_settings().debug:
                raise
            fail(_database_message(error), 2)
        except KeyboardInterrupt:
            fail("interrupted; nothing half-written is left behind, run the command again", 130)

    return wrapper


def run(app: typer.Typer) -> None:
    """Run ``app``; errors raised outside a command (option parsing) are mapped here too."""
    try:
        app()
    except PromptToolError as error:
        fail(str(error), error.exit_code)
    except SQLAlchemyError as error:
        if get_settings().debug:
            raise
        fail(_database_message(error), 2)
    except KeyboardInterrupt:
        fail("interrupted; nothing half-written is left behind, run the command again", 130)
    except OSError as error:
        if get_settings().debug:
            raise
        fail(f"{error.strerror or error}: {error.filename or ''}".rstrip(": "), 2)
