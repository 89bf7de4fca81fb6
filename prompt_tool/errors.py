"""One exception tree for the whole package.

Every error says what went wrong and what to do about it, in one line, so the CLI can print
``str(error)`` and exit with ``error.exit_code`` without a traceback.
"""

from __future__ import annotations

from alembic.util.exc import CommandError

__all__ = [
    "ConfigurationError",
    "DatabaseUnavailableError",
    "InvalidInputError",
    "LockTimeoutError",
    "MigrationRefusedError",
    "NotFoundError",
    "PromptToolError",
    "SchemaError",
    "UnknownRevisionError",
]


class PromptToolError(Exception):
    """Root of every error prompt-tool raises on purpose.

    ``exit_code`` follows the CLI contract: 1 for a failed check or render, 2 for bad input or
    configuration (the operator has to change something before trying again).
    """

    exit_code: int = 2


class InvalidInputError(PromptToolError):
    """An argument, file or value given by the user cannot be used as it is."""


class NotFoundError(PromptToolError):
    """Something the user named (a project, a session, a template) does not exist."""


class ConfigurationError(PromptToolError):
    """A setting (database URL, timeout, limit) is missing or malformed."""


class DatabaseUnavailableError(PromptToolError):
    """The database could not be reached or refused the connection."""


class LockTimeoutError(PromptToolError):
    """Another session held a lock the step needed past every retry. What was committed before
    stands, the step itself wrote nothing, and running the command again carries on.

    Exit code 75 (``EX_TEMPFAIL``): nothing is wrong with the input; try again later.
    """

    exit_code = 75


class SchemaError(PromptToolError):
    """The database schema is not what the command needs (not under Alembic, unknown revision)."""


class UnknownRevisionError(SchemaError):
    """The database is at a revision this prompt-tool does not know (a newer one upgraded it), or
    records several at once: no command reads or writes a schema it cannot vouch for."""


class MigrationRefusedError(SchemaError, CommandError):
    """A schema step refused to run (it would lose data); nothing was changed.

    Also an Alembic ``CommandError``, so plain ``alembic downgrade`` prints the one line too
    instead of a traceback.
    """
