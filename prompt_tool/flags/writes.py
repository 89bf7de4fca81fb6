"""Changing the flag, as an operator does: the default, or one project's override.

A change is written to the database (:func:`prompt_tool.flags.store.write_change`, recorded
with who and when) only if that is where readers read the flag. While a replacement provider
answers instead (``PROMPT_TOOL_FLAG_PROVIDER=flagd-file``, or
:func:`~prompt_tool.flags.use_provider`), the write would change nothing readers see, so it is
refused before anything is written, with a one-line
:class:`~prompt_tool.flags.FlagReadElsewhereError` naming where the flag lives.
"""

from __future__ import annotations

from prompt_tool.db.engine import connected
from prompt_tool.flags.config import check_writes_reach_readers
from prompt_tool.flags.store import Database, write_change
from prompt_tool.flags.types import FLAG_KEY, FlagChange, Guard

__all__ = ["set_default", "set_variant", "unset_default", "unset_variant"]


def _write(
    db: Database,
    project_slug: str | None,
    variant: str | None,
    *,
    actor: str,
    sample_rate: float | None,
    guard: Guard | None,
    flag_key: str,
) -> FlagChange:
    with connected(db) as engine:
        check_writes_reach_readers(engine, project_slug)
        return write_change(
            engine,
            project_slug,
            variant,
            actor=actor,
            sample_rate=sample_rate,
            guard=guard,
            flag_key=flag_key,
        )


def set_variant(
    db: Database,
    project_slug: str,
    variant: str,
    *,
    actor: str,
    sample_rate: float | None = None,
    guard: Guard | None = None,
    flag_key: str = FLAG_KEY,
) -> FlagChange:
    """Override the variant of one project; ``sample_rate`` (0..1) only with ``shadow``.

    ``guard`` sees the change before anything is written and refuses it by raising: the one
    place where a readiness check (before ``templates``) plugs in. Refused
    (:class:`~prompt_tool.flags.FlagReadElsewhereError`) while readers read the flag elsewhere.
    """
    return _write(
        db,
        project_slug,
        variant,
        actor=actor,
        sample_rate=sample_rate,
        guard=guard,
        flag_key=flag_key,
    )


def set_default(
    db: Database,
    variant: str,
    *,
    actor: str,
    sample_rate: float | None = None,
    guard: Guard | None = None,
    flag_key: str = FLAG_KEY,
) -> FlagChange:
    """Set the global default: the variant of every project without an override."""
    return _write(
        db, None, variant, actor=actor, sample_rate=sample_rate, guard=guard, flag_key=flag_key
    )


def unset_variant(
    db: Database, project_slug: str, *, actor: str, flag_key: str = FLAG_KEY
) -> FlagChange:
    """Remove a project's override: it follows the default again."""
    return _write(
        db, project_slug, None, actor=actor, sample_rate=None, guard=None, flag_key=flag_key
    )


def unset_default(db: Database, *, actor: str, flag_key: str = FLAG_KEY) -> FlagChange:
    """Remove the stored default: projects without an override get the built-in ``legacy``."""
    return _write(db, None, None, actor=actor, sample_rate=None, guard=None, flag_key=flag_key)
