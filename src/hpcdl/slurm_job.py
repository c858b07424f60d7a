"""The Slurm job a stage runs in, as MLflow tags, so a user can go from a run in the UI to `sacct -j <job id>`.
No MLflow or torch imports: the Snakefile calls export_slurm_tags() at parse time."""

from __future__ import annotations

import json
import os
import subprocess

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
EXPORTED = "HPCDL_SLURM_TAGS"  # the job's tags, as JSON, for processes without scontrol (inside the image)


def slurm_tags() -> dict:
    """Tags of the job this process runs in ({} outside Slurm).

    Inside a job step the environment describes the step (srun names it after the program, and the jobstep
    executor strips most SLURM_* variables), so the job's own record from `scontrol show job` wins. Inside the
    Apptainer image there is no scontrol: the tags the Snakefile exported on the host (same job) are used."""
    tags = {tag: os.environ[var] for tag, var in SLURM_TAGS.items() if var in os.environ}
    if "slurm.job_id" not in tags:
        return tags
    exported = json.loads(os.environ.get(EXPORTED, "{}"))
    if exported.get("slurm.job_id") == tags["slurm.job_id"]:
        return {**tags, **exported}
    try:
        line = subprocess.run(["scontrol", "show", "job", "--oneliner", tags["slurm.job_id"]], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return tags
    fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
    tags.update({tag: fields[key] for tag, key in SCONTROL_FIELDS.items() if fields.get(key)})
    return tags


def export_slurm_tags() -> None:
    """In a Slurm job, put the job's tags in the environment that the stage processes (and containers) inherit."""
    if "SLURM_JOB_ID" in os.environ:
        os.environ[EXPORTED] = json.dumps(slurm_tags())
