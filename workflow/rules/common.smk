# Names and helpers shared by workflow/rules/*.smk: paths, the stage interpreter, the per-stage parameter JSON.
import glob
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake_interface_executor_plugins.settings import DeploymentMethod

import hpcdl
from hpcdl.checkout import export_git_state
from hpcdl.launch import LOCAL_MPIRUN, oversubscription_warning
from hpcdl.mlflow_parent import ParentRun
from hpcdl.slurm_job import export_slurm_tags
from hpcdl.sweep_grid import POINT_PATTERN, grid_points, point_train_config

RESULTS = config["results"].rstrip("/")
# The parent MLflow run of this invocation: its id is written here by the onstart handler and read by every
# stage (a path in params, not an input: a job producing a file that every stage consumes would make Snakemake
# re-run every stage whenever it runs, so no incremental re-run would be possible).
PARENT_RUN = f"{RESULTS}/.mlflow_parent_run"
PARENT_LOG = f"{RESULTS}/logs/mlflow_parent.log"
ROLES = ("pretrain", "finetune")
# What rules finetune and autoencode take from the `train` section: how the ranks compute, not what they learn.
TRAIN_COMPUTE_KEYS = ("backend", "compression", "precision", "memory_format", "grad_accum_steps", "nesterov", "schedule", "warmup_epochs")

# --- Where the stages run: on the host, or in the Apptainer image (`--sdm apptainer`, as profiles/apptainer and
# profiles/slurm set) --------------------------------------------------------------------------------------------
# The onstart/onsuccess hooks and record_image always run on the host, with the interpreter running Snakemake.
HOST_PYTHON = sys.executable
IMAGE = config["container"]
# What the stages run: the image file, or with `container_sandbox` the folder rule unpack_image unpacks it into
# (an ordinary file system instead of a squashfuse mount per stage: faster start-up, README P8).
SANDBOX = (config["container_sandbox"] or "").rstrip("/") or None
STAGE_IMAGE = SANDBOX or IMAGE
SANDBOX_DIGEST = f"{SANDBOX}.sha256" if SANDBOX else None  # beside the folder: the SIF it came from (unpack_image)
IN_APPTAINER = DeploymentMethod.APPTAINER in workflow.deployment_settings.deployment_method
# What record_image writes and every stage tags its MLflow run with (image path, sha256, apptainer version).
IMAGE_RECORD = f"{RESULTS}/container.json"
MLFLOW_CREDENTIALS = os.path.expanduser("~/.mlflow")  # MLflow's own place for a user's server credentials
# Where the stages in the image find that folder: a path inside the image (its empty /mnt), not on this machine.
IMAGE_CREDENTIALS = os.path.join(os.sep, "mnt", "mlflow")
if IN_APPTAINER and (config["tracking_uri"] or "").startswith(("http://", "https://")):
    # In the image a stage's home is the workflow folder (--home): the user's credentials file goes in read-only at
    # a fixed place, which the stages read (hpcdl.mlflow_store.use_credentials_file). Only its path is passed on.
    if os.path.isfile(f"{MLFLOW_CREDENTIALS}/credentials") and IMAGE_CREDENTIALS not in workflow.deployment_settings.apptainer_args:
        workflow.deployment_settings.apptainer_args += (
            f" --bind {shlex.quote(MLFLOW_CREDENTIALS)}:{IMAGE_CREDENTIALS}:ro"
            f" --env HPCDL_MLFLOW_CREDENTIALS={IMAGE_CREDENTIALS}/credentials"
        )
if IN_APPTAINER:
    # Plain rules (fetch, preprocess, evaluate) carry `container: STAGE_IMAGE`: Snakemake wraps their shell in
    # `apptainer exec --home <workdir> <apptainer-args> STAGE_IMAGE`, where `python` is the image's venv.
    STAGE_PYTHON = "python"
    # The MPI rules (train, finetune) carry no container directive: Snakemake would wrap their whole shell,
    # mpirun/srun included, in the image. They start host MPI, and each rank enters the image itself (the
    # hybrid model) through workflow/scripts/rank-in-image.sh, with the same apptainer arguments Snakemake gives
    # the plain rules; the script, run on each rank's node, adds that node's $TMPDIR, where the node's ranks
    # share Open MPI's session directory and shared-memory files.
    MPI_STAGE_PYTHON = (
        f"{shlex.quote(os.path.join(workflow.basedir, 'workflow/scripts/rank-in-image.sh'))} {shlex.quote(STAGE_IMAGE)}"
        f" --home {shlex.quote(os.getcwd())} {workflow.deployment_settings.apptainer_args} -- python"
    )
else:
    STAGE_PYTHON = MPI_STAGE_PYTHON = HOST_PYTHON
# The image has neither git nor scontrol: the stages read the checkout's commit and their Slurm job's record from
# the environment the jobs inherit (Snakemake parses this file again inside each Slurm job, on the host).
export_git_state()
export_slurm_tags()


def image_input():
    """The image record as an input of every stage (when the stages run in Apptainer), so that a rebuilt image
    re-runs them (Snakemake's own rule for changed inputs), and nothing on the host."""
    return {"image_record": IMAGE_RECORD} if IN_APPTAINER else {}


wildcard_constraints:
    role="|".join(ROLES),


# Offline MLflow stores of jobs that could not reach the tracking server (hpcdl.mlflow_store), synced at the end.
OFFLINE_DIR = os.path.abspath(f"{RESULTS}/mlflow-offline")


def tracking_uri():
    """The configured MLflow tracking URI, or a SQLite file under the results folder (absolute: ranks and
    containers may run in another working directory)."""
    return config["tracking_uri"] or f"sqlite:///{os.path.abspath(RESULTS)}/mlflow.db"


def stage_params(**sections):
    """JSON handed to a stage module: only the config sections that stage uses (so editing one stage's keys
    re-runs only that stage) plus where to track it."""
    payload = {"mlflow": {"tracking_uri": tracking_uri(), "experiment": config["experiment"],
                          "offline": config["tracking_offline"], "offline_dir": OFFLINE_DIR}}
    if IN_APPTAINER:
        payload["image_record"] = IMAGE_RECORD
    payload.update(sections)
    return json.dumps(payload, sort_keys=True)


def split_files(role):
    return {
        f"{split}_{part}": f"{RESULTS}/data/{role}/{split}_{part}.npy"
        for split in ("train", "val", "test")
        for part in ("x", "y")
    }


def mpi_resources(stage, cfg=None):
    """The Slurm geometry of an MPI stage from its config section `cfg` (default config[stage]; a sweep point
    passes its own train section): `nodes`, and its `ranks` spread evenly over them.
    The executor plugin takes either `tasks` (--ntasks) or `tasks_per_node` (--ntasks-per-node, which it accepts
    only above 1 for MPI jobs); N ranks on N nodes are --ntasks=N --nodes=N, one per node by Slurm's own rule."""
    cfg = config[stage] if cfg is None else cfg
    ranks, nodes = cfg["ranks"], cfg["nodes"]
    if nodes > 1 and ranks // nodes > 1:
        return {"nodes": nodes, "tasks_per_node": ranks // nodes}
    return {"nodes": nodes, "tasks": ranks}


def mpi_launch(resources, stage, cfg=None):
    """The command that starts a stage's ranks. On Slurm: `srun --mpi=pmix -n <ranks> -N <nodes>
    --ntasks-per-node=<ranks / nodes> --cpus-per-task=<threads> --kill-on-bad-exit=1`: the geometry is explicit
    because an srun inside an allocation inherits none of it (the jobstep executor removes SLURM_* variables, and
    Slurm >= 22.05 no longer passes --cpus-per-task on); --kill-on-bad-exit ends the step when one rank dies, so no
    rank on another node waits in a collective for it. Locally: mpirun -n <ranks> on this one machine.
    cfg: the stage's config section (default config[stage])."""
    cfg = config[stage] if cfg is None else cfg
    ranks, nodes, threads = cfg["ranks"], cfg["nodes"], cfg["threads_per_rank"]
    if resources.mpi.split()[0] == "srun":
        return (f"{resources.mpi} -n {ranks} -N {nodes} --ntasks-per-node={ranks // nodes} --cpus-per-task={threads}"
                " --kill-on-bad-exit=1")
    return f"{resources.mpi} -n {ranks}"


def launch_warning(resources, stage, cfg=None):
    """`echo <warning>; ` when a local launch (mpirun) asks for more ranks x threads than this machine's cores
    (it then runs oversubscribed) or for several nodes (a local run has one), else nothing; on Slurm the
    allocation decides. cfg: the stage's config section (default config[stage])."""
    if resources.mpi.split()[0] == "srun":
        return ""
    cfg = config[stage] if cfg is None else cfg
    warnings = [oversubscription_warning(cfg["ranks"], cfg["threads_per_rank"])]
    if cfg["nodes"] > 1:
        warnings.append(f"hpcdl: warning: {stage}.nodes={cfg['nodes']} has no effect in a local run: all "
                        f"{cfg['ranks']} ranks run on this machine (the Slurm profiles spread them over nodes)")
    return "".join(f"echo {shlex.quote(w)}; " for w in warnings if w)


# The rules whose jobs log MLflow runs: an invocation without any (`snakemake build_images`) opens no parent run.
STAGE_RULES = {"fetch", "fetch_weights", "preprocess", "train", "autoencode", "evaluate", "finetune"}
PARENT = []  # this invocation's hpcdl.mlflow_parent.ParentRun, once onstart has opened it


def open_parent_run():
    """onstart: open the parent run with the whole config as params (runs on the submitting host). The first contact
    with the tracking store: a server that refuses the credentials stops the workflow here, before any job, and
    nothing is written under the results folder. The process that opened it stays until onsuccess/onerror (or
    Snakemake's end) closes it: hpcdl.mlflow_parent says why."""
    if not any(job.rule.name in STAGE_RULES for job in workflow.dag.needrun_jobs()):
        return
    parent, output, errors = ParentRun.open(HOST_PYTHON, stage_params(config=config), PARENT_RUN, Path(PARENT_LOG))
    if parent is None:
        raise WorkflowError(f"could not open the workflow's MLflow run:\n{(errors or output).strip()[-2000:]}")
    PARENT.append(parent)
    sys.stdout.write(output)


def close_parent_run(status):
    """onsuccess/onerror: mark this invocation's parent run finished or failed (no-op if none was opened), then copy
    the runs that jobs logged offline into the tracking server (hpcdl.mlflow_sync)."""
    if not PARENT:
        return
    PARENT.pop().close(status, HOST_PYTHON)
    if tracking_uri().startswith(("http://", "https://")) and glob.glob(f"{OFFLINE_DIR}/*.db"):
        synced = subprocess.run([HOST_PYTHON, "-m", "hpcdl.mlflow_sync", OFFLINE_DIR, tracking_uri()])
        if synced.returncode != 0:
            print(f"hpcdl: the offline runs are not in the server yet; run later: python -m hpcdl.mlflow_sync {OFFLINE_DIR} {tracking_uri()}", file=sys.stderr)


def finetune_init_file(wildcards):
    """The model fine-tuning starts from: this workflow's pretrained model, its autoencoder (whose encoder it
    takes) or fetched torchvision weights."""
    init = config["finetune"]["init"]
    if init == "pretrain":
        return f"{RESULTS}/train/model.pt"
    if init == "autoencoder":
        return f"{RESULTS}/autoencode/model.pt"
    return f"{RESULTS}/raw/weights/{init.split(':', 1)[1]}.pth"


# --- Sweeps (config `sweep`, rules in sweep.smk): one training per point of sweep.grid, named by a wildcard
# (`batch_size=64,lr=0.1`, hpcdl.sweep_grid); a point's params, threads and Slurm geometry come from its own values
# alone, so a grown grid runs only the new points.
SWEEP_POINTS = grid_points(config["sweep"]["grid"])
SWEEP_DIR = f"{RESULTS}/sweep"
SWEEP_TARGETS = [f"{SWEEP_DIR}/summary.csv"] if SWEEP_POINTS else []  # what `rule all` adds for a sweep
STAGE_RULES.update({"train_sweep", "sweep_summary"})  # their jobs log MLflow runs: they open the parent run


def sweep_point(wildcards):
    """The swept values of the point a job trains (a point outside sweep.grid is refused)."""
    if wildcards.point not in SWEEP_POINTS:
        raise WorkflowError(f"sweep point {wildcards.point!r} is not in sweep.grid (its points: {', '.join(SWEEP_POINTS) or 'none'})")
    return SWEEP_POINTS[wildcards.point]


def sweep_train(wildcards):
    """The point's train section: config `train` with the point's values substituted."""
    return point_train_config(config["train"], sweep_point(wildcards))


def sweep_metrics(wildcards):
    """The metrics.json of every point, in grid order: the summary's input."""
    if not SWEEP_POINTS:
        raise WorkflowError("sweep.grid is empty: there is no sweep to summarise (set e.g. sweep.grid: {train.batch_size: [32, 64]})")
    return expand(f"{SWEEP_DIR}/{{point}}/train/metrics.json", point=list(SWEEP_POINTS))


# --- ONNX export (config `onnx`; the rule: onnx.smk): the trained and the fine-tuned model, each checked by ONNX
# Runtime on the test split of its own dataset. Which model (the wildcard, also the folder of its model.pt) is
# checked on which dataset role:
ONNX_MODELS = {"train": "pretrain", "finetune": "finetune"}
ONNX_TARGETS = [f"{RESULTS}/onnx/{name}.onnx" for name in ONNX_MODELS] if config["onnx"]["export"] else []  # for `rule all`
STAGE_RULES.add("export_onnx")  # its jobs log MLflow runs: they open the parent run


def onnx_data(wildcards):
    """The dataset (manifest and splits) whose test split an exported model is checked on."""
    role = ONNX_MODELS[wildcards.model]
    return {"manifest": f"{RESULTS}/data/{role}/manifest.json", **split_files(role)}
