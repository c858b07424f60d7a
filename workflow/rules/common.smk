# Names and helpers shared by workflow/rules/*.smk: paths, the stage interpreter, the per-stage parameter JSON.
import json
import os
import shlex
import subprocess
import sys

RESULTS = config["results"].rstrip("/")
# The interpreter that runs the stages: the one running Snakemake (the project's venv) unless overridden,
# e.g. HPCDL_PYTHON="apptainer exec image.sif python3" once the stages run in containers.
PYTHON = os.environ.get("HPCDL_PYTHON", sys.executable)
# The parent MLflow run of this invocation: its id is written here by the onstart handler and read by every
# stage (a path in params, not an input: a job producing a file that every stage consumes would make Snakemake
# re-run every stage whenever it runs, so no incremental re-run would be possible).
PARENT_RUN = f"{RESULTS}/.mlflow_parent_run"
PARENT_LOG = f"{RESULTS}/logs/mlflow_parent.log"
ROLES = ("pretrain", "finetune")
# The Apptainer image of the non-MPI stages, used when Snakemake runs with `--sdm apptainer`. The MPI stages
# (train, finetune) carry no container directive on purpose: Snakemake would wrap their whole shell, mpirun/srun
# included, in the container; they launch host MPI around the image themselves.
CONTAINER = config["container"]


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


def mpi_launch(resources):
    """The command that starts a rule's ranks: `{mpi} -n {tasks}`; srun also gets --cpus-per-task, which an srun
    inside an allocation does not inherit (Slurm >= 22.05), so each rank keeps its threads_per_rank CPUs."""
    launcher = f"{resources.mpi} -n {resources.tasks}"
    if resources.mpi.split()[0] == "srun":
        launcher += f" --cpus-per-task={resources.cpus_per_task}"
    return launcher


def open_parent_run():
    """onstart: open the parent run with the whole config as params (runs on the submitting host)."""
    os.makedirs(os.path.dirname(PARENT_LOG), exist_ok=True)
    with open(PARENT_LOG, "w") as log:
        command = [*shlex.split(PYTHON), "-m", "hpcdl.mlflow_parent", "open", "--params", stage_params(config=config), "--out", PARENT_RUN]
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)


def close_parent_run(status):
    """onsuccess/onerror: mark this invocation's parent run finished or failed (no-op if none was opened)."""
    if os.path.exists(PARENT_LOG):
        subprocess.run([*shlex.split(PYTHON), "-m", "hpcdl.mlflow_parent", "close", "--log", PARENT_LOG, "--status", status])


def finetune_init_file(wildcards):
    """The model fine-tuning starts from: this workflow's pretrained model or fetched torchvision weights."""
    init = config["finetune"]["init"]
    if init == "pretrain":
        return f"{RESULTS}/train/model.pt"
    return f"{RESULTS}/raw/weights/{init.split(':', 1)[1]}.pth"
