"""The orchestrators: the integrated one (sessions in the database) and the standalone one
(workflow files)."""
