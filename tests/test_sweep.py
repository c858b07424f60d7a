"""Sweeps (config `sweep`): one training job per point of sweep.grid, each its own MLflow child run, then a
summary table and plots with the sweet spot marked; a grown grid trains only the new points; bad grids are
refused before any job, naming the key."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, SNAKEMAKE, mpi_env, snakemake
from hpcdl.sweep_grid import grid_points, point_train_config
from hpcdl.sweep_summary import point_row, sweet_spot

SMALL_TRAIN = {"epochs": 2}  # a history of more than one epoch, in seconds
TARGET = 0.8


def write_config(path: Path, grid: dict, train: dict | None = None, **sweep) -> Path:
    path.write_text(yaml.safe_dump({"train": {**SMALL_TRAIN, **(train or {})}, "sweep": {"grid": grid, "target_val_accuracy": TARGET, **sweep}}))
    return path


def dry_run(tmp_path: Path, override: dict, *targets: str):
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    command = [SNAKEMAKE, "--dry-run", "--configfile", str(path), "--config", f"results={tmp_path / 'results'}", "--", *targets]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    return result, result.stdout + result.stderr


def jobs_of(output: str, rule: str) -> list[str]:
    """The blocks Snakemake prints for each job of `rule` (dry run or real run)."""
    return [block for block in re.split(r"\n(?=\[[^\]]+\]\n)", output) if re.search(rf"^(local)?rule {rule}:", block, re.M)]


# --- the points ---------------------------------------------------------------------------------------------------


def test_a_points_name_and_config_depend_only_on_its_own_values():
    points = grid_points({"train.lr": [0.1, 0.05], "train.batch_size": [32]})
    assert points == {"batch_size=32,lr=0.1": {"train.batch_size": 32, "train.lr": 0.1},
                      "batch_size=32,lr=0.05": {"train.batch_size": 32, "train.lr": 0.05}}
    grown = grid_points({"train.batch_size": [32, 128], "train.lr": [0.1, 0.05]})
    assert {name: grown[name] for name in points} == points, "growing the grid keeps the old points as they were"
    train = {"batch_size": 64, "lr": 0.5, "epochs": 3}
    assert point_train_config(train, points["batch_size=32,lr=0.1"]) == {"batch_size": 32, "lr": 0.1, "epochs": 3}
    assert train == {"batch_size": 64, "lr": 0.5, "epochs": 3}
    assert grid_points({}) == {}, "no grid, no sweep"


def test_the_sweet_spot_is_the_fastest_to_the_target_then_the_most_accurate():
    def metrics(val_accuracies, seconds=1.0, final=None):
        history = [{"val_accuracy": a, "epoch_seconds": seconds, "samples_per_second": 1000.0} for a in val_accuracies]
        return {"history": history, "epochs": len(history), "world_size": 2, "val": {"accuracy": final or val_accuracies[-1]}, "mlflow": {"run_id": "x"}}

    slow = point_row("batch_size=16", {"train.batch_size": 16}, metrics([0.5, 0.9, 0.97], seconds=2.0), 0.9)
    fast = point_row("batch_size=32", {"train.batch_size": 32}, metrics([0.6, 0.92, 0.95]), 0.9)
    never = point_row("batch_size=64", {"train.batch_size": 64}, metrics([0.4, 0.6, 0.89]), 0.9)
    assert (slow["seconds_to_target"], slow["epochs_to_target"]) == (4.0, 2)
    assert never["seconds_to_target"] is None and never["epochs_to_target"] is None
    assert sweet_spot([slow, fast, never])["point"] == "batch_size=32"
    tie = point_row("batch_size=8", {"train.batch_size": 8}, metrics([0.6, 0.92, 0.96]), 0.9)
    assert sweet_spot([fast, tie])["point"] == "batch_size=8", "a tie goes to the higher final accuracy"
    assert sweet_spot([never, point_row("lr=1", {"train.lr": 1}, metrics([0.1, 0.2]), 0.9)])["point"] == "batch_size=64", \
        "when no point reaches the target, the most accurate one"


# --- bad input, at `snakemake -n` ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"sweep": {"grid": {"train.batch_size": [32, 0]}}}, "sweep.grid.train.batch_size.1: 0 is out of range (allowed: >= 1)"),
        ({"sweep": {"grid": {"train.precision": ["fp64"]}}}, "sweep.grid.train.precision.0: 'fp64' is not allowed (allowed: fp32, bf16, fp16)"),
        ({"sweep": {"grid": {"train.lr": []}}}, "sweep.grid.train.lr: [] is empty (allowed: a list of at least 1 value)"),
        ({"sweep": {"grid": {"train.lr": 0.1}}}, "sweep.grid.train.lr: 0.1 is not a list"),
        ({"sweep": {"grid": {"train.epochs": [1, 2]}}}, "sweep.grid: 'train.epochs' is not allowed (allowed: train.batch_size, train.ranks, train.lr, train.precision, train.backend)"),
        ({"sweep": {"grid": {"train.ranks": [2, 3]}}, "train": {"nodes": 2}}, "sweep.grid.train.ranks: 3 is not a multiple of train.nodes (2)"),
        ({"sweep": {"target": 0.9}}, "sweep.target: unknown key (allowed: grid, target_val_accuracy)"),
    ],
)
def test_a_bad_grid_is_refused_before_any_job_naming_the_key(tmp_path, override, expected):
    result, output = dry_run(tmp_path, override)
    assert result.returncode != 0
    assert expected in output, output[-3000:]
    assert len(output.strip().splitlines()) <= 10, f"a short error, not a schema dump:\n{output}"
    assert not (tmp_path / "results").exists()


def test_a_point_outside_the_grid_and_a_summary_without_a_grid_are_refused(tmp_path):
    result, output = dry_run(tmp_path, {"sweep": {"grid": {"train.batch_size": [32]}}}, f"{tmp_path}/results/sweep/batch_size=999/train/metrics.json")
    assert result.returncode != 0 and "sweep point 'batch_size=999' is not in sweep.grid (its points: batch_size=32)" in output, output[-3000:]
    result, output = dry_run(tmp_path, {}, "sweep_summary")
    assert result.returncode != 0 and "sweep.grid is empty" in output, output[-3000:]
    assert not (tmp_path / "results").exists()


# --- the plan: one job per point, each with its own geometry ------------------------------------------------------


def test_each_point_is_a_job_with_the_ranks_of_its_own_train_section(tmp_path):
    result, output = dry_run(tmp_path, {"train": {"nodes": 2}, "sweep": {"grid": {"train.ranks": [2, 4], "train.lr": [0.1]}}})
    assert result.returncode == 0, output[-3000:]
    jobs = {re.search(r"wildcards: point=(\S+)", job).group(1): job for job in jobs_of(output, "train_sweep")}
    assert set(jobs) == {"ranks=2,lr=0.1", "ranks=4,lr=0.1"}
    # the executor plugin turns these into sbatch --nodes/--ntasks or --ntasks-per-node (as rule train's)
    assert re.search(r"resources: .*nodes=2, tasks=2, cpus_per_task=1", jobs["ranks=2,lr=0.1"]), jobs["ranks=2,lr=0.1"]
    assert re.search(r"resources: .*nodes=2, tasks_per_node=2, cpus_per_task=1", jobs["ranks=4,lr=0.1"]), jobs["ranks=4,lr=0.1"]
    assert "results/sweep/ranks=4,lr=0.1/train/metrics.json" in jobs["ranks=4,lr=0.1"]
    assert re.search(r"^\s*sweep_summary\s+1$", output, re.M), "a non-empty grid adds the summary to `rule all`"
    result, output = dry_run(tmp_path, {})
    assert result.returncode == 0 and "sweep_summary" not in output and "train_sweep" not in output


# --- a real sweep -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`snakemake sweep_summary` over batch sizes 32 and 64 (2 epochs each, 2 ranks): (results, completed run)."""
    import time

    root = tmp_path_factory.mktemp("sweep")
    config = write_config(root / "sweep.yaml", {"train.batch_size": [32, 64]})
    started = time.monotonic()
    run = snakemake(root / "results", "sweep_summary", "--configfile", str(config), timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    print(f"sweep of 2 points: {time.monotonic() - started:.1f} s wall")
    return root / "results", run


def read_summary(results: Path) -> list[dict]:
    with open(results / "sweep" / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_the_report_shows_the_sweep_plots_with_their_captions(sweep, tmp_path):
    from test_report import assert_report_shows

    results, _ = sweep
    assert_report_shows(results, [
        ("sweep/throughput.png", "Sweep", "Sweep: training throughput of each point"),
        ("sweep/time_to_target.png", "Sweep", "Sweep: seconds of training"),
        ("sweep/final_accuracy.png", "Sweep", "Sweep: validation accuracy of each point's model after its last epoch"),
    ], tmp_path, "sweep_summary", "--configfile", str(results.parent / "sweep.yaml"))


def test_each_point_logs_its_own_child_run_of_the_workflows_run(sweep):
    results, _ = sweep
    client = MlflowClient(tracking_uri=f"sqlite:///{results}/mlflow.db")
    experiment = client.get_experiment_by_name("hpcdl-default")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"fetch-pretrain", "preprocess-pretrain", "train_sweep-batch_size=32", "train_sweep-batch_size=64", "sweep_summary"}
    for size in (32, 64):
        run = children[f"train_sweep-batch_size={size}"]
        assert run.info.status == "FINISHED"
        assert run.data.params["train.batch_size"] == str(size) and run.data.params["train.epochs"] == "2"
        assert run.data.tags["hpcdl.sweep.point"] == f"batch_size={size}"
        assert run.data.tags["hpcdl.sweep.train.batch_size"] == str(size)
        assert run.data.tags["snakemake.rule"] == "train_sweep" and run.data.tags["world_size"] == "2"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")) == [0, 1]
        metrics = json.loads((results / "sweep" / f"batch_size={size}" / "train" / "metrics.json").read_text())
        assert metrics["mlflow"]["run_id"] == run.info.run_id and metrics["world_size"] == 2
    assert not client.search_registered_models(), "a point's model is not registered as the workflow's pretrained model"

    summary = children["sweep_summary"]
    best = next(row for row in read_summary(results) if row["sweet_spot"] == "true")
    assert summary.data.tags["hpcdl.sweep.best_point"] == best["point"]
    assert summary.data.params["sweep.best.train.batch_size"] == best["train.batch_size"]
    assert summary.data.params["sweep.target_val_accuracy"] == str(TARGET)
    artifacts = {a.path for a in client.list_artifacts(summary.info.run_id, "sweep")}
    assert artifacts == {"sweep/summary.csv", "sweep/throughput.png", "sweep/time_to_target.png", "sweep/final_accuracy.png"}


def test_the_summary_has_one_row_per_point_and_marks_the_sweet_spot(sweep):
    results, _ = sweep
    rows = read_summary(results)
    assert [row["point"] for row in rows] == ["batch_size=32", "batch_size=64"]
    assert list(rows[0]) == ["point", "train.batch_size", "samples_per_second", "seconds_to_target", "epochs_to_target",
                             "final_val_accuracy", "epochs", "world_size", "sweet_spot", "mlflow_run_id"]
    for row in rows:
        metrics = json.loads((results / "sweep" / row["point"] / "train" / "metrics.json").read_text())
        history = metrics["history"]
        assert row["train.batch_size"] == row["point"].split("=")[1]
        assert (row["epochs"], row["world_size"]) == ("2", "2")
        assert float(row["samples_per_second"]) == pytest.approx(sum(h["samples_per_second"] for h in history) / 2, abs=0.1)
        assert float(row["samples_per_second"]) > 100
        assert float(row["final_val_accuracy"]) == pytest.approx(metrics["val"]["accuracy"], abs=1e-6)
        reached = next((epoch for epoch, h in enumerate(history, 1) if h["val_accuracy"] >= TARGET), None)
        if reached is None:
            assert row["seconds_to_target"] == row["epochs_to_target"] == ""
        else:
            assert int(row["epochs_to_target"]) == reached
            assert float(row["seconds_to_target"]) == pytest.approx(sum(h["epoch_seconds"] for h in history[:reached]), abs=1e-3)
            assert 0 < float(row["seconds_to_target"]) < 120
    assert [row["sweet_spot"] for row in rows].count("true") == 1
    reached = [row for row in rows if row["seconds_to_target"]]
    best = next(row for row in rows if row["sweet_spot"] == "true")
    if reached:
        assert float(best["seconds_to_target"]) == min(float(row["seconds_to_target"]) for row in reached)
    else:
        assert float(best["final_val_accuracy"]) == max(float(row["final_val_accuracy"]) for row in rows)
    for png in ("throughput.png", "time_to_target.png", "final_accuracy.png"):
        assert (results / "sweep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert (results / "sweep" / png).stat().st_size > 10_000, png


def test_a_point_launches_its_own_ranks_on_slurm(sweep, tmp_path):
    """The launch line of a point follows its train.ranks: with the profiles' `srun` launcher (a stand-in here that
    records its arguments), ranks=4 over train.nodes=2 is `srun -n 4 -N 2 --ntasks-per-node=2`."""
    results, _ = sweep
    copy = tmp_path / "results"
    for part in ("raw/pretrain", "data/pretrain"):  # the preprocessed data, mtimes kept: nothing upstream re-runs
        shutil.copytree(results / part, copy / part)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/srun.args\nexit 3\n')
    (bin_dir / "srun").chmod(0o755)
    config = write_config(tmp_path / "ranks.yaml", {"train.ranks": [4]}, train={"nodes": 2})
    command = [SNAKEMAKE, "--cores", "2", "--configfile", str(config), "--config", f"results={copy}",
               "--set-resources", "train_sweep:mpi='srun'", "--", f"{copy}/sweep/ranks=4/train/metrics.json"]
    run = subprocess.run(command, cwd=REPO, env=mpi_env(PATH=f"{bin_dir}:{os.environ['PATH']}"), capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode != 0 and "Error in rule train_sweep" in output, output[-4000:]
    args = (tmp_path / "srun.args").read_text().split("\n")
    assert args[:7] == ["-n", "4", "-N", "2", "--ntasks-per-node=2", "--cpus-per-task=1", "--kill-on-bad-exit=1"], args
    assert args[8:10] == ["-m", "hpcdl.train"]
    assert json.loads(args[args.index("--params") + 1])["train"]["ranks"] == 4
    assert not (copy / "sweep" / "ranks=4" / "train" / "metrics.json").exists()


def test_growing_the_grid_trains_only_the_new_point(sweep):
    """Last: it changes the sweep's results (a third point, a new summary)."""
    results, _ = sweep
    old = {size: (results / "sweep" / f"batch_size={size}" / "train" / "metrics.json").stat().st_mtime_ns for size in (32, 64)}
    config = write_config(results.parent / "grown.yaml", {"train.batch_size": [32, 64, 128]})
    run = snakemake(results, "sweep_summary", "--configfile", str(config), timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    trained = jobs_of(output, "train_sweep")
    assert len(trained) == 1 and "wildcards: point=batch_size=128" in trained[0], output[-6000:]
    assert re.search(r"^\s*train_sweep\s+1$", output, re.M), output[-3000:]
    assert not jobs_of(output, "fetch") and not jobs_of(output, "preprocess")
    assert {size: (results / "sweep" / f"batch_size={size}" / "train" / "metrics.json").stat().st_mtime_ns for size in (32, 64)} == old
    assert [row["point"] for row in read_summary(results)] == ["batch_size=32", "batch_size=64", "batch_size=128"]
