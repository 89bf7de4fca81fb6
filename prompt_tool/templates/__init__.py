"""The template manager: scopes, versions, labels, permissions and name caches, over the database."""
