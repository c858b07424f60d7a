"""Fixtures of the container tests: a real Apptainer (tests/apptainer/install-apptainer.sh) and the stage image,
built by `snakemake build_images` as the unprivileged test user, exactly as a user builds it.

    apptainer     session: apptainer installed (root) under HPCDL_APPTAINER_PREFIX and put on the test user's PATH,
                  /dev/fuse usable, subuid/subgid entries for the test user (both undone at the end)
    stage_image   session: the image (containers/hpcdl-cpu.sif of a clone of this checkout) and its build facts

Environment:
    HPCDL_APPTAINER_PREFIX  where Apptainer is installed (default /opt/hpcdl-apptainer/1.4.5; CI: a fresh folder)
    HPCDL_IMAGE_CACHE  finished images keyed by their inputs (containers/build-image.sh). Unset (CI): the images are
                       built. Set it for faster local reruns; a hit skips the build.
    HPCDL_CACHE        Horovod's wheel cache, shared with the image build (CI: the one scripts/setup.sh filled in
                       the same run).
Root on Debian only; skipped elsewhere, failed under CI=true (require_or_fail).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import HOROVOD_CACHE, REPO, require_or_fail
from slurm_fixtures import EXTRA_PATH, WORK_ROOT, SlurmUser, chown_tree, run_snakemake

INSTALL = REPO / "tests" / "apptainer" / "install-apptainer.sh"
APPTAINER_PREFIX = Path(os.environ.get("HPCDL_APPTAINER_PREFIX", "/opt/hpcdl-apptainer/1.4.5"))
IMAGE_CACHE = Path(os.environ["HPCDL_IMAGE_CACHE"]) if os.environ.get("HPCDL_IMAGE_CACHE") else None


@pytest.fixture(scope="session")
def apptainer(slurm_user, machine) -> str:
    """Apptainer installed by the project's script; returns its version ('1.4.5')."""
    require_or_fail(os.geteuid() == 0, "the container tests install Apptainer: run them as root (CI does)")
    require_or_fail(Path("/etc/debian_version").exists(), "the container tests need Debian 12 (tests/apptainer/install-apptainer.sh)")
    started = time.monotonic()
    install = subprocess.run(["bash", str(INSTALL), str(APPTAINER_PREFIX)], capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        pytest.fail(f"install-apptainer.sh failed ({install.returncode}):\n{install.stdout[-3000:]}\n{install.stderr[-5000:]}")
    print(f"apptainer install: {time.monotonic() - started:.0f} s into {APPTAINER_PREFIX}")
    EXTRA_PATH.insert(0, str(APPTAINER_PREFIX / "usr" / "bin"))
    # Unprivileged containers mount their image through FUSE; --fakeroot builds map the user's ids to a
    # subordinate range.
    machine.chmod(Path("/dev/fuse"), 0o666)
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        entries = path.read_text() if path.exists() else ""
        if not any(line.split(":")[0] == slurm_user.name for line in entries.splitlines()):
            machine.append_line(path, f"{slurm_user.name}:100000:65536")
    version = slurm_user.run(["apptainer", "--version"], check=True).stdout.split()[-1]
    return version


def host_pip_env() -> dict:
    """This machine's pip settings as PIP_* variables, for the test user (root's own pip.conf is not theirs): the
    image build hands them on to pip inside the build, so torch comes from the same local wheels as the venv's."""
    listing = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60).stdout
    env = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        name = key.split(".", 1)[-1]
        if name in {"index-url", "extra-index-url", "find-links", "constraint", "cert", "trusted-host", "default-timeout"}:
            env["PIP_" + name.upper().replace("-", "_")] = value.strip("'\"")
    return env


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class StageImage:
    path: Path
    sha256: str             # computed here from the file, not read from the build's .sha256
    git_commit: str         # what the image's label and build-info must say
    apptainer_version: str
    build_seconds: float
    cached: bool            # the image came from HPCDL_IMAGE_CACHE


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="session")
def stage_image(apptainer, slurm_user: SlurmUser, _work_root) -> StageImage:
    """`snakemake build_images` as the test user in a clone of this checkout (its working-tree files copied over
    the clone, so an uncommitted change is built too, and labelled -dirty)."""
    workdir = WORK_ROOT / "image-build"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(workdir)], check=True, timeout=300)
    for tracked in git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0"):
        if tracked and (REPO / tracked).is_file():
            (workdir / tracked).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / tracked, workdir / tracked)
    expected_commit = git("describe", "--always", "--dirty", "--abbrev=40")
    # The Horovod wheel the venv's set-up built (same script, patch, torch, Python and Open MPI) is reused inside the
    # build through the cache that scripts/build-horovod.sh keys; a miss compiles it there (3.5 min).
    wheel_cache = WORK_ROOT / "wheel-cache"
    if (HOROVOD_CACHE / "wheels").is_dir():
        shutil.copytree(HOROVOD_CACHE / "wheels", wheel_cache / "wheels", dirs_exist_ok=True)
    wheel_cache.mkdir(exist_ok=True)
    env = {**host_pip_env(), "HPCDL_CACHE": wheel_cache}
    if IMAGE_CACHE is not None:
        IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
        env["HPCDL_IMAGE_CACHE"] = IMAGE_CACHE
    for path in (workdir, wheel_cache, *([IMAGE_CACHE] if IMAGE_CACHE else [])):
        chown_tree(path, slurm_user)
    started = time.monotonic()
    run = run_snakemake(slurm_user, workdir, "build_images", env=env, timeout=2400)
    elapsed = time.monotonic() - started
    logs = "".join(p.read_text()[-4000:] for p in sorted((workdir / "containers" / "logs").glob("*.log")))
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{logs}"
    image = workdir / "containers" / "hpcdl-cpu.sif"
    cached = "image cache hit" in logs
    print(f"stage image: {elapsed:.0f} s ({'from the image cache' if cached else 'built'}), {image.stat().st_size / 2**30:.2f} GiB")
    return StageImage(image, file_sha256(image), expected_commit, apptainer, elapsed, cached)


def image_label(image: StageImage, user: SlurmUser, label: str) -> str:
    """A label of the image, as `apptainer inspect --json` reports it."""
    out = user.run(["apptainer", "inspect", "--json", "--labels", str(image.path)], check=True).stdout
    return json.loads(out)["data"]["attributes"]["labels"][label]
