"""Rule export_onnx in the default pipeline: the trained and the fine-tuned model as ONNX files that pass the ONNX
checker and give PyTorch's logits in ONNX Runtime at any batch size, recorded in <model>.json and in a child of the
workflow's MLflow run with the file as artifact; an export that fails its parity check fails its job, names the
measured difference and leaves no .onnx behind."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, snakemake
from test_config import dry_run
from hpcdl.export_onnx import EXAMPLE_BATCH, INPUT_NAME
from hpcdl.stage_runtime import load_data, load_model_file

MODELS = {"train": "pretrain", "finetune": "finetune"}  # the exported model -> the dataset it is checked on
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def stage_runs(results, experiment: str = "hpcdl-default") -> tuple:
    """(the workflow's parent run, its children by run name) in the results' MLflow store."""
    client = MlflowClient(tracking_uri=f"sqlite:///{results}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parent, {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


def test_the_configurable_opsets_are_ones_onnx_defines():
    opset = SCHEMA["properties"]["onnx"]["properties"]["opset"]
    assert opset["minimum"] <= opset["default"] <= opset["maximum"] <= onnx.defs.onnx_opset_version()


@pytest.mark.parametrize(("override", "targets", "exports"), [(None, (), 0), ({"onnx": {"export": True}}, (), 2), (None, ("--", "all", "onnx"), 2)])
def test_export_is_planned_with_export_true_or_the_onnx_target_and_not_by_default(tmp_path, override, targets, exports):
    result, output = dry_run(tmp_path, override, *targets)
    assert result.returncode == 0, output[-3000:]
    planned = re.search(r"^export_onnx\s+(\d+)$", output, re.MULTILINE)
    assert (int(planned.group(1)) if planned else 0) == exports, output[-3000:]


def test_a_bad_onnx_setting_stops_the_workflow_naming_the_key(tmp_path):
    result, output = dry_run(tmp_path, {"onnx": {"opset": 13, "tolerance": -1}})
    assert result.returncode != 0
    assert "onnx.opset: 13 is out of range (allowed: >= 18)" in output and "onnx.tolerance: -1 is out of range (allowed: >= 0)" in output
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_the_exported_model_passes_the_checker_and_matches_pytorch_at_other_batch_sizes(pipeline, name):
    results, _ = pipeline
    path = results / "onnx" / f"{name}.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert {o.domain: o.version for o in proto.opset_import}[""] == SCHEMA["properties"]["onnx"]["properties"]["opset"]["default"]
    model, record = load_model_file(results / name / "model.pt")
    _, splits, normalise = load_data(results / "data" / MODELS[name])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    test = splits["test"]
    for batch in (1, 7, len(test)):  # the export traced a batch of EXAMPLE_BATCH: the batch dimension is dynamic
        assert batch != EXAMPLE_BATCH
        x = normalise(test.x[len(test) - batch :])
        logits = session.run(None, {INPUT_NAME: x.numpy()})[0]
        with torch.no_grad():
            expected = model.eval()(x).numpy()
        assert logits.shape == (batch, record["num_classes"])
        assert np.abs(logits - expected).max() <= 1e-4, batch
        assert (logits.argmax(1) == expected.argmax(1)).all(), batch


@pytest.mark.slow
def test_the_parity_numbers_and_the_file_are_recorded_in_children_of_the_workflow_run(pipeline, tmp_path):
    results, _ = pipeline
    parent, children = stage_runs(results)
    client = MlflowClient(tracking_uri=f"sqlite:///{results}/mlflow.db")
    held_out = {
        "train": json.loads((results / "evaluate" / "metrics.json").read_text())["accuracy"],
        "finetune": json.loads((results / "finetune" / "metrics.json").read_text())["finetuned"]["accuracy"],
    }
    for name, role in MODELS.items():
        record = json.loads((results / "onnx" / f"{name}.json").read_text())
        run = children[f"export_onnx-{name}"]
        assert run.info.status == "FINISHED" and record["mlflow"]["run_id"] == run.info.run_id
        assert run.data.tags["snakemake.rule"] == "export_onnx"
        parity = record["parity"]
        assert parity["n"] == len(np.load(results / "data" / role / "test_y.npy")) and parity["passed"]
        assert parity["argmax_disagreements"] == 0 and parity["tolerance"] == 1e-4
        assert 0 <= parity["max_abs_diff"] <= 1e-4
        # the same predictions as PyTorch: the accuracy the evaluate / finetune stage measured on the same test split
        assert parity["onnx_accuracy"] == parity["torch_accuracy"] == pytest.approx(held_out[name], abs=1e-12)
        metrics, params = run.data.metrics, run.data.params
        assert metrics["max_abs_diff"] == parity["max_abs_diff"] and metrics["argmax_agreement"] == 1.0
        assert metrics["onnx_test_accuracy"] == parity["onnx_accuracy"]
        assert metrics["ort_samples_per_second"] == pytest.approx(record["throughput"]["ort_samples_per_second"]) and metrics["ort_samples_per_second"] > 0
        assert params["onnx.opset"] == "20" and params["onnx.exporter"] == "dynamo" and params["onnx.tolerance"] == "0.0001"
        assert params["onnx.threads"] == "1"
        assert params["model.run_id"] == children[name].info.run_id == record["model"]["mlflow_run_id"], "the run that made the model"
        artifact = client.download_artifacts(run.info.run_id, f"{name}.onnx", str(tmp_path))
        assert sha256(artifact) == sha256(results / "onnx" / f"{name}.onnx") == record["onnx"]["sha256"]


@pytest.mark.slow
def test_a_failed_parity_check_fails_the_job_with_the_measured_difference_and_leaves_no_onnx(pipeline, tmp_path):
    """A tolerance below the difference the pipeline measured (ONNX Runtime's kernels differ from PyTorch's in the
    last float32 bits), on a copy of the pipeline's results so that only the export runs again."""
    results, _ = pipeline
    measured = json.loads((results / "onnx" / "train.json").read_text())["parity"]["max_abs_diff"]
    assert measured > 0, "ONNX Runtime and PyTorch agree to the bit here: no honest tolerance below the difference"
    copy = tmp_path / "results"
    shutil.copytree(results, copy)  # copy2 keeps the mtimes: Snakemake sees every upstream output up to date
    for stale in ("train.onnx", "train.json"):
        (copy / "onnx" / stale).unlink()
    tolerance = measured / 2
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump({"onnx": {"tolerance": tolerance}, "experiment": "onnx-strict"}))
    run = snakemake(copy, str(copy / "onnx" / "train.onnx"), "--configfile", str(strict))
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-4000:]
    assert "Error in rule export_onnx" in output
    log = (copy / "logs" / "export_onnx-train.log").read_text()
    assert f"max abs difference of the logits {measured:.3e} (tolerance onnx.tolerance={tolerance:g}), 0 argmax disagreement(s)" in log, log
    assert sorted(p.name for p in (copy / "onnx").iterdir()) == ["finetune.json", "finetune.onnx"], "no train.onnx, no temporary file"
    parent, children = stage_runs(copy, "onnx-strict")
    assert list(children) == ["export_onnx-train"], "nothing upstream ran again"
    failed = children["export_onnx-train"]
    assert failed.info.status == "FAILED" and parent.info.status == "FAILED"
    assert failed.data.metrics["max_abs_diff"] == measured and failed.data.params["onnx.tolerance"] == str(tolerance)
