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
import threading
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


def kill_during_a_checkpoint_write(job: subprocess.Popen, checkpoint, after_epoch: int, timeout: float = 180) -> tuple[int, bytes]:
    """SIGKILL the whole job (mpirun and its ranks) while rank 0 is in the middle of writing a checkpoint, the first
    write after checkpoint `after_epoch` is complete. Deterministic, not a race against a millisecond-long write:
    the write's temporary file (`<checkpoint>.tmp`, hpcdl.atomic) is made a FIFO before the write begins, so rank
    0 writes into this test, which reads the first bytes and kills the job while rank 0 is still writing. What a
    kill leaves after a partial write is then put in the FIFO's place: a regular file holding those bytes.
    Returns the epoch of the last complete checkpoint and the bytes."""
    partial = checkpoint.with_name(checkpoint.name + ".tmp")
    deadline = time.monotonic() + timeout
    while True:  # between two writes: epochs last about a second, a write a millisecond
        assert job.poll() is None and time.monotonic() < deadline, f"the job ended or stalled before checkpoint {after_epoch}"
        if checkpoint_epoch(checkpoint) >= after_epoch:
            try:
                os.mkfifo(partial)
                break
            except FileExistsError:  # a write is in progress at this instant: take the next one
                pass
        time.sleep(0.01)
    received: dict = {}

    def read_the_first_bytes():
        received["pipe"] = pipe = open(partial, "rb")  # opens once rank 0 opens the file to write the next checkpoint
        received["bytes"] = pipe.read(4096)  # the pipe stays open: rank 0 blocks in its write, it does not fail

    reader = threading.Thread(target=read_the_first_bytes, daemon=True)
    reader.start()
    reader.join(timeout=max(deadline - time.monotonic(), 1))
    signal_all(job_processes(job), signal.SIGKILL)
    job.wait()
    if "pipe" in received:
        received["pipe"].close()
    assert received.get("bytes"), "rank 0 never began the next checkpoint write"
    partial.unlink()
    partial.write_bytes(received["bytes"])
    return checkpoint_epoch(checkpoint), received["bytes"]


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
        killed_at, written = kill_during_a_checkpoint_write(job, checkpoint, after_epoch=3)
    finally:
        signal_all(job_processes(job), signal.SIGKILL)
        job.wait()
    assert 3 <= killed_at < EPOCHS, f"the kill did not land mid-training (checkpoint epoch {killed_at})"
    assert written[:2] == b"PK" and len(written) == 4096, "the kill landed inside a checkpoint write (torch.save's zip) under way"
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
