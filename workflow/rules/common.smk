# Shared names and helpers of the rule files: paths, the stage launcher and the per-stage parameter JSON.
import json
import os
import sys

RESULTS = config["results"].rstrip("/")
# The interpreter that runs the stages: the one running Snakemake (the project's venv) unless overridden,
# e.g. HPCDL_PYTHON="apptainer exec image.sif python3" once the stages run in containers.
PYTHON = os.environ.get("HPCDL_PYTHON", sys.executable)
# The parent MLflow run of this invocation: written by rule mlflow_parent, read by every stage. It is temp() so
# that each invocation that has work to do opens a fresh parent run; stages take it as ancient() input so a new
# parent never makes finished stages look outdated.
PARENT_RUN = f"{RESULTS}/.mlflow_parent_run"
PARENT_LOG = f"{RESULTS}/logs/mlflow_parent.log"
ROLES = ("pretrain", "finetune")


wildcard_constraints:
    role="|".join(ROLES),


def tracking_uri():
    """The configured MLflow tracking URI, or a SQLite file under the results folder (absolute: ranks and
    containers may run in another working directory)."""
    return config["tracking_uri"] or f"sqlite:///{os.path.abspath(RESULTS)}/mlflow.db"


def stage_params(**sections):
    """JSON handed to a stage module: only the config sections that stage uses (so editing one stage's keys
    re-runs only that stage) plus where to track it."""
    payload = {"mlflow": {"tracking_uri": tracking_uri(), "experiment": config["experiment"]}}
    payload.update(sections)
    return json.dumps(payload, sort_keys=True)


def split_files(role):
    return {
        f"{split}_{part}": f"{RESULTS}/data/{role}/{split}_{part}.npy"
        for split in ("train", "val", "test")
        for part in ("x", "y")
    }


def close_parent_run(status):
    """onsuccess/onerror: mark this invocation's parent run finished or failed (no-op if none was opened)."""
    if os.path.exists(PARENT_LOG):
        shell(f"{PYTHON} -m hpcdl.mlflow_parent close --log {PARENT_LOG} --status {status} || true")
