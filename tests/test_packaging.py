"""The built wheel carries the migration scripts: `orch-migrate db upgrade` works from an
installed package in a directory with no checkout."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
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
    assert "at 0002" in current.stdout
