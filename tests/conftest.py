"""Fixtures shared by the pipeline tests: real MPI launches, a small preprocessed dataset, stage parameters."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpcdl.launch import LOCAL_MPIRUN

pytest_plugins = ["data_fixtures", "slurm_fixtures", "container_fixtures", "browser_fixtures", "tracking_fixtures"]  # HTTP server and writers; Slurm test cluster; Apptainer + image; MLflow server + chromium

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
# Where scripts/build-horovod.sh keeps its wheels: the script's own rule (HPCDL_CACHE, else XDG_CACHE_HOME/hpcdl).
HOROVOD_CACHE = Path(os.environ.get("HPCDL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "hpcdl"))


def mpi_env(**extra) -> dict:
    """The environment of an MPI launch from the tests (root needs Open MPI's explicit consent)."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def mpirun_command(ranks: int, *program: str) -> list[str]:
    """The local rules' launch (hpcdl.launch.LOCAL_MPIRUN) of `ranks` copies of `program`."""
    return [*LOCAL_MPIRUN.split(), "-n", str(ranks), *program]


def mpirun(ranks: int, module: str, args: list[str], *, timeout: float = 300, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """`mpirun -n ranks python -m module args`: the launch the MPI rules make."""
    command = mpirun_command(ranks, sys.executable, "-m", module, *args)
    result = subprocess.run(command, env=mpi_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command[:8])} ... exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def tracking(tmp_path: Path, experiment: str = "tests") -> dict:
    return {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": experiment}


def train_config(**overrides) -> dict:
    """The default train section with test-sized overrides (validated by the schema test separately)."""
    cfg = copy.deepcopy(DEFAULT_CONFIG["train"])
    cfg.update(overrides)
    return cfg


def train_args(tmp_path: Path, data_dir: Path, out_dir: Path, cfg: dict, parent_file: Path | None = None) -> list[str]:
    args = ["--params", json.dumps({"mlflow": tracking(tmp_path), "train": cfg}), "--data-dir", str(data_dir), "--out-dir", str(out_dir)]
    if parent_file:
        args += ["--parent-run", str(parent_file)]
    return args


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's digits, fetched and preprocessed by the pipeline's own code at 16x16 (fast to train)."""
    from hpcdl.data.prepare import write_dataset
    from hpcdl.data.sources import fetch_source, load_raw

    root = tmp_path_factory.mktemp("digits")
    provenance = fetch_source({"source": "digits"}, root / "raw")
    images, labels, classes = load_raw(root / "raw")
    write_dataset(root / "data", images, labels, classes, image_size=16, channels=1, val_fraction=0.1, test_fraction=0.2, seed=0, provenance=provenance)
    return root / "data"


@pytest.fixture
def data_copy(digits_dir, tmp_path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(digits_dir, target)
    return target


def assert_results_meet_the_targets(results: Path) -> None:
    """The accuracy targets of the default pipeline, wherever it ran (host, Slurm, Apptainer)."""
    evaluation = json.loads((results / "evaluate" / "metrics.json").read_text())
    finetune = json.loads((results / "finetune" / "metrics.json").read_text())
    assert evaluation["accuracy"] >= 0.97, f"mnist5k held-out accuracy {evaluation['accuracy']:.4f}"
    assert finetune["finetuned"]["accuracy"] >= 0.98, f"digits fine-tuned accuracy {finetune['finetuned']['accuracy']:.4f}"
    assert finetune["finetuned"]["accuracy"] > finetune["baseline"]["accuracy"], "pretraining must beat training from scratch"


def require_or_fail(condition: bool, reason: str) -> None:
    """Skip locally when a facility is missing, but under CI=true a missing facility is a failure."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


def apt_install(*packages: str, recommends: bool = True) -> None:
    """Install Debian packages a fixture needs (as root), refreshing the package lists first, as scripts/setup.sh
    and the cluster's set-up do: on a fresh machine the lists may be empty even where set-up installed nothing."""
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True, timeout=900, env=env)
    options = [] if recommends else ["--no-install-recommends"]
    subprocess.run(["apt-get", "install", "-y", "-qq", *options, *packages], capture_output=True, text=True, timeout=900, env=env)


SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(results: Path, *args, timeout=900, cwd=REPO):
    """`snakemake --cores 2 ... --config results=<results>` in the checkout, as a user runs it."""
    command = [SNAKEMAKE, "--cores", "2", *args, "--config", f"results={results}"]
    return subprocess.run(command, cwd=cwd, env=mpi_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """The default pipeline plus the ONNX export (`snakemake all onnx`, local profile), run once per session:
    (results, completed run)."""
    import time

    results = tmp_path_factory.mktemp("pipeline") / "results"
    started = time.monotonic()
    run = snakemake(results, "all", "onnx")
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    print(f"default pipeline: {elapsed:.1f} s wall")
    return results, run

