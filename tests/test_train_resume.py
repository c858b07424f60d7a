"""Training is resumable: a SIGKILL at any instant, even during a checkpoint write, loses nothing, and the resumed
run ends with exactly the weights of an uninterrupted one (CPU, same world size), continuing the same MLflow run
with every epoch logged once."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, mpi_env, mpirun, mpirun_command, require_or_fail, tracking, train_args, train_config

EPOCHS = 10


def small_config(**overrides):
    return train_config(epochs=EPOCHS, batch_size=16, augment=["random-crop", "rotate", "hflip"], **overrides)


def checkpoint_epoch(path) -> int:
    if not path.exists():
        return 0
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


def assert_same_weights(a, b):
    sa = torch.load(a, map_location="cpu", weights_only=False)["state_dict"]
    sb = torch.load(b, map_location="cpu", weights_only=False)["state_dict"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"weights differ at {key}"


def job_processes(job: subprocess.Popen) -> list[int]:
    """mpirun and every process below it (Open MPI starts each rank in a process group of its own)."""
    import psutil

    try:
        launcher = psutil.Process(job.pid)
        return [launcher.pid, *(child.pid for child in launcher.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def wait_until_stopped(pids: list[int], timeout: float = 10) -> None:
    """SIGSTOP is delivered asynchronously: wait until every process reports state T (stopped) in /proc."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                break
            if state in "TtZX":
                break


def freeze_during_a_checkpoint_write(job: subprocess.Popen, checkpoint, min_epoch: int, timeout: float = 180) -> tuple[int, list[int]]:
    """Stop the whole job (SIGSTOP to mpirun and its ranks) at an instant when rank 0 is writing a checkpoint, i.e.
    while `<checkpoint>.tmp` exists, at or after epoch `min_epoch`; returns the epoch of the last complete
    checkpoint and the frozen processes. Checked while frozen, so the write is certainly unfinished; if it finished
    in between, the job continues and the next write is tried."""
    partial = checkpoint.with_name(checkpoint.name + ".tmp")
    deadline = time.monotonic() + timeout
    pids: list[int] = []
    while time.monotonic() < deadline and job.poll() is None:
        if not pids:  # once the ranks run (their first checkpoint exists), list them once: signals must be quick
            pids = job_processes(job) if checkpoint.exists() else []
            continue
        if not partial.exists():
            continue  # a busy poll: a write of this small model lasts about a millisecond
        signal_all(pids, signal.SIGSTOP)
        wait_until_stopped(pids)
        if partial.exists() and checkpoint_epoch(checkpoint) >= min_epoch:
            return checkpoint_epoch(checkpoint), pids
        signal_all(pids, signal.SIGCONT)
    raise AssertionError("never caught a checkpoint write in progress")


@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_sigkill_during_a_checkpoint_write_then_rerun_resumes_to_identical_weights(data_copy, tmp_path, backend):
    """The hardest instant to be killed at: in the middle of writing the checkpoint. The last complete checkpoint
    must survive, the half-written file must never be read, and the re-run must end with the weights of an
    uninterrupted run, every epoch in MLflow exactly once."""
    if backend == "horovod":
        require_or_fail(importlib.util.find_spec("horovod") is not None, "horovod is not built (scripts/build-horovod.sh)")
    cfg = small_config(backend=backend)
    mpirun(2, "hpcdl.train", train_args(tmp_path, data_copy, tmp_path / "straight", cfg))

    out = tmp_path / "killed"
    checkpoint = out / "checkpoints" / "train.pt"
    command = mpirun_command(2, sys.executable, "-m", "hpcdl.train", *train_args(tmp_path, data_copy, out, cfg))
    job = subprocess.Popen(command, env=mpi_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        killed_at, pids = freeze_during_a_checkpoint_write(job, checkpoint, min_epoch=3)
        signal_all(pids, signal.SIGKILL)
    finally:
        signal_all(job_processes(job), signal.SIGKILL)
        job.wait()
    assert 3 <= killed_at < EPOCHS, f"the kill did not land mid-training (checkpoint epoch {killed_at})"
    assert checkpoint.with_name("train.pt.tmp").exists(), "the kill landed during a write"
    assert checkpoint_epoch(checkpoint) == killed_at, "the last complete checkpoint is intact and loads"
    assert not (out / "model.pt").exists(), "a killed run must not leave a model that looks finished"

    interrupted_run = json.loads((out / "checkpoints" / "mlflow_run.json").read_text())["run_id"]
    resumed = mpirun(2, "hpcdl.train", train_args(tmp_path, data_copy, out, cfg))
    log = resumed.stdout + resumed.stderr
    assert "resuming MLflow run" in log and f"from epoch {killed_at}" in log
    assert "a checkpoint write interrupted by a kill" in log
    assert not list(checkpoint.parent.glob("*.tmp")), "the half-written file is removed, never read"
    assert f"epoch {killed_at}/{EPOCHS}" not in resumed.stdout, "finished epochs must not be trained again"
    assert_same_weights(tmp_path / "straight" / "model.pt", out / "model.pt")

    record = torch.load(out / "model.pt", map_location="cpu", weights_only=False)
    assert record["mlflow_run_id"] == interrupted_run, "the resumed attempt continues the interrupted MLflow run"
    mlflow.set_tracking_uri(tracking(tmp_path)["tracking_uri"])
    client = MlflowClient()
    assert len(client.search_runs([client.get_experiment_by_name("tests").experiment_id])) == 2
    steps = sorted(m.step for m in client.get_metric_history(interrupted_run, "loss"))
    assert steps == list(range(EPOCHS)), "every epoch's metrics logged exactly once, at step = epoch"


def test_checkpoint_of_other_settings_is_kept_aside_not_resumed(data_copy, tmp_path):
    out = tmp_path / "out"
    mpirun(1, "hpcdl.train", train_args(tmp_path, data_copy, out, train_config(epochs=1, ranks=1, augment=[])))
    result = mpirun(1, "hpcdl.train", train_args(tmp_path, data_copy, out, train_config(epochs=2, ranks=1, augment=[])))
    assert "made with other settings" in result.stdout
    assert list((out / "checkpoints").glob("train.stale-*.pt")), "the old checkpoint is kept, not deleted"
    assert checkpoint_epoch(out / "checkpoints" / "train.pt") == 2


def test_sigusr1_checkpoints_exits_75_and_a_rerun_continues_the_same_run(data_copy, tmp_path):
    """The walltime path (Slurm's --signal=USR1@<s>; mpirun forwards SIGUSR1 to the ranks the same way)."""
    cfg = small_config()
    out = tmp_path / "out"
    checkpoint = out / "checkpoints" / "train.pt"
    command = mpirun_command(2, sys.executable, "-m", "hpcdl.train", *train_args(tmp_path, data_copy, out, cfg))
    job = subprocess.Popen(command, env=mpi_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while checkpoint_epoch(checkpoint) < 2 and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.01)
    job.send_signal(signal.SIGUSR1)
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 75, output[-3000:]
    stopped_at = checkpoint_epoch(checkpoint)
    assert 2 <= stopped_at < EPOCHS
    assert f"stopped on SIGUSR1 after epoch {stopped_at}/{EPOCHS} of train" in output
    assert not (out / "model.pt").exists()
    run_id = json.loads((out / "checkpoints" / "mlflow_run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(tracking(tmp_path)["tracking_uri"])
    client = MlflowClient()
    assert client.get_run(run_id).info.status == "KILLED"

    resumed = mpirun(2, "hpcdl.train", train_args(tmp_path, data_copy, out, cfg))
    assert f"from epoch {stopped_at}" in resumed.stdout
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(EPOCHS))
