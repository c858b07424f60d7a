"""Data-parallel semantics with real MPI ranks: sharding covers every sample once per epoch, 2 ranks with half
the batch follow the same loss curve as 1 rank with the whole batch, and a failing rank ends the job quickly."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, mpi_env, mpirun, mpirun_command, require_or_fail, train_args, train_config
from hpcdl.loop import epoch_shard, micro_steps_per_epoch


@pytest.mark.parametrize(("n", "world"), [(1437, 2), (1000, 4), (7, 3), (5, 8)])
def test_each_epoch_every_sample_exactly_once_across_ranks(n, world):
    for epoch in (0, 1):
        shards = [epoch_shard(n, epoch, seed=3, rank=r, world=world) for r in range(world)]
        merged = np.concatenate(shards)
        assert sorted(merged.tolist()) == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert not np.array_equal(epoch_shard(n, 0, 3, 0, world), epoch_shard(n, 1, 3, 0, world)) or n < 3


def test_all_ranks_take_the_same_number_of_steps():
    # ranks with one sample fewer still take the same number of (possibly shorter or empty) steps
    assert micro_steps_per_epoch(7, 2, 3, 1) == 2
    assert micro_steps_per_epoch(7, 2, 3, 4) == 4
    assert micro_steps_per_epoch(4000, 2, 64, 1) == 32


def history(out_dir):
    return [epoch["loss"] for epoch in json.loads((out_dir / "metrics.json").read_text())["history"]]


def needs(backend):
    if backend == "horovod":
        require_or_fail(importlib.util.find_spec("horovod") is not None, "horovod is not built (scripts/build-horovod.sh)")


BACKENDS = ["torch", "horovod"]


def rank_reports(stdout: str) -> list[dict]:
    """The flat JSON object each rank printed. mpirun forwards the ranks' output in chunks, so two objects can share
    a line: find the objects, not the lines."""
    return [json.loads(found) for found in re.findall(r"\{[^{}]*\}", stdout)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_with_half_batch_follow_one_rank_with_whole_batch(data_copy, tmp_path, backend):
    needs(backend)
    # No augmentation (its draws are per rank) and no warm-up (it depends on world size); LR is per rank, so
    # the single rank gets twice the base LR to match the scaled LR of two ranks. A moderate LR: at high ones
    # training is chaotic and float summation order alone moves the curve (measured: 1.5% after 3 epochs at
    # an effective LR of 0.2 without momentum), which says nothing about data parallelism.
    common = dict(epochs=4, augment=[], warmup_epochs=0, backend=backend, schedule="constant", momentum=0.9)
    mpirun(1, "hpcdl.train", train_args(tmp_path, data_copy, tmp_path / "one", train_config(ranks=1, batch_size=32, lr=0.01, **common)))
    mpirun(2, "hpcdl.train", train_args(tmp_path, data_copy, tmp_path / "two", train_config(ranks=2, batch_size=16, lr=0.005, **common)))
    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert one[-1] < one[0] - 0.1, f"the comparison must cover real learning, got {one}"
    # Same samples per global step, gradients averaged: equal up to float summation order (measured <= 1e-7).
    np.testing.assert_allclose(two, one, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_rank_ends_the_job_quickly_and_is_named(data_copy, tmp_path, backend):
    needs(backend)
    cfg = train_config(epochs=50, backend=backend)
    command = mpirun_command(2, sys.executable, str(REPO / "tests" / "failing_rank.py"), *train_args(tmp_path, data_copy, tmp_path / "out", cfg))
    started = time.monotonic()
    result = subprocess.run(command, env=mpi_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "rank 1 failed: RuntimeError: injected failure in batch 3" in result.stdout + result.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f} s to die"
    assert not (tmp_path / "out" / "model.pt").exists()


def test_step_normaliser_counts_every_sample_of_the_step_once():
    from hpcdl.loop import samples_per_optimizer_step

    counts = samples_per_optimizer_step(1257, 2, 16, 1)
    assert sum(counts) == 1257 and counts[-1] == 1257 - 39 * 32
    assert samples_per_optimizer_step(1257, 1, 32, 1) == counts, "same global steps for 1x32 and 2x16"
    assert sum(samples_per_optimizer_step(1000, 4, 8, 3)) == 1000


def test_horovod_and_torch_distributed_train_the_same_model(data_copy, tmp_path):
    """Same config and seed on 2 ranks: the backend is an implementation detail, not a change of result."""
    needs("horovod")
    results = {}
    for backend in BACKENDS:
        cfg = train_config(epochs=4, backend=backend)
        mpirun(2, "hpcdl.train", train_args(tmp_path, data_copy, tmp_path / backend, cfg))
        results[backend] = json.loads((tmp_path / backend / "metrics.json").read_text())
    torch_losses = [e["loss"] for e in results["torch"]["history"]]
    horovod_losses = [e["loss"] for e in results["horovod"]["history"]]
    np.testing.assert_allclose(horovod_losses, torch_losses, rtol=1e-4)
    assert abs(results["horovod"]["val"]["accuracy"] - results["torch"]["val"]["accuracy"]) <= 0.005


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_equals_the_larger_batch(data_copy, tmp_path, backend):
    """grad_accum_steps=2 x batch 8 takes the same optimizer steps as batch 16 (Horovod's
    backward_passes_per_step, DDP's no_sync), including the empty micro-batch that pads the last step."""
    needs(backend)
    common = dict(epochs=2, augment=[], warmup_epochs=0, backend=backend, schedule="constant", momentum=0.9, lr=0.005)
    mpirun(2, "hpcdl.train", train_args(tmp_path, data_copy, tmp_path / "big", train_config(batch_size=16, **common)))
    mpirun(2, "hpcdl.train", train_args(tmp_path, data_copy, tmp_path / "accum", train_config(batch_size=8, grad_accum_steps=2, **common)))
    np.testing.assert_allclose(history(tmp_path / "accum"), history(tmp_path / "big"), rtol=1e-5)


def test_horovod_fp16_compression_rounds_the_gradients_it_sends_and_still_follows_the_full_precision_curve(data_copy, tmp_path):
    """`train.compression: fp16` halves what each allreduce sends. It must reach Horovod (the curve moves by the
    rounding) and must not change what is learnt (the curve stays within fp16's rounding of the uncompressed one)."""
    needs("horovod")
    common = dict(epochs=3, augment=[], warmup_epochs=0, backend="horovod", schedule="constant", momentum=0.9, lr=0.005, batch_size=16)
    for compression in ("none", "fp16"):
        mpirun(2, "hpcdl.train", train_args(tmp_path, data_copy, tmp_path / compression, train_config(compression=compression, **common)))
    full, half = history(tmp_path / "none"), history(tmp_path / "fp16")
    assert full[-1] < full[0] - 0.1, f"the comparison must cover real learning, got {full}"
    assert half != full, "fp16 compression left every loss bit-identical: the setting did not reach Horovod"
    np.testing.assert_allclose(half, full, rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_precision_step_skips_on_every_rank_when_one_rank_overflows(backend):
    """fp16's gradient scaler must read the averaged gradients: Horovod's order is synchronize(), unscale_(), then
    step without a second synchronize (its own examples). Stepping the scaler directly unscales local gradients
    while their allreduce is in flight: rank 0 then steps on non-finite averaged gradients that rank 1 skipped.
    A 500 ms Horovod cycle keeps the allreduce in flight when the step starts, so the wrong order always shows."""
    needs(backend)
    env = mpi_env(HOROVOD_CYCLE_TIME="500")
    result = subprocess.run(mpirun_command(2, sys.executable, str(REPO / "tests" / "fp16_step.py"), backend), env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = rank_reports(result.stdout)
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for rank in ranks:
        assert rank["finite"] and not rank["changed"], f"rank {rank['rank']} stepped on overflowed gradients: {rank}"
        assert rank["scale"] == 512.0, "the scaler backs off on every rank"


def test_torch_backend_sums_cpu_gradients_through_mpi_and_gloo_trains_the_same_model(data_copy, tmp_path):
    """On CPU the torch backend hands DDP's gradient buckets to MPI (hpcdl.backends.mpi_allreduce_hook), not gloo:
    the run says which one summed them, and both give the same training curve; a bad setting is refused by name."""
    from mlflow.tracking import MlflowClient

    common = dict(epochs=3, augment=[], warmup_epochs=0, backend="torch", schedule="constant", momentum=0.9, lr=0.005)
    losses = {}
    for transport in ("mpi", "gloo"):
        out = tmp_path / transport
        command = mpirun_command(2, sys.executable, "-m", "hpcdl.train", *train_args(tmp_path, data_copy, out, train_config(**common)))
        result = subprocess.run(command, env=mpi_env(HPCDL_TORCH_CPU_ALLREDUCE=transport), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[transport] = history(out)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id], order_by=["attributes.start_time ASC"])
    assert [run.data.tags["gradient_allreduce"] for run in runs] == ["mpi", "gloo"]
    np.testing.assert_allclose(losses["gloo"], losses["mpi"], rtol=1e-5)

    command = mpirun_command(2, sys.executable, "-m", "hpcdl.train", *train_args(tmp_path, data_copy, tmp_path / "bad", train_config(**common)))
    result = subprocess.run(command, env=mpi_env(HPCDL_TORCH_CPU_ALLREDUCE="tcp"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "HPCDL_TORCH_CPU_ALLREDUCE='tcp': choose one of mpi, gloo" in result.stdout + result.stderr
    assert not (tmp_path / "bad" / "model.pt").exists()


MPI_DEFAULTS = """
import json, os, sys
from hpcdl.backends import make_backend
backend = make_backend(sys.argv[1])
from mpi4py import MPI
print(json.dumps({"yield": os.environ.get("OMPI_MCA_mpi_yield_when_idle"), "size": MPI.COMM_WORLD.Get_size()}))
backend.shutdown()
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_ranks_started_without_mpirun_yield_while_they_wait_unless_the_user_says_otherwise(backend):
    """srun starts the ranks without mpirun's `--mca mpi_yield_when_idle 1`: on CPU the backends set it in the
    environment MPI reads when it starts (Horovod at 9.5k instead of 18-20k samples/s under srun without it, P5);
    a user's value is kept. Here a rank started without any launcher, as srun starts it."""
    needs(backend)
    env = {k: v for k, v in mpi_env().items() if k != "OMPI_MCA_mpi_yield_when_idle"}
    for user_value, expected in ((None, "1"), ("0", "0")):
        run_env = env if user_value is None else dict(env, OMPI_MCA_mpi_yield_when_idle=user_value)
        result = subprocess.run([sys.executable, "-c", MPI_DEFAULTS, backend], env=run_env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout.strip().splitlines()[-1]) == {"yield": expected, "size": 1}


HOROVOD_CYCLE = """
import json, os
import torch
from hpcdl.backends import make_backend
backend = make_backend("horovod")
print(json.dumps({"rank": backend.rank, "cycle_ms": os.environ.get("HOROVOD_CYCLE_TIME"),
                  "sum": backend.allreduce_sum(torch.full((2,), backend.rank + 1.0)).tolist(),
                  "object": backend.broadcast_object(f"from {backend.rank}")}), flush=True)
backend.barrier()
backend.shutdown()
"""


def test_horovod_cycles_fast_on_cpu_only_where_a_rank_has_peers_to_wait_for():
    """Horovod's background thread wakes every HOROVOD_CYCLE_TIME ms. On CPU hpcdl shortens it to 0.1 ms where
    gradients cross ranks, and leaves a 1-rank run at 5 ms, where the wake-ups would only take the core from the
    compute thread (two 1-rank runs side by side: 0.73 of twice one alone at 0.1 ms, 1.01-1.03 at 5 ms; P3's
    ceiling row). The 1-rank collectives then return their result at once, and right; a user's value still wins."""
    from hpcdl.backends import CPU_HOROVOD_CYCLE_TIME_MS, CPU_SINGLE_RANK_HOROVOD_CYCLE_TIME_MS

    needs("horovod")
    env = {k: v for k, v in mpi_env().items() if k != "HOROVOD_CYCLE_TIME"}
    cases = [
        (1, None, [{"rank": 0, "cycle_ms": CPU_SINGLE_RANK_HOROVOD_CYCLE_TIME_MS, "sum": [1.0, 1.0], "object": "from 0"}]),
        (2, None, [{"rank": r, "cycle_ms": CPU_HOROVOD_CYCLE_TIME_MS, "sum": [3.0, 3.0], "object": "from 0"} for r in (0, 1)]),
        (2, "2", [{"rank": r, "cycle_ms": "2", "sum": [3.0, 3.0], "object": "from 0"} for r in (0, 1)]),
    ]
    for ranks, user_value, expected in cases:
        run_env = env if user_value is None else dict(env, HOROVOD_CYCLE_TIME=user_value)
        result = subprocess.run(mpirun_command(ranks, sys.executable, "-c", HOROVOD_CYCLE), env=run_env, cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        ranks_said = sorted(rank_reports(result.stdout), key=lambda r: r["rank"])
        assert ranks_said == expected, f"{ranks} rank(s), HOROVOD_CYCLE_TIME={user_value}"
