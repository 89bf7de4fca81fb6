"""Typed models, engine and sessions, URL handling, online-safe DDL, the schema history as a
library. The bottom layer: it imports nothing else from prompt_tool but errors and settings."""

from prompt_tool.db.engine import check_connection, make_engine, make_session_factory, session_scope
from prompt_tool.db.projects import create_project, get_project, list_projects
from prompt_tool.db.url import normalize_url, redact, resolve_url

__all__ = [
    "check_connection",
    "create_project",
    "get_project",
    "list_projects",
    "make_engine",
    "make_session_factory",
    "normalize_url",
    "redact",
    "resolve_url",
    "session_scope",
]
