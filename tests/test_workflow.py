"""The whole default pipeline through Snakemake, as a user runs it: 2 MPI ranks, every stage tracked in MLflow,
the accuracy targets met, and Snakemake's incremental behaviour kept (nothing re-runs without a reason)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import DEFAULT_CONFIG, REPO, SNAKEMAKE, assert_results_meet_the_targets, mpi_env, snakemake
from hpcdl.launch import local_cores

# What the runs table shows: the two fetch and preprocess runs are told apart by their role.
# The default pipeline's stages (`snakemake`), and those of `snakemake all onnx`, which the session's pipeline runs.
STAGES = ["fetch-pretrain", "fetch-finetune", "preprocess-pretrain", "preprocess-finetune", "train", "evaluate", "finetune"]
STAGES_WITH_ONNX = [*STAGES, "export_onnx-train", "export_onnx-finetune"]


def client_of(results) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{results}/mlflow.db")


@pytest.mark.slow
def test_default_pipeline_meets_accuracy_targets(pipeline):
    results, _ = pipeline
    assert_results_meet_the_targets(results)
    evaluation = json.loads((results / "evaluate" / "metrics.json").read_text())
    assert set(evaluation["per_class"]) == {str(d) for d in range(10)}
    assert sum(map(sum, evaluation["confusion_matrix"])) == evaluation["n"]
    for png in ("evaluate/confusion_matrix.png", "evaluate/misclassified.png", "finetune/confusion_matrix.png"):
        assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


@pytest.mark.slow
def test_mlflow_holds_one_parent_run_with_a_child_per_stage(pipeline):
    results, run = pipeline
    client = client_of(results)
    experiment = client.get_experiment_by_name("hpcdl-default")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development", "marked for the UI's Model training mode"
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED", "onsuccess closes the parent run"
    assert parent.data.params["train.model"] == "lenet5"
    children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(r.info.run_name for r in children.values()) == sorted(STAGES_WITH_ONNX)
    assert all(r.info.status == "FINISHED" for r in children.values())
    for child in children.values():
        assert child.data.tags["snakemake.rule"] == child.info.run_name.split("-")[0]
    links = set(re.findall(r"runs table: (\S+)", run.stdout + run.stderr))
    assert links == {f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"}, links

    train = next(r for r in children.values() if r.info.run_name == "train")
    defaults = DEFAULT_CONFIG["train"]
    assert train.data.params["train.lr"] == str(defaults["lr"]) and train.data.params["train.ranks"] == str(defaults["ranks"]) == "2"
    assert train.data.tags["world_size"] == "2" and train.data.tags["backend"] == "horovod"
    for tag in ("git.commit", "git.dirty", "hostname", "torch.version", "snakemake.rule"):
        assert train.data.tags[tag], tag
    epochs = int(train.data.params["train.epochs"])
    for metric in ("loss", "accuracy", "val_accuracy", "lr", "samples_per_second", "epoch_seconds"):
        history = client.get_metric_history(train.info.run_id, metric)
        assert sorted(m.step for m in history) == list(range(epochs)), metric
    inputs = train.inputs.dataset_inputs
    assert {i.dataset.name for i in inputs} == {"mnist5k-train", "mnist5k-val"}
    manifest = json.loads((results / "data" / "pretrain" / "manifest.json").read_text())
    train_input = next(i for i in inputs if i.dataset.name == "mnist5k-train")
    assert train_input.dataset.digest == manifest["files"]["train_x.npy"][:16]

    (pretrained,) = client.search_model_versions("name='hpcdl-pretrained'")
    (finetuned,) = client.search_model_versions("name='hpcdl-finetuned'")
    assert pretrained.run_id == train.info.run_id
    finetune = next(r for r in children.values() if r.info.run_name == "finetune")
    assert finetune.data.tags["lineage.parent_run_id"] == train.info.run_id
    assert finetune.data.tags["lineage.parent_model_uri"].startswith("models:/")
    assert finetuned.run_id == finetune.info.run_id
    evaluate = next(r for r in children.values() if r.info.run_name == "evaluate")
    assert evaluate.data.metrics["test_accuracy"] == json.loads((results / "evaluate" / "metrics.json").read_text())["accuracy"]
    artifacts = {a.path for a in client.list_artifacts(evaluate.info.run_id)}
    assert {"confusion_matrix.png", "misclassified.png", "metrics.json"} <= artifacts


@pytest.mark.slow
def test_rerun_without_changes_does_nothing(pipeline):
    results, _ = pipeline
    again = snakemake(results)
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
    client = client_of(results)
    experiment = client.get_experiment_by_name("hpcdl-default")
    parents = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, "an invocation with nothing to do opens no parent run"


@pytest.mark.slow
def test_changing_a_finetune_key_reruns_only_finetune(pipeline):
    results, _ = pipeline
    override = results.parent / "no-baseline.yaml"
    override.write_text("finetune:\n  baseline: false\n")
    plan = snakemake(results, "--dry-run", "--configfile", str(override))
    assert plan.returncode == 0, plan.stderr
    jobs = plan.stdout
    assert "rule finetune:" in jobs
    for stage in ("rule train:", "rule evaluate:", "rule preprocess:", "rule fetch:"):
        assert stage not in jobs, f"{stage} must not re-run for a finetune-only change"


@pytest.mark.slow
def test_more_ranks_than_cores_run_oversubscribed_with_one_warning(tmp_path):
    """A local run asking for more ranks than this machine has cores runs them (Open MPI would refuse: "not enough
    slots") and says so once in each MPI job's log."""
    ranks = local_cores() + 1
    overrides = tmp_path / "ranks.yaml"
    overrides.write_text(yaml.safe_dump({
        "train": {"ranks": ranks, "epochs": 1},
        "finetune": {"ranks": ranks, "epochs_frozen": 1, "epochs_unfrozen": 0, "baseline": False},
    }))
    results = tmp_path / "results"
    run = snakemake(results, f"{results}/finetune/metrics.json", "--configfile", str(overrides))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    warning = f"hpcdl: warning: {ranks} MPI ranks x 1 thread(s) on {local_cores()} cores: the ranks share cores (oversubscribed)"
    for stage in ("train", "finetune"):
        log = (results / "logs" / f"{stage}.log").read_text()
        assert sum(line.startswith(warning) for line in log.splitlines()) == 1, log[:2000]
        assert "not enough slots" not in log
    client = client_of(results)
    runs = client.search_runs([client.get_experiment_by_name("hpcdl-default").experiment_id])
    train = next(r for r in runs if r.info.run_name == "train")
    assert train.data.tags["world_size"] == str(ranks)



@pytest.mark.slow
def test_a_killed_snakemake_leaves_its_parent_run_killed_not_running(tmp_path):
    """SIGKILL runs no onerror handler: the process holding the parent run open sees Snakemake gone and marks the
    run KILLED, instead of leaving it RUNNING in the runs table forever."""
    overrides = tmp_path / "long.yaml"
    overrides.write_text(yaml.safe_dump({"train": {"epochs": 500}}))
    results = tmp_path / "results"
    command = [SNAKEMAKE, "--cores", "2", f"{results}/train/model.pt", "--configfile", str(overrides), "--config", f"results={results}"]
    workflow = subprocess.Popen(command, cwd=REPO, env=mpi_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        train_log = results / "logs" / "train.log"
        while not (train_log.exists() and "epoch 1/500" in train_log.read_text()) and time.monotonic() < deadline:
            assert workflow.poll() is None, "the workflow ended before training ran"
            time.sleep(0.2)
        parent_id = (results / ".mlflow_parent_run").read_text().strip()
        assert client_of(results).get_run(parent_id).info.status == "RUNNING"
        os.killpg(workflow.pid, signal.SIGKILL)  # Snakemake and its jobs; not the keeper, which has its own session
        workflow.wait()
        deadline = time.monotonic() + 60
        while client_of(results).get_run(parent_id).info.status == "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert client_of(results).get_run(parent_id).info.status == "KILLED"
    finally:
        if workflow.poll() is None:
            os.killpg(workflow.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-f", str(results)])  # any rank that left the process group
