"""The template manager's way into the database, shared by its parts.

Units of work (a read, or a write refused first on a schema this prompt-tool does not know) and
the project slug -> id memo that listing and name resolution both use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session, sessionmaker

from prompt_tool.db.engine import Connectable, make_session_factory
from prompt_tool.db.projects import get_project
from prompt_tool.db.revision_guard import require_known_revision
from prompt_tool.db.revisions import EXPAND

__all__ = ["TemplateDatabase"]


class TemplateDatabase:
    """Units of work on one engine, and the ids of the projects named so far."""

    def __init__(self, engine: Connectable) -> None:
        self.engine = engine
        self._sessions: sessionmaker[Session] = make_session_factory(engine)
        self._project_ids: dict[str, int] = {}

    @contextmanager
    def unit(self) -> Iterator[Session]:
        """One transaction, committed on success."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def writing(self, action: str, needs: str | None = EXPAND) -> Iterator[Session]:
        """A unit of work that writes: refused first on a schema this prompt-tool does not know
        (checked once per engine, see :mod:`prompt_tool.db.revision_guard`)."""
        require_known_revision(self.engine, action, needs=needs)
        with self.unit() as session:
            yield session

    def project_id(self, slug: str, session: Session | None = None) -> int:
        """The id of project ``slug`` (NotFoundError if none), read in ``session`` or, when
        none is given, in a unit of its own; only the first call for a slug reads."""
        # Project ids never change, so the slug -> id map needs no expiry.
        known = self._project_ids.get(slug)
        if known is not None:
            return known
        if session is None:
            with self.unit() as own:
                known = get_project(own, slug).id
        else:
            known = get_project(session, slug).id
        self._project_ids[slug] = known
        return known
