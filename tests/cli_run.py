"""Run a Typer app the way its console script does: through ``run``, the one place errors
become exit codes and one-line messages."""

from __future__ import annotations

import sys

import typer
from typer.testing import CliRunner

from prompt_tool.cli._runtime import run

_runner = CliRunner()


def run_cli(app: typer.Typer, argv: list[str]) -> tuple[int, str, str]:
    """``argv`` (program name first) through ``run(app)``: (exit code, stdout, stderr)."""
    saved = sys.argv
    sys.argv = argv
    try:
        with _runner.isolation() as (out, err, _both):
            try:
                run(app)
                code = 0
            except SystemExit as exit_:
                code = int(exit_.code or 0)
            sys.stdout.flush()
            sys.stderr.flush()
            return code, out.getvalue().decode(), err.getvalue().decode()
    finally:
        sys.argv = saved
