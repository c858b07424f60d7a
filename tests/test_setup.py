"""The README's two commands work however a newcomer types them (scripts/run.sh, ./scripts/run.sh, bash scripts/run.sh,
or from another folder, with relative paths among their arguments), and the Horovod build takes a relative
interpreter and wheel cache from another folder: a relative interpreter once broke README command 1's cold build
(scripts/setup.sh passed `--python .venv/bin/python`, and the build ran pip from inside the unpacked sdist)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import HOROVOD_CACHE, REPO, mpi_env, require_or_fail


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


def test_horovod_build_takes_relative_paths_from_another_folder(tmp_path):
    """scripts/build-horovod.sh called from another folder with a relative interpreter (`../venv/bin/python`) and a
    relative wheel cache (HPCDL_CACHE=cache): both are the caller's paths, so the wheel is found in that folder's
    cache, installed into the interpreter named, and passes the 2-rank smoke test.

    The cache is seeded with the wheel the set-up built (in CI a cold compile from an empty cache minutes before).
    The script never changes folder (pip gets the unpacked sdist's path), so the compile reads the same paths as this
    cache-hit route, and the suite does not pay a second compile (3-6 min here). The interpreter is a throwaway venv
    that sees this checkout's packages (torch) through a .pth file, so the project's own venv is left as it is."""
    patch_digest = hashlib.sha256((REPO / "scripts" / "horovod-0.28.1-torch2.14.patch").read_bytes()).hexdigest()[:16]
    built = sorted((HOROVOD_CACHE / "wheels").glob(f"horovod-0.28.1_*_patch-{patch_digest}/horovod-0.28.1-*.whl"))
    require_or_fail(bool(built), f"no Horovod wheel for this patch in {HOROVOD_CACHE} (scripts/setup.sh builds it)")
    wheel = built[0]
    flavour = "gpu" if "_gpu_" in wheel.parent.name else "cpu"
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    project_site = next(Path(sys.prefix, "lib").glob("python3*/site-packages"))
    (site / "project.pth").write_text(f"{project_site}\n")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "cache" / "wheels" / wheel.parent.name).mkdir(parents=True)
    shutil.copy2(wheel, elsewhere / "cache" / "wheels" / wheel.parent.name)
    env = mpi_env(HPCDL_CACHE="cache")
    env.pop("VIRTUAL_ENV", None)
    build = subprocess.run(["bash", str(REPO / "scripts" / "build-horovod.sh"), "--python", "../venv/bin/python", f"--{flavour}"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    output = build.stdout + build.stderr
    assert build.returncode == 0, output[-5000:]
    assert f"python={elsewhere}/../venv/bin/python " in output and f"cache dir: {elsewhere}/cache/wheels/" in output, \
        "both paths made absolute from the caller's folder, as a compile needs them"
    assert f"cache hit: {wheel.name}" in output, "the wheel was looked up in the cache under the caller's folder"
    assert output.count("allreduce ok") == 2, "the installed wheel passes the 2-rank smoke test"
    assert list(site.glob("horovod-0.28.1*.dist-info")), "installed into the interpreter it was given"
