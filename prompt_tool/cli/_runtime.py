"""What every command shares: the common options, output as a table or JSON, and the one place
where errors become a one-line message and an exit code."""

from __future__ import annotations

import dataclasses
import functools
import getpass
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import date, datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from prompt_tool import __version__
from prompt_tool.core.errors import TemplateRenderError
from prompt_tool.core.variables import check_text_value, read_variables_file
from prompt_tool.db.dialect import write_refusal
from prompt_tool.db.engine import connected
from prompt_tool.db.url import resolve_url
from prompt_tool.errors import ConfigurationError, InvalidInputError, PromptToolError
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
    "literal",
    "new_app",
    "opened_engine",
    "parse_variables",
    "run",
    "table",
    "write_out",
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
# Piped output is laid out this wide (tables are only as wide as their contents).
_PIPED_WIDTH = 200
# In other columns, a word longer than this may be folded over lines where space is short.
_FOLD_BEYOND = 14
# Columns that name something (matched on the header): never wrapped, folded or cut short.
_IDENTIFYING_COLUMNS = frozenset(
    {
        "id",
        "name",
        "slug",
        "project",
        "session",
        "template",
        "table",
        "file",
        "variant",
        "control",
        "test",
        "user",
        "owner",
        "who",
        "granted by",
        "by",
        "role",
        "revision",
        "down",
        "step",
        "key",
    }
)
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
        max_bytes = get_settings().vars_file_max_bytes
        variables.update(read_variables_file(vars_file, max_bytes=max_bytes))
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"--var {pair!r} must look like KEY=VALUE")
        check_text_value(key, key)  # bytes that are not UTF-8 arrive as lone surrogates
        check_text_value(key, value)
        variables[key] = value
    return variables


def _show_version(ctx: typer.Context, value: bool) -> None:
    if value:
        # The name new_app was given, else the one the tool was started by (its console script).
        program = ctx.find_root().command.name or Path(sys.argv[0]).name
        sys.stdout.write(f"{program} {__version__}\n")
        raise typer.Exit()


VersionFlag = Annotated[
    bool,
    typer.Option(
        "--version",
        is_eager=True,
        expose_value=False,
        callback=_show_version,
        help="Show the version and exit.",
    ),
]


def _group_options(version: VersionFlag = False) -> None:
    pass


def new_app(help_text: str, *, program: str | None = None, completion: bool = False) -> typer.Typer:
    """A tool, or a group of its commands, each with ``--version`` (``orch-migrate 0.1.0``).

    ``program`` names the tool where the command line does not (``python -m prompt_tool``);
    ``completion`` (the tools, not their groups) adds shell completion (``--show-completion``).
    """
    app = _App(
        name=program,
        help=help_text,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=completion,
    )
    app.callback()(_group_options)
    return app


def opened_engine(db: str | None) -> AbstractContextManager[Engine]:
    """The engine of ``--db`` for one command, disposed (its pooled connections closed) after
    it, whatever it raised: the one place a command opens the database."""
    return connected(resolve_url(db))


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
        write_out(json.dumps(_to_jsonable(data), indent=2, ensure_ascii=False) + "\n")
        return
    shown = render(data)
    console = _output_console()
    if isinstance(shown, str):
        if not console.is_terminal:  # piped: the very characters, byte for byte
            write_out(shown + "\n")
            return
        shown = literal(shown)
    with console.capture() as captured:
        console.print(shown)
    write_out(captured.get())


# Shown as escapes on a terminal (where they would move the cursor, recolour or hide text, or
# reorder it: bidi controls), so that what is on the screen is what is stored.
_INVISIBLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def literal(text: str, style: str = "") -> Text:
    """``text`` exactly as it is, for Rich: never read as console markup (``[/INST]``,
    ``[conceal]``, ``[link=...]``) or emoji codes; control characters appear as escapes such as
    ``\\x1b`` (styled apart from the text, so that they cannot pass for it)."""
    result = Text(style=style)
    start = 0
    for match in _INVISIBLE.finditer(text):
        result.append(text[start : match.start()])
        code = ord(match.group())
        result.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}", style="reverse")
        start = match.end()
    result.append(text[start:])
    return result


def write_out(text: str) -> None:
    """Write ``text`` to stdout whole, or nothing and one line: it holds a lone surrogate (not
    text at all: exit 1), or a character stdout's encoding cannot represent (exit 2)."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except UnicodeEncodeError as error:
        bad = text[error.start]
        where = f"(U+{ord(bad):04X}, character {error.start + 1} of the output)"
        if 0xD800 <= ord(bad) <= 0xDFFF:
            raise TemplateRenderError(
                f"the output holds a lone surrogate {where}, which is not text and cannot be "
                "printed",
                hint="fix the template, stored text or variable that produces it",
            ) from None
        raise ConfigurationError(
            f"stdout's encoding ({encoding}) cannot represent {bad!r} {where}; use a UTF-8 "
            "locale (LANG=C.UTF-8) or set PYTHONIOENCODING=utf-8"
        ) from None
    except LookupError:
        pass  # an encoding Python does not know: let the stream itself decide
    sys.stdout.write(text)


def _output_console() -> Console:
    """Piped or redirected (a CI log), Rich would lay tables out in 80 columns; give them room.

    A terminal keeps its own width, and so does an explicit ``COLUMNS``.
    """
    if stdout.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return stdout
    return Console(soft_wrap=True, width=max(stdout.width, _PIPED_WIDTH))


class _WholeTable(Table):
    """A table given at least the room its columns' minimum widths need.

    Squeezed below that, Rich shrinks every column, even those with a minimum width, and a
    column shrunk to nothing vanishes with its values; past a narrow terminal, they stay.
    """

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # Default box and padding: a border left of every column and one at the right edge, a
        # space either side of every value.
        needed = sum((column.min_width or 0) + 3 for column in self.columns) + 1
        if needed > options.max_width:
            options = options.update_width(needed)
        yield from super().__rich_console__(console, options)


def _is_identifying(index: int, column: str) -> bool:
    return index == 0 or column.lower() in _IDENTIFYING_COLUMNS


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """A table whose identifying columns (names, slugs, ids, the first column) are never cut.

    They never wrap and are as wide as their widest value, even if the table then runs past a
    narrow terminal; other columns wrap, and fold a very long word, rather than end in an
    ellipsis.
    """
    # Every value and heading through literal(): what is stored is shown, never read as markup.
    cells = [[literal("" if cell is None else str(cell)) for cell in row] for row in rows]
    result = _WholeTable(
        title=None if title is None else literal(title, style="table.title"),
        title_justify="left",
    )
    for index, column in enumerate(columns):
        heading = literal(column)
        if _is_identifying(index, column):
            widest = max((row[index].cell_len for row in cells if index < len(row)), default=0)
            result.add_column(
                heading,
                no_wrap=True,
                overflow="fold",
                min_width=max(widest, heading.cell_len),
            )
        else:
            # Wrapped at spaces where it has to, and never narrower than its longest word (up to
            # _FOLD_BEYOND: only longer words fold), so no column shrinks to nothing or splits a
            # number; a table that then cannot fit runs past the terminal rather than lose data.
            words = [heading.plain, *(row[index].plain for row in cells if index < len(row))]
            longest = max(cell_len(word) for text in words for word in [*text.split(), ""])
            result.add_column(
                heading, overflow="fold", min_width=min(longest, _FOLD_BEYOND) or None
            )
    for row in cells:
        result.add_row(*row)
    return result


def note(message: str) -> None:
    """One line on stderr beside a result: something the operator should know (printed
    literally: it may quote stored text or SQL)."""
    if message:
        stderr.print(literal(message, style="yellow"))


def fail(message: str, exit_code: int) -> NoReturn:
    # Literal: a message quotes names and stored text (`prompt-tool[redis]`, `[/INST]`,
    # `[link=...]`), which Rich would read as tags.
    stderr.print(Text.assemble(("error:", "bold red"), " ", literal(message)))
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
    refused = write_refusal(error)
    if refused is not None:
        return (
            f"this command writes, and the database refused ({refused}: {first_line}); run it "
            "as a user who may write, on the primary (the README's 'On a production database' "
            "lists what each command needs)"
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
        except (PromptToolError, SQLAlchemyError, KeyboardInterrupt) as error:
            _exit_for(error)
            raise

    return wrapper


def _exit_for(error: BaseException) -> None:
    """Exit with the one line and code of an error the user can act on; return (the caller
    re-raises) for anything else, and for database and OS errors under PROMPT_TOOL_DEBUG."""
    if isinstance(error, PromptToolError):
        fail(str(error), error.exit_code)
    try:
        debug = get_settings().debug
    except ConfigurationError:  # a malformed setting is reported where it is read
        debug = False
    if isinstance(error, SQLAlchemyError) and not debug:
        fail(_database_message(error), 2)
    if isinstance(error, KeyboardInterrupt):
        fail("interrupted; nothing half-written is left behind, run the command again", 130)
    if isinstance(error, OSError) and not debug:
        fail(f"{error.strerror or error}: {error.filename or ''}".rstrip(": "), 2)


def run(app: typer.Typer) -> None:
    """Run ``app``; errors raised outside a command (option parsing) are mapped here too.

    Ctrl-C (SIGINT) and SIGTERM take the same path: either raises KeyboardInterrupt where the
    command is, so what it holds is released and its ledger row marked interrupted on the way
    out, and further signals are ignored until then; one line on stderr, exit 130 or 143
    (128 + the signal's number, as a shell reports a process the signal ended).
    """
    received: list[int] = []
    stop_signals = (signal.SIGINT, signal.SIGTERM)

    def interrupt(signum: int, frame: object) -> None:
        received.append(signum)
        for stop in stop_signals:  # once: a second Ctrl-C must not cut the cleanup short
            signal.signal(stop, signal.SIG_IGN)
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {stop: signal.getsignal(stop) for stop in stop_signals} if in_main_thread else {}
    for stop in previous:
        signal.signal(stop, interrupt)
    try:
        try:
            app()
        except (PromptToolError, SQLAlchemyError, KeyboardInterrupt, OSError) as error:
            _exit_for(error)
            raise
    except SystemExit as exit_:
        if received and exit_.code not in (0, None):
            raise SystemExit(128 + received[0]) from None
        raise
    finally:
        for stop, handler in previous.items():
            if handler is not None:
                signal.signal(stop, handler)
