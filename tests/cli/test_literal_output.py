"""What the CLIs print is what is stored: stored text, names, variables and the error messages
quoting them are never read as Rich console markup (``[/INST]``, ``[conceal]``, ``[link=...]``,
``[bold]``) or emoji codes, in text, tables, diffs, errors and JSON, piped and on a terminal.

Output that is not text (a lone surrogate) and variables files too deep or too big to read end
in one line on stderr and the CLI contract's exit code, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from prompt_tool.cli.prompt_tool import app
from tests.cli.test_signals import in_terminal
from tests.cli_run import run_cli

PROMPT_TOOL = str(Path(sys.executable).parent / "prompt-tool")
# Every kind of bracket Rich would read: a closing tag with nothing open (the Llama chat
# format, which crashed `templates show`), a tag hiding text, a link tag, a style, an emoji code.
MARKUP = (
    "<s>[INST] <<SYS>> be brief <</SYS>> hi [/INST] "
    "[conceal]secret[/conceal] [link=http://x]y[/link] [bold]b[/bold] :thumbs_up: \\[ok]"
)
Cli = Callable[..., tuple[int, str, str]]
SURROGATE_TEMPLATE = "before {{ '\\ud800' }} after"


def _one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("error: "), stderr
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    return stderr


@pytest.fixture
def cli(head_db_url: str) -> Cli:
    """``prompt-tool ARGS --db URL --as alice`` (alice a global admin): (code, stdout, stderr)."""

    def invoke(*args: str) -> tuple[int, str, str]:
        return run_cli(app, ["prompt-tool", *args, "--db", head_db_url, "--as", "alice"])

    run_cli(app, ["prompt-tool", "projects", "create", "acme", "--db", head_db_url])
    assert invoke("roles", "grant", "alice", "admin", "--global")[0] == 0
    return invoke


def _file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_show_and_diff_print_stored_markup_exactly(cli: Cli, tmp_path: Path) -> None:
    first = MARKUP + "\n"
    assert cli("templates", "create", "llama", "-f", _file(tmp_path, "v1", first))[0] == 0
    second = first + "[/conceal] [link=x]more[/link]\n"
    assert cli("templates", "update", "llama", "-f", _file(tmp_path, "v2", second))[0] == 0

    code, out, err = cli("templates", "show", "llama")
    assert (code, err) == (0, "")
    assert out.endswith("\n" + first + "\n")

    code, out, err = cli("templates", "show", "llama", "--version", "2", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)["source"] == second

    code, out, err = cli("templates", "diff", "llama", "1", "2")
    assert (code, err) == (0, "")
    assert f"\n {MARKUP}\n+[/conceal] [link=x]more[/link]\n" in out
    assert json.loads(cli("templates", "diff", "llama", "1", "2", "--json")[1])["diff"] in out


def test_tables_show_markup_in_names_tags_and_labels_literally(cli: Cli, tmp_path: Path) -> None:
    created = cli(
        "templates",
        "create",
        "tagged",
        "-f",
        _file(tmp_path, "t", "x"),
        "--category",
        "[bold]c[/bold]",
        "--tag",
        "[/INST]",
    )
    assert created[0] == 0, created
    code, out, err = cli("templates", "list")
    assert (code, err) == (0, "")
    assert "[bold]c[/bold]" in out
    assert "[/INST]" in out


def test_markup_rendered_from_template_and_variable_prints_exactly(
    cli: Cli, tmp_path: Path
) -> None:
    source = "[conceal]{{ who }}[/conceal] [/INST]"
    assert cli("templates", "create", "greet", "-f", _file(tmp_path, "g", source))[0] == 0
    variables = _file(tmp_path, "vars.json", json.dumps({"who": "[link=http://x]me[/link]"}))

    code, out, err = cli("templates", "render", "greet", "--vars-file", variables)
    assert (code, out, err) == (0, "[conceal][link=http://x]me[/link][/conceal] [/INST]", "")
    code, out, err = cli("templates", "render", "greet", "--var", "who=[bold]", "--json")
    assert code == 0, err
    assert json.loads(out)["text"] == "[conceal][bold][/conceal] [/INST]"


def test_errors_quote_markup_literally(cli: Cli, tmp_path: Path) -> None:
    code, out, err = cli("templates", "show", "[link=http://x]y[/link]")
    assert code == 2 and out == ""
    assert "[link=http://x]y[/link]" in _one_line_error(err)

    code, _, err = cli("templates", "create", "x", "-f", str(tmp_path / "[conceal]gone[/conceal]"))
    assert code == 2
    assert "[conceal]gone[/conceal]" in _one_line_error(err)


def test_a_terminal_shows_stored_markup_exactly(head_db_url: str, tmp_path: Path) -> None:
    base = ["--db", head_db_url, "--as", "alice"]
    run_cli(app, ["prompt-tool", "roles", "grant", "alice", "admin", "--global", *base])
    text = _file(tmp_path, "llama", MARKUP)
    assert run_cli(app, ["prompt-tool", "templates", "create", "llama", "-f", text, *base])[0] == 0

    ran = in_terminal([PROMPT_TOOL, "templates", "show", "llama", *base], when=lambda _: True)
    assert ran.returncode == 0, ran.screen
    assert MARKUP in ran.lines(), ran.screen

    ran = in_terminal([PROMPT_TOOL, "templates", "show", "[/INST]", *base], when=lambda _: True)
    assert ran.returncode == 2, ran.screen
    assert "Traceback" not in ran.screen
    (line,) = ran.lines()
    assert line.startswith("error: ") and "'[/INST]'" in line, ran.screen


def test_a_lone_surrogate_in_rendered_output_is_one_line_and_exit_1(
    cli: Cli, tmp_path: Path
) -> None:
    path = _file(tmp_path, "s", SURROGATE_TEMPLATE)
    assert cli("templates", "create", "sur", "-f", path)[0] == 0
    for extra in ([], ["--json"]):
        code, out, err = cli("templates", "render", "sur", *extra)
        assert (code, out) == (1, "")
        assert "lone surrogate (U+D800" in _one_line_error(err)


def test_a_variable_holding_a_lone_surrogate_is_refused_in_one_line(
    cli: Cli, tmp_path: Path
) -> None:
    assert cli("templates", "create", "echo", "-f", _file(tmp_path, "e", "{{ x }}"))[0] == 0
    variables = tmp_path / "vars.json"
    variables.write_text('{"x": {"deep": ["\\ud800"]}}', encoding="utf-8")
    code, out, err = cli("templates", "render", "echo", "--vars-file", str(variables))
    assert (code, out) == (2, "")
    assert "x.deep[0] holds a lone surrogate (U+D800)" in _one_line_error(err)


@pytest.mark.parametrize(
    "environment",
    [{"LANG": "C", "LC_ALL": "C"}, {"LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": "ascii"}],
    ids=["c-locale", "ascii"],
)
def test_a_lone_surrogate_piped_in_a_c_locale_is_one_line(
    head_db_url: str, tmp_path: Path, environment: dict[str, str]
) -> None:
    base = ["--db", head_db_url, "--as", "alice"]
    run_cli(app, ["prompt-tool", "roles", "grant", "alice", "admin", "--global", *base])
    path = _file(tmp_path, "s", SURROGATE_TEMPLATE)
    assert run_cli(app, ["prompt-tool", "templates", "create", "sur", "-f", path, *base])[0] == 0
    ran = subprocess.run(
        [PROMPT_TOOL, "templates", "render", "sur", *base],
        check=False,
        capture_output=True,
        env={**os.environ, "PROMPT_TOOL_DEBUG": "", **environment},
        timeout=120,
    )
    assert (ran.returncode, ran.stdout) == (1, b"")
    assert b"lone surrogate (U+D800" in ran.stderr
    _one_line_error(ran.stderr.decode("ascii"))


def test_a_vars_file_nested_100000_deep_is_refused_in_one_line(cli: Cli, tmp_path: Path) -> None:
    assert cli("templates", "create", "echo", "-f", _file(tmp_path, "e", "{{ x }}"))[0] == 0
    deep = _file(tmp_path, "deep.json", '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, out, err = cli("templates", "render", "echo", "--vars-file", deep)
    assert (code, out) == (2, "")
    assert "nested" in _one_line_error(err)

    # Deeper than variables may be, yet within what the parser follows: the same answer.
    middling = _file(tmp_path, "middling.json", '{"x": ' + "[" * 500 + "]" * 500 + "}")
    code, _, err = cli("templates", "render", "echo", "--vars-file", middling)
    assert code == 2
    assert "nested deeper than 100 levels" in _one_line_error(err)


def test_an_oversized_vars_file_is_refused_before_it_is_read(cli: Cli, tmp_path: Path) -> None:
    assert cli("templates", "create", "echo", "-f", _file(tmp_path, "e", "{{ x }}"))[0] == 0
    huge = tmp_path / "huge.json"
    with huge.open("wb") as file:  # 200 MB, sparse: refused from its size, never read
        file.truncate(200 * 1024 * 1024)
    code, out, err = cli("templates", "render", "echo", "--vars-file", str(huge))
    assert (code, out) == (2, "")
    assert "PROMPT_TOOL_VARS_FILE_MAX_BYTES" in _one_line_error(err)


def test_the_vars_file_limit_is_a_setting(head_db_url: str, tmp_path: Path) -> None:
    base = ["--db", head_db_url, "--as", "alice"]
    run_cli(app, ["prompt-tool", "roles", "grant", "alice", "admin", "--global", *base])
    path = _file(tmp_path, "e", "{{ x }}")
    assert run_cli(app, ["prompt-tool", "templates", "create", "echo", "-f", path, *base])[0] == 0
    variables = _file(tmp_path, "vars.json", json.dumps({"x": "a" * 100}))
    environment = {**os.environ, "PROMPT_TOOL_DEBUG": "", "PROMPT_TOOL_VARS_FILE_MAX_BYTES": "64"}
    argv = [PROMPT_TOOL, "templates", "render", "echo", "--vars-file", variables, *base]
    ran = subprocess.run(
        argv, check=False, capture_output=True, env=environment, text=True, timeout=120
    )
    assert (ran.returncode, ran.stdout) == (2, "")
    assert "larger than the 64 bytes" in _one_line_error(ran.stderr)


def test_a_lone_surrogate_on_a_terminal_is_one_line(head_db_url: str, tmp_path: Path) -> None:
    base = ["--db", head_db_url, "--as", "alice"]
    run_cli(app, ["prompt-tool", "roles", "grant", "alice", "admin", "--global", *base])
    path = _file(tmp_path, "s", SURROGATE_TEMPLATE)
    assert run_cli(app, ["prompt-tool", "templates", "create", "sur", "-f", path, *base])[0] == 0
    ran = in_terminal([PROMPT_TOOL, "templates", "render", "sur", *base], when=lambda _: True)
    assert ran.returncode == 1, ran.screen
    assert "Traceback" not in ran.screen
    (line,) = ran.lines()
    assert line.startswith("error: the output holds a lone surrogate (U+D800"), ran.screen
