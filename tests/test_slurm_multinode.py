"""Data-parallel training across the nodes of the test cluster (tests/slurm/cluster-up.sh: nodes n1 and n2, each with
its own host name and node-local /tmp, sharing every other folder as a cluster shares its file system):

1. the same losses on 2 nodes x 1 rank as on 1 node x 2 ranks, for both backends (srun directly);
2. a rank killed on one node, training through the users' profile (train.nodes): the job ends within 60 s (no rank
   left waiting in a collective), Snakemake's retry resumes from the last checkpoint, and the MLflow run goes on as
   one run with every epoch exactly once.
Train and finetune across 2 nodes through the profile, for both backends (the MLflow runs name every node, nothing
that rank 0 writes lands in a node-local folder), run in the image on this cluster, as users run them:
tests/test_containers.py (test_pipeline_in_the_image_on_slurm, test_torch_backend_across_two_nodes_in_the_image).
Root on Debian (skipped elsewhere, failed under CI=true)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import train_config
from slurm_fixtures import SNAKEMAKE, chown_tree, run_snakemake, squeue

PROFILE = "profiles/slurm-test"
RUN_FIELDS = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=sys.argv[1])
experiment = client.get_experiment_by_name(sys.argv[2])
runs = client.search_runs([experiment.experiment_id], max_results=1000)
print(json.dumps([{"id": r.info.run_id, "name": r.info.run_name, "status": r.info.status, "tags": r.data.tags,
                   "steps": sorted(m.step for m in client.get_metric_history(r.info.run_id, "loss"))} for r in runs]))
"""


def runs_of(user, results: Path, experiment: str = "hpcdl-default", store: str = "mlflow.db") -> list[dict]:
    dump = user.run([sys.executable, "-c", RUN_FIELDS, f"sqlite:///{results}/{store}", experiment], cwd=results, timeout=300, check=True)
    return json.loads(dump.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def shared_data(slurm_cluster, slurm_user, slurm_workdir):
    """scikit-learn's digits preprocessed at 16x16 on the shared file system (the tests' usual copy lies under /tmp,
    which every node has its own of)."""
    from hpcdl.data.prepare import write_dataset
    from hpcdl.data.sources import fetch_source, load_raw

    root = slurm_workdir("multinode-data")
    provenance = fetch_source({"source": "digits"}, root / "raw")
    images, labels, classes = load_raw(root / "raw")
    write_dataset(root / "data", images, labels, classes, image_size=16, channels=1, val_fraction=0.1, test_fraction=0.2, seed=0, provenance=provenance)
    chown_tree(root, slurm_user)
    return root


@pytest.fixture(scope="module")
def workdir_with_data(slurm_cluster, slurm_user, slurm_workdir):
    """Factory: a work dir whose results already hold the fetched and preprocessed datasets (made once, by a local
    `snakemake` of the data stages as the user), so that these tests spend their time on train and finetune."""
    seed = slurm_workdir("multinode-seed")
    data = run_snakemake(slurm_user, seed, "--cores", "2", "--", "results/data/pretrain/manifest.json", "results/data/finetune/manifest.json", timeout=600)
    assert data.returncode == 0, (data.stdout + data.stderr)[-4000:]

    def make(name: str) -> Path:
        workdir = slurm_workdir(name)
        for folder in ("raw", "data"):
            shutil.copytree(seed / "results" / folder, workdir / "results" / folder)  # copy2: mtimes kept, nothing re-runs
        chown_tree(workdir, slurm_user)
        return workdir

    return make


def srun_train(user, root: Path, name: str, *, nodes: int, ranks: int, backend: str) -> list[float]:
    """One training job on the cluster, its ranks started by srun as the rules start them (srun from the login
    node allocates and runs in one blocking call); its per-epoch losses, after checking where the ranks ran."""
    cfg = train_config(epochs=3, backend=backend, ranks=ranks, augment=[])
    params = json.dumps({"mlflow": {"tracking_uri": f"sqlite:///{root}/{name}.db", "experiment": name}, "train": cfg})
    job = user.run(["srun", "--mpi=pmix", "-n", str(ranks), "-N", str(nodes), f"--ntasks-per-node={ranks // nodes}", "--cpus-per-task=1",
                    "--kill-on-bad-exit=1", "-t", "10", sys.executable, "-m", "hpcdl.train", "--params", params,
                    "--data-dir", f"{root}/data", "--out-dir", f"{root}/{name}"], cwd=root, timeout=600)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    (run,) = runs_of(user, root, experiment=name, store=f"{name}.db")
    assert run["tags"]["nodes"] == str(nodes) and run["tags"]["world_size"] == str(ranks), run["tags"]
    return [epoch["loss"] for epoch in json.loads((root / name / "metrics.json").read_text())["history"]]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_two_nodes_train_exactly_as_one_node_with_the_same_ranks(shared_data, slurm_user, backend):
    """Placement is not a change of result: 2 nodes x 1 rank (TCP between the ranks) gives the losses of 1 node x 2
    ranks (shared memory), as in the single-node parity tests."""
    one_node = srun_train(slurm_user, shared_data, f"{backend}-1x2", nodes=1, ranks=2, backend=backend)
    two_nodes = srun_train(slurm_user, shared_data, f"{backend}-2x1", nodes=2, ranks=2, backend=backend)
    assert one_node[-1] < one_node[0], one_node
    np.testing.assert_allclose(two_nodes, one_node, rtol=1e-5)


def rank_processes(rank: int) -> list[int]:
    """Pids of `python -m hpcdl.train` processes of MPI rank `rank` (Slurm's SLURM_PROCID in their environment)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"hpcdl.train" in cmdline and f"SLURM_PROCID={rank}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def checkpoint_epoch(path: Path) -> int:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)["epoch"]
    except (OSError, EOFError, RuntimeError):
        return 0


@pytest.mark.slow
def test_a_rank_killed_on_one_node_ends_the_job_and_the_retry_resumes_one_run(slurm_cluster, slurm_user, workdir_with_data):
    workdir = workdir_with_data("two-nodes-fault")
    epochs = 30
    (workdir / "fault.yaml").write_text(yaml.safe_dump({"train": {"nodes": 2, "ranks": 2, "epochs": epochs}}))
    chown_tree(workdir, slurm_user)
    checkpoint = workdir / "results" / "train" / "checkpoints" / "train.pt"
    args = ["--profile", PROFILE, "--retries", "1", "--configfile", "config/config.yaml", "fault.yaml", "--", "results/train/model.pt"]
    log_path = workdir / "snakemake.log"
    with log_path.open("w") as out:
        proc = slurm_user.popen([SNAKEMAKE, *args], cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while checkpoint_epoch(checkpoint) < 2:
                assert time.monotonic() < deadline and proc.poll() is None, "training never reached its second epoch"
                time.sleep(0.5)
            job_id = next(line.split()[0] for line in squeue("-o", "%i %k").splitlines() if line.split()[1:] == ["rule_train"])
            victims = rank_processes(1)
            assert victims, "rank 1 not found"
            killed_at = time.monotonic()
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            while squeue("-j", job_id, "-t", "RUNNING,COMPLETING", "-o", "%i").strip():
                assert time.monotonic() - killed_at < 60, "the job still runs 60 s after one of its ranks died"
                time.sleep(0.5)
            ended_after = time.monotonic() - killed_at
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    output = log_path.read_text()
    assert proc.returncode == 0, output[-6000:]
    print(f"killed rank 1 on n2: the job ended {ended_after:.1f} s later; Snakemake's retry finished the training")
    train_log = (workdir / "results" / "logs" / "train.log").read_text()
    resumed = re.search(r"resuming MLflow run (\w+) from epoch (\d+)", train_log)
    assert resumed and int(resumed.group(2)) >= 2, train_log[-3000:]
    (train,) = [r for r in runs_of(slurm_user, workdir / "results") if r["name"] == "train"]
    assert train["id"] == resumed.group(1) and train["status"] == "FINISHED"
    assert train["steps"] == list(range(epochs)), "one MLflow run, every epoch exactly once"
    assert json.loads((workdir / "results" / "train" / "metrics.json").read_text())["epochs"] == epochs
