"""The README's two commands work however a newcomer types them (scripts/run.sh, ./scripts/run.sh, bash scripts/run.sh,
or from another folder, with relative paths among their arguments), and the cold Horovod build works from a relative
interpreter path in another folder with an empty wheel cache: the exact path that once broken README command 1
(scripts/setup.sh passed `--python .venv/bin/python`, and the build ran pip from inside the unpacked sdist)."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import REPO, mpi_env


def run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=mpi_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("form", "where"),
    [(["scripts/run.sh"], "checkout"), (["./scripts/run.sh"], "checkout"), (["bash", "scripts/run.sh"], "checkout"),
     (["bash", str(REPO / "scripts" / "run.sh")], "elsewhere"), ([str(REPO / "scripts" / "run.sh")], "elsewhere")],
)
def test_run_command_works_in_every_form_and_from_any_folder(tmp_path, form, where):
    """A dry run of the pipeline through README command 1, with a config file named relative to the caller's folder."""
    cwd = REPO if where == "checkout" else tmp_path
    overrides = tmp_path / "mine.yaml"
    overrides.write_text("train:\n  ranks: 3\n")
    name = os.path.relpath(overrides, cwd)
    result = run([*form, "--dry-run", "--configfile", name, "--config", f"results={tmp_path / 'results'}"], cwd)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "rule train:" in output and "tasks=3," in output, "the relative config file reached the workflow"
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_test_command_works_from_any_folder(tmp_path, where):
    cwd = REPO if where == "checkout" else tmp_path
    target = os.path.relpath(REPO / "tests" / "test_models.py", cwd)
    result = run(["bash", os.path.relpath(REPO / "scripts" / "test.sh", cwd), "--collect-only", "-q", target], cwd)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "test_model_maps_a_batch_to_class_logits" in result.stdout


@pytest.mark.slow
def test_horovod_builds_cold_from_a_relative_python_in_another_folder(tmp_path):
    """scripts/build-horovod.sh with an empty wheel cache, called from another folder with a relative interpreter path
    and a relative cache path: it downloads the sdist, compiles it (minutes) and installs and smoke-tests the wheel.

    The interpreter is a throwaway venv that sees this checkout's packages (torch) through a .pth file, so the
    project's own venv is left as it is."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    project_site = next(Path(sys.prefix, "lib").glob("python3*/site-packages"))
    (site / "project.pth").write_text(f"{project_site}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = mpi_env(HPCDL_CACHE="cache")  # relative as well: made absolute before the build's cd
    env.pop("VIRTUAL_ENV", None)
    build = subprocess.run(["bash", str(REPO / "scripts" / "build-horovod.sh"), "--python", "../venv/bin/python", "--cpu"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=1800)
    output = build.stdout + build.stderr
    assert build.returncode == 0, output[-5000:]
    assert "cache miss" in output and "wheel built in" in output, "a cold build"
    assert output.count("allreduce ok") == 2, "the installed wheel passes the 2-rank smoke test"
    assert list((elsewhere / "cache" / "wheels").glob("*/horovod-0.28.1-*.whl")), "the wheel is cached where asked"
    assert list(site.glob("horovod-0.28.1*.dist-info")), "installed into the interpreter it was given"
