"""Typed models, engine and sessions, URL handling, online-safe DDL, the schema history as a library."""
