"""notebooks/compare_runs.ipynb executed headless by papermill, as CI and users run it: against the default
pipeline's MLflow store (its table holds the pipeline's workflow run with the accuracies of its metrics.json files),
against a store whose workflow runs lack stages, and against a store that is not there (a clear error, no empty
store made). The committed notebook has no outputs and a papermill parameters cell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import DEFAULT_CONFIG, REPO

NOTEBOOK = REPO / "notebooks" / "compare_runs.ipynb"
PAPERMILL = str(Path(sys.executable).with_name("papermill"))
KERNEL = "hpcdl-test"


@pytest.fixture(scope="session")
def jupyter_env(tmp_path_factory) -> dict:
    """The environment papermill runs in: a kernelspec for this interpreter and Jupyter's and IPython's folders, all
    in a temporary directory (nothing is installed machine-wide or written to the home folder)."""
    root = tmp_path_factory.mktemp("jupyter")
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(root), "--name", KERNEL], check=True, capture_output=True, timeout=120)
    return dict(os.environ, JUPYTER_PATH=str(root / "share" / "jupyter"), JUPYTER_DATA_DIR=str(root / "data"),
                JUPYTER_RUNTIME_DIR=str(root / "runtime"), JUPYTER_CONFIG_DIR=str(root / "config"), IPYTHONDIR=str(root / "ipython"))


def execute(jupyter_env: dict, folder: Path, tracking_uri: str, experiment: str = "hpcdl-default"):
    """papermill the notebook with these parameters; (completed process, executed notebook, summary JSON path)."""
    executed, summary = folder / "compare_runs.out.ipynb", folder / "summary.json"
    command = [PAPERMILL, str(NOTEBOOK), str(executed), "-k", KERNEL, "--cwd", str(folder), "--no-progress-bar",
               "-p", "tracking_uri", tracking_uri, "-p", "experiment", experiment, "-p", "summary_path", str(summary)]
    run = subprocess.run(command, env=jupyter_env, capture_output=True, text=True, timeout=300)
    return run, executed, summary


def outputs(executed: Path) -> list:
    return [output for cell in nbformat.read(executed, as_version=4).cells if cell.cell_type == "code" for output in cell.outputs]


def test_committed_notebook_has_no_outputs_and_a_parameters_cell():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), "commit the notebook without outputs"
    (parameters,) = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    defined: dict = {}
    exec(parameters.source, defined)
    assert {"tracking_uri", "experiment", "summary_path"} <= set(defined)
    assert defined["experiment"] == DEFAULT_CONFIG["experiment"]


@pytest.mark.slow
def test_notebook_tables_the_pipelines_workflow_run(pipeline, jupyter_env, tmp_path):
    from mlflow.tracking import MlflowClient

    results, _ = pipeline
    uri = f"sqlite:///{results}/mlflow.db"
    run, executed, summary = execute(jupyter_env, tmp_path, uri)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    evaluation = json.loads((results / "evaluate" / "metrics.json").read_text())
    finetune = json.loads((results / "finetune" / "metrics.json").read_text())
    workflow_run = MlflowClient(tracking_uri=uri).get_run(finetune["mlflow"]["run_id"]).data.tags["mlflow.parentRunId"]
    rows = {row["run_id"]: row for row in json.loads(summary.read_text())}
    row = rows[workflow_run]
    train = DEFAULT_CONFIG["train"]
    assert (row["model"], row["ranks"], row["batch_size"], row["epochs"], row["backend"]) == tuple(str(train[k]) for k in ("model", "ranks", "batch_size", "epochs", "backend"))
    assert row["test_accuracy"] == pytest.approx(evaluation["accuracy"], rel=1e-12)
    assert row["finetuned_accuracy"] == pytest.approx(finetune["finetuned"]["accuracy"], rel=1e-12)
    assert row["baseline_accuracy"] == pytest.approx(finetune["baseline"]["accuracy"], rel=1e-12)
    assert {"train", "evaluate", "finetune"} <= set(row["stages"].split(", "))

    shown = outputs(executed)
    assert not [o for o in shown if o.output_type == "error"]
    table = next(o.data["text/html"] for o in shown if o.output_type == "execute_result" and "text/html" in o.data)
    assert workflow_run in table and f"{100 * evaluation['accuracy']:.2f}%" in table
    assert sum("image/png" in o.get("data", {}) for o in shown) == 2, "the overlaid curves and the fine-tuned vs baseline bars"


def test_notebook_copes_with_workflow_runs_missing_stages(jupyter_env, tmp_path):
    """One workflow run that only trained, one that only fine-tuned (without baseline), and a stage run without a
    workflow run: the table has the two workflow runs with empty columns where a stage is missing; both plots draw."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("study")

    def start(name, parent=None, params=None):
        run = client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent} if parent else {})
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in (params or {}).items()])
        return run.info.run_id

    only_train = start("workflow", params={"train.model": "resnet18", "train.ranks": 4, "train.batch_size": 32, "train.epochs": 3, "train.backend": "nccl"})
    train = start("train", only_train)
    client.log_batch(train, metrics=[Metric(key, value, 0, epoch) for epoch in range(3) for key, value in (("loss", 1.0 / (epoch + 1)), ("val_accuracy", 0.5 + 0.1 * epoch))])
    only_finetune = start("workflow", params={"train.model": "lenet5"})
    client.log_metric(start("finetune", only_finetune), "test_accuracy", 0.9)
    start("evaluate")  # a stage run logged without a workflow run: not a row

    run, executed, summary = execute(jupyter_env, tmp_path, uri, experiment="study")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {row["run_id"]: row for row in json.loads(summary.read_text())}
    assert set(rows) == {only_train, only_finetune}
    assert rows[only_train] | {"run_id": None, "started": None} == {
        "run_id": None, "started": None, "status": "RUNNING", "model": "resnet18", "ranks": "4", "batch_size": "32", "epochs": "3",
        "backend": "nccl", "test_accuracy": None, "finetuned_accuracy": None, "baseline_accuracy": None, "stages": "train"}
    assert (rows[only_finetune]["finetuned_accuracy"], rows[only_finetune]["baseline_accuracy"], rows[only_finetune]["ranks"]) == (0.9, None, None)
    assert sum("image/png" in o.get("data", {}) for o in outputs(executed)) == 2


def test_notebook_names_a_missing_store_and_creates_none(jupyter_env, tmp_path):
    missing = tmp_path / "no-results" / "mlflow.db"
    run, _, summary = execute(jupyter_env, tmp_path, f"sqlite:///{missing}")
    assert run.returncode != 0
    assert f"tracking_uri='sqlite:///{missing}': no such SQLite file" in run.stdout + run.stderr
    assert not missing.exists() and not summary.exists()
