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
import sys
import warnings
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

import hpcdl
from hpcdl.atomic import atomic_write_json
from hpcdl.checkout import git_state
from hpcdl.mlflow_store import CONTINUES_RUN, CONTINUES_STORE, Store, choose_store, file_store, is_server
from hpcdl.slurm_job import slurm_tags


def configure(mlflow_cfg: dict, job: str = "workflow") -> tuple[str, Store]:
    """Point MLflow at the store this job logs to (the configured one, or its offline store: hpcdl.mlflow_store)
    and make sure the experiment exists there; returns (experiment id, store)."""
    store = choose_store(mlflow_cfg, job)
    return use_store(store, mlflow_cfg["experiment"]), store


def use_store(store: Store, experiment_name: str) -> str:
    """Make `store` MLflow's current one and return the id of the experiment there (created when missing; a file
    store keeps its artifacts beside it, a tracking server decides itself)."""
    mlflow.set_tracking_uri(store.uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        try:
            return client.create_experiment(experiment_name, artifact_location=store.artifact_location, tags=EXPERIMENT_TAGS)
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(experiment_name)
    if any(experiment.tags.get(key) != value for key, value in EXPERIMENT_TAGS.items()):
        for key, value in EXPERIMENT_TAGS.items():
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


# MLflow 3's UI opens an experiment in its GenAI mode unless told otherwise: this tag marks the experiment as
# classic model development, and the links hpcdl prints carry the UI's workflowType parameter too.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
UI_MODE = "workflowType=machine_learning"


def runs_url(mlflow_cfg: dict, experiment_id: str) -> str:
    """Where a user sees the run tree: the classic runs table in the UI's "Model training" mode (MLflow 3.x opens
    an experiment on its GenAI overview otherwise)."""
    uri = mlflow_cfg["tracking_uri"]
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?{UI_MODE}"


IMAGE_BUILD_INFO = Path("/opt/hpcdl/build-info.json")  # written by containers/hpcdl.def


def container_tags(image_record) -> dict:
    """Which Apptainer image the stage ran in: path, sha256 and apptainer version from the record the
    `record_image` rule wrote on the host, plus the project version and commit built into the image.

    The record says the workflow runs the stages in containers; a stage that is not inside that image (no
    APPTAINER_CONTAINER, no /.singularity.d, or another image) stops here rather than tag a run with an image that
    did not produce it."""
    if image_record is None:  # the stages run on the host
        return {}
    record = json.loads(Path(image_record).read_text())
    image = os.environ.get("APPTAINER_CONTAINER")
    if not image or not Path("/.singularity.d").is_dir():
        raise RuntimeError(
            f"{image_record} says the stages run in the Apptainer image {record['image']}, but this process is not "
            "inside an Apptainer container (APPTAINER_CONTAINER is unset or /.singularity.d is missing)"
        )
    if os.path.normpath(image) != os.path.normpath(record["image"]):
        raise RuntimeError(f"this stage runs in the image {image}, but {image_record} records {record['image']}")
    build = json.loads(IMAGE_BUILD_INFO.read_text()) if IMAGE_BUILD_INFO.is_file() else {}
    return {
        "hpcdl.container": "apptainer",
        "hpcdl.image.path": record["image"],
        "hpcdl.image.sha256": record["sha256"],
        "hpcdl.image.version": build.get("version", "unknown"),
        "hpcdl.image.git_commit": build.get("git_commit", "unknown"),
        "apptainer.version": record["apptainer"],
        **({"hpcdl.image.unpacked_from": record["unpacked_from"]} if "unpacked_from" in record else {}),
    }


def torch_version() -> str:
    """torch.__version__ without importing torch where it is not loaded yet (the onstart hook, fetch: about 1.5 s)."""
    if "torch" in sys.modules:
        return sys.modules["torch"].__version__
    # torch/version.py, read as torch's own __init__ reads it (the distribution's metadata lacks the +cu130 part)
    import importlib.util

    namespace: dict = {}
    exec(Path(importlib.util.find_spec("torch").submodule_search_locations[0], "version.py").read_text(), namespace)
    return namespace["__version__"]


def runtime_tags(stage: str, image_record=None, **extra) -> dict:
    """Tags that let a user reproduce and locate a run: code version, where and how it ran, and in which image
    (image_record: the `record_image` rule's JSON when the stages run in Apptainer, else None)."""
    tags = {
        **container_tags(image_record),
        "snakemake.rule": stage,
        "hostname": socket.gethostname(),
        "hpcdl.version": hpcdl.__version__,
        "torch.version": torch_version(),
        "python.version": platform.python_version(),
        **git_state(),
        **slurm_tags(),
    }
    if os.environ.get("HPCDL_REPRODUCES"):  # set by hpcdl.reproduce: the run this one re-creates
        tags["hpcdl.reproduces"] = os.environ["HPCDL_REPRODUCES"]
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
def stage_run(mlflow_cfg: dict, *, stage: str, parent_run_file=None, resume: dict | None = None, tags: dict | None = None, run_name: str | None = None):
    """The stage's child run, active inside the block (FAILED on error). run_name: what the runs table shows (default:
    the stage; fetch and preprocess add their role). `resume` ({run_id, tracking_uri} of an interrupted attempt
    with the same settings, from remember_run): that run goes on, in the store it lives in. An offline run stays
    one offline run; a server run the job cannot reach now goes on in a new offline run tagged to continue it
    (the sync merges the two)."""
    job = run_name or stage
    store = choose_store(mlflow_cfg, job)
    run_id, continues = None, {}
    if resume is not None:
        recorded = resume.get("tracking_uri", store.uri)
        if recorded == store.uri:
            run_id = resume["run_id"]
        elif not is_server(recorded):
            store, run_id = file_store(recorded), resume["run_id"]
        else:
            continues = {CONTINUES_RUN: resume["run_id"], CONTINUES_STORE: recorded}
    experiment_id = use_store(store, mlflow_cfg["experiment"])
    if run_id is not None:
        context = mlflow.start_run(run_id=run_id)
    else:
        parent = read_parent_run_id(parent_run_file) if parent_run_file else None
        # The parent as a tag, not start_run(parent_run_id=...), which looks the parent up: an offline run's parent
        # lives in another store (the server, or the workflow's own offline store); the sync maps it.
        nesting = {"mlflow.parentRunId": parent} if parent else {}
        context = mlflow.start_run(experiment_id=experiment_id, run_name=job, tags={**(tags or {}), **nesting, **continues})
    with context as run:
        if run_id is not None and tags:
            mlflow.set_tags(tags)
        yield run


def is_continuation(run) -> bool:
    """An offline run that continues a server run (see stage_run)."""
    return CONTINUES_RUN in run.data.tags


def log_dataset(x, y, *, name: str, context: str, sha256: dict, source: str) -> None:
    """Record a split as an MLflow dataset input, with the sha256 of its files from the manifest."""
    # The digest MLflow shows is the images file's sha256 (short form); the full digests go in the input's tags.
    digest = next(iter(sha256.values()))[:16] if sha256 else None
    with warnings.catch_warnings():  # MLflow 3.17 registers its local-file source class twice and warns about it
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        dataset = mlflow.data.from_numpy(features=x, targets=y, name=name, source=source, digest=digest)
    mlflow.log_input(dataset, context=context, tags={f"sha256.{k}": v for k, v in sha256.items()})


def print_where(mlflow_cfg: dict, run) -> None:
    uri = mlflow.get_tracking_uri()
    where = f"runs table: {runs_url(mlflow_cfg, run.info.experiment_id)}" if uri == mlflow_cfg["tracking_uri"] else "offline store, synced later"
    print(f"hpcdl: MLflow run {run.info.run_id} in {uri}; {where}", file=sys.stderr, flush=True)


def print_resuming(resume_run: dict, run, epoch: int | None = None) -> None:
    where = "" if run.info.run_id == resume_run["run_id"] else f", continued in offline run {run.info.run_id} (the sync merges it)"
    at = "" if epoch is None else f" from epoch {epoch}"
    print(f"hpcdl: resuming MLflow run {resume_run['run_id']}{at}{where}", flush=True)


def resumable_run(checkpoint_dir: Path, digest: str) -> dict | None:
    """The MLflow run ({run_id, tracking_uri}) that an interrupted attempt with the same settings logged to."""
    path = Path(checkpoint_dir) / "mlflow_run.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("digest") == digest else None


def remember_run(checkpoint_dir: Path, digest: str, run) -> None:
    """Record the run a resumed attempt must go on with (a continuation run is not it: the server run it
    continues stays the one to resume)."""
    if not is_continuation(run):
        record = {"run_id": run.info.run_id, "tracking_uri": mlflow.get_tracking_uri(), "digest": digest}
        atomic_write_json(Path(checkpoint_dir) / "mlflow_run.json", record)
