"""Diffs print as diff and git print them: a last line without a newline never runs into the
next line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from prompt_tool.core.textdiff import unified_diff


def test_a_last_line_without_a_newline_is_said_not_glued_to_the_next() -> None:
    diff = unified_diff("old", "new\n", "a", "b")
    assert diff.splitlines() == [
        "--- a",
        "+++ b",
        "@@ -1 +1 @@",
        "-old",
        "\\ No newline at end of file",
        "+new",
    ]


def test_equal_texts_have_an_empty_diff() -> None:
    assert unified_diff("same\r\n", "same\r\n", "a", "b") == ""


@pytest.mark.parametrize(
    ("old", "new"),
    [("a\nb", "a\nc"), ("a\nb\n", "a\nb"), ("x", "y"), ("one\ntwo\n", "one\nTWO\n")],
)
def test_the_diff_is_the_one_git_prints(old: str, new: str, tmp_path: Path) -> None:
    (tmp_path / "a").write_text(old, newline="")
    (tmp_path / "b").write_text(new, newline="")
    git = subprocess.run(
        ["git", "diff", "--no-index", "--no-color", "a", "b"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    hunks = git[git.index("@@") :]
    ours = unified_diff(old, new, "a", "b")
    assert ours[ours.index("@@") :] == hunks
