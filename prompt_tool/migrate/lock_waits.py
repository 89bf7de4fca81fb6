"""What a command says when a lock another session holds outlasted its patience: who holds it,
what was tried, what stands, and that running it again carries on (:class:`LockTimeoutError`,
exit 75)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError

from prompt_tool.db.dialect import is_lock_timeout, lock_holders
from prompt_tool.db.engine import Connectable, connect
from prompt_tool.errors import LockTimeoutError

__all__ = ["lock_wait_error", "lock_waits_told"]


def lock_wait_error(
    db: Connectable,
    command: str,
    tables: Sequence[str],
    *,
    stands: str,
    attempts: int = 1,
    waited_s: float = 0.0,
) -> LockTimeoutError:
    """The error for ``command`` (e.g. "backfill") whose lock waits on ``tables`` ran out after
    ``attempts`` tries in ``waited_s`` seconds; ``stands`` says what is left ("nothing was
    written")."""
    with connect(db) as connection:
        holders = lock_holders(connection, tables)
    held_by = f" ({'; '.join(holders)})" if holders else ""
    tried = (
        f"gave up after {attempts} attempts in {waited_s:.1f} s: each waited"
        if attempts > 1
        else "stopped: it waited"
    )
    return LockTimeoutError(
        f"{command} {tried} past lock_timeout (PROMPT_TOOL_LOCK_TIMEOUT_MS) for a lock held by "
        f"another session{held_by}; {stands}; run the same command again once that session is "
        "done"
    )


@contextmanager
def lock_waits_told(
    db: Connectable, command: str, tables: Sequence[str], *, stands: str
) -> Iterator[None]:
    """A lock timeout inside becomes :func:`lock_wait_error`'s one line (a command that does not
    retry: one transaction, all or nothing)."""
    try:
        yield
    except DBAPIError as error:
        if not is_lock_timeout(error):
            raise
        raise lock_wait_error(db, command, tables, stands=stands) from None
