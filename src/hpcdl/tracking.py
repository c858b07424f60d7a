"""MLflow tracking, as MLflow's docs lay it out: one parent run per workflow invocation (opened by the
Snakefile's onstart handler), one child run per stage (tag mlflow.parentRunId), logged by rank 0 only.

Stages resume their own child run when a checkpoint names it, so a retried or re-run training continues the
same run and its metric histories."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.tracking import MlflowClient

import hpcdl
from hpcdl.atomic import atomic_write_json


def configure(mlflow_cfg: dict) -> str:
    """Point MLflow at the configured store and make sure the experiment exists; returns its id.

    A SQLite store keeps its artifacts next to it (<results>/mlartifacts); a tracking server decides itself."""
    uri = mlflow_cfg["tracking_uri"]
    mlflow.set_tracking_uri(uri)
    parsed = urlparse(uri)
    artifact_location = None
    if parsed.scheme == "sqlite":
        db_path = Path(uri[len("sqlite:///") :])
        db_path.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = (db_path.parent / "mlartifacts").resolve().as_uri()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(mlflow_cfg["experiment"])
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(mlflow_cfg["experiment"], artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(mlflow_cfg["experiment"]).experiment_id


def runs_url(mlflow_cfg: dict, experiment_id: str) -> str:
    """Where a user sees the run tree: the classic runs table (the 3.x UI opens on a GenAI overview)."""
    uri = mlflow_cfg["tracking_uri"]
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs"


def git_state() -> dict:
    """Commit and dirty flag of the workflow checkout (the current directory), 'unknown' outside git."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"git.commit": commit, "git.dirty": str(dirty).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": os.environ.get("HPCDL_GIT_COMMIT", "unknown"), "git.dirty": "unknown"}


SLURM_TAGS = {
    "slurm.job_id": "SLURM_JOB_ID",
    "slurm.job_name": "SLURM_JOB_NAME",
    "slurm.partition": "SLURM_JOB_PARTITION",
    "slurm.nodelist": "SLURM_JOB_NODELIST",
    "slurm.ntasks": "SLURM_NTASKS",
    "slurm.cpus_per_task": "SLURM_CPUS_PER_TASK",
}


SCONTROL_FIELDS = {"slurm.job_name": "JobName", "slurm.partition": "Partition", "slurm.nodelist": "NodeList",
                   "slurm.ntasks": "NumTasks", "slurm.cpus_per_task": "CPUs/Task"}


def slurm_tags() -> dict:
    """Where the stage ran under Slurm, so a user can go from a run in the UI to `sacct -j <job id>`.

    Inside a job step the environment describes the step (srun names it after the program, and the jobstep
    executor strips most SLURM_* variables), so the job's own record from `scontrol show job` wins."""
    tags = {tag: os.environ[var] for tag, var in SLURM_TAGS.items() if var in os.environ}
    if "slurm.job_id" in tags:
        try:
            line = subprocess.run(["scontrol", "show", "job", "--oneliner", tags["slurm.job_id"]], capture_output=True, text=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return tags
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        tags.update({tag: fields[key] for tag, key in SCONTROL_FIELDS.items() if fields.get(key)})
    return tags


def runtime_tags(stage: str, **extra) -> dict:
    """Tags that let a user reproduce and locate a run: code version, where and how it ran."""
    import torch

    tags = {
        "snakemake.rule": stage,
        "hostname": socket.gethostname(),
        "hpcdl.version": hpcdl.__version__,
        "torch.version": torch.__version__,
        "python.version": platform.python_version(),
        **git_state(),
        **slurm_tags(),
    }
    tags.update({key: str(value) for key, value in extra.items() if value is not None})
    return tags


def flatten(params: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}; lists become comma-separated strings."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(map(str, value))
        else:
            flat[name] = value
    return flat


def read_parent_run_id(path) -> str | None:
    """The invocation's parent run id; None (a top-level run, with a warning) when Snakemake ran without its
    onstart hook (--no-hooks) or the stage runs by hand."""
    path = Path(path)
    run_id = path.read_text().strip() if path.exists() else ""
    if not run_id:
        print(f"hpcdl: no parent MLflow run id in {path}; logging a top-level run", file=sys.stderr, flush=True)
        return None
    return run_id


@contextlib.contextmanager
def stage_run(mlflow_cfg: dict, *, stage: str, parent_run_file=None, run_id: str | None = None, tags: dict | None = None):
    """The stage's child run (or the run `run_id` when resuming): active inside the block, FAILED on error."""
    experiment_id = configure(mlflow_cfg)
    if run_id is not None:
        context = mlflow.start_run(run_id=run_id)
    else:
        parent = read_parent_run_id(parent_run_file) if parent_run_file else None
        context = mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent, tags=tags)
    with context as run:
        if run_id is not None and tags:
            mlflow.set_tags(tags)
        yield run


def log_dataset(x, y, *, name: str, context: str, sha256: dict, source: str) -> None:
    """Record a split as an MLflow dataset input, with the sha256 of its files from the manifest."""
    # The digest MLflow shows is the images file's sha256 (short form); the full digests go in the input's tags.
    digest = next(iter(sha256.values()))[:16] if sha256 else None
    with warnings.catch_warnings():  # MLflow 3.17 registers its local-file source class twice and warns about it
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        dataset = mlflow.data.from_numpy(features=x, targets=y, name=name, source=source, digest=digest)
    mlflow.log_input(dataset, context=context, tags={f"sha256.{k}": v for k, v in sha256.items()})


def print_where(mlflow_cfg: dict, run) -> None:
    experiment_id = run.info.experiment_id
    print(f"hpcdl: MLflow run {run.info.run_id} in {mlflow_cfg['tracking_uri']}; runs table: {runs_url(mlflow_cfg, experiment_id)}", file=sys.stderr, flush=True)


def resumable_run_id(checkpoint_dir: Path, digest: str) -> str | None:
    """The MLflow run that an interrupted attempt with the same settings was logging to, if any."""
    path = Path(checkpoint_dir) / "mlflow_run.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved["run_id"] if saved.get("digest") == digest else None


def remember_run_id(checkpoint_dir: Path, digest: str, run_id: str) -> None:
    atomic_write_json(Path(checkpoint_dir) / "mlflow_run.json", {"run_id": run_id, "digest": digest})
