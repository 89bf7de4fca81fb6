"""The built wheel carries the migration scripts: `orch-migrate db upgrade` works from an
installed package in a directory with no checkout."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("prompt_tool-*.whl")
    return built


@pytest.mark.slow
def test_wheel_ships_the_schema_history(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "prompt_tool/_alembic/env.py" in names
    assert "prompt_tool/_alembic/versions/0001_legacy_schema.py" in names
    assert "prompt_tool/_alembic/versions/0002_orchestration_templates_expand.py" in names
    assert "prompt_tool/_alembic/versions/0003_backfill_quarantine.py" in names
    assert "prompt_tool/_alembic/alembic.ini" in names


@pytest.mark.slow
def test_wheel_installs_only_the_prompt_tool_package(wheel: Path) -> None:
    # benchmarks/ runs from the checkout (scripts/bench); in site-packages it would claim the
    # top-level name `benchmarks` for every project installed beside prompt-tool.
    names = zipfile.ZipFile(wheel).namelist()
    assert not [name for name in names if name.startswith("benchmarks/")]
    installed = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert installed == {"prompt_tool"}


def test_lint_and_build_tools_are_a_dev_extra_beside_what_the_suite_needs() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]

    def names(extra: str) -> set[str]:
        return {re.split(r"[<>=\[ ]", requirement, maxsplit=1)[0] for requirement in extras[extra]}

    assert {"ruff", "mypy"} <= names("dev")
    assert not {"ruff", "mypy"} & names("test")
    # What tests themselves run stays in the test extra: squawk (the migrations' lint), build.
    assert {"pytest", "squawk-cli", "build", "hatchling"} <= names("test")
    assert "-e '.[test,dev,redis,flagd]'" in (REPO / "scripts" / "setup").read_text()


@pytest.mark.slow
def test_wheel_is_typed_and_describes_itself(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    assert "prompt_tool/py.typed" in names
    (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = archive.read(metadata_name).decode()
    assert "Author: prompt-tool maintainers" in metadata
    assert "Project-URL: Source," in metadata
    assert "Classifier: Typing :: Typed" in metadata
    assert "Classifier: Programming Language :: Python :: 3.11" in metadata
    # 0.x dependencies may break in any minor release: each is capped.
    for requirement in ("openfeature-sdk", "typer", "openfeature-provider-flagd"):
        prefix = f"Requires-Dist: {requirement}"
        (line,) = [line for line in metadata.splitlines() if line.startswith(prefix)]
        assert "<0." in line, line


def test_min_deps_constraints_pin_every_runtime_dependency_at_its_lower_bound() -> None:
    printed = subprocess.run(
        [str(REPO / "scripts" / "test"), "--min-deps-constraints"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    pins = dict(line.split("==") for line in printed)
    assert pins["typer"] == "0.16" and pins["openfeature-sdk"] == "0.10"
    assert pins["psycopg"] == "3.2.3" and pins["alembic"] == "1.18"
    assert {"sqlalchemy", "jinja2", "rich", "pyyaml", "redis", "openfeature-provider-flagd"} <= set(
        pins
    )


@pytest.mark.slow
def test_installed_wheel_upgrades_a_database_outside_any_checkout(
    wheel: Path, tmp_path: Path
) -> None:
    scratch = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(scratch)], check=True)
    scratch_python = scratch / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(scratch_python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(wheel),
        ],
        check=True,
    )
    # The dependencies come from the test environment, appended after the scratch venv's own
    # site-packages, so the wheel's prompt_tool (not the checkout's) is the one imported.
    scratch_site = subprocess.run(
        [str(scratch_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(scratch_site, "_test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    imported = subprocess.run(
        [str(scratch_python), "-c", "import prompt_tool; print(prompt_tool.__file__)"],
        cwd=workdir,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert imported.startswith(str(scratch)), imported

    upgraded = subprocess.run(
        [
            str(scratch / "bin" / "orch-migrate"),
            "db",
            "upgrade",
            "--db",
            f"sqlite:///{workdir / 'deployed.db'}",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    assert upgraded.returncode == 0, upgraded.stderr
    current = subprocess.run(
        [
            str(scratch / "bin" / "orch-migrate"),
            "db",
            "current",
            "--db",
            f"sqlite:///{workdir / 'deployed.db'}",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "at 0003" in current.stdout

    # The plain alembic CLI, with the ini the wheel ships beside the scripts.
    ini = subprocess.run(
        [str(scratch / "bin" / "orch-migrate"), "db", "alembic-ini"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert ini.startswith(str(scratch)) and ini.endswith("prompt_tool/_alembic/alembic.ini"), ini
    plain = subprocess.run(
        [
            str(scratch_python),
            "-m",
            "alembic",
            "-c",
            ini,
            "-x",
            f"db=sqlite:///{workdir / 'plain.db'}",
            "upgrade",
            "head",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    assert plain.returncode == 0, plain.stderr
    assert "Running upgrade 0001 -> 0002" in plain.stderr
    assert "Running upgrade 0002 -> 0003" in plain.stderr
