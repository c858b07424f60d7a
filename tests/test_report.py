"""`snakemake --report` over the default pipeline's results: one self-contained HTML file that holds every figure
(embedded as base64), each with its caption in its category, and the workflow's description; making it runs no job.
Also: the curves PNGs themselves."""

from __future__ import annotations

import base64
import html
import json
import re

import pytest

from conftest import snakemake

# What the report must show: (file under the results folder, category, words of its caption). One line per item;
# the figures of stages added later (autoencoder reconstructions, sweep plots) go here the same way.
EXPECTED_ITEMS = [
    ("train/curves.png", "Training", "Training curves of the pretraining run (rule train)"),
    ("evaluate/confusion_matrix.png", "Evaluation", "Confusion matrix of the model on the held-out test split"),
    ("evaluate/misclassified.png", "Evaluation", 'Test images the trained model got wrong, titled "true -> predicted"'),
    ("finetune/confusion_matrix.png", "Fine-tuning", "Confusion matrix of the model on the held-out test split"),
    ("finetune/curves.png", "Fine-tuning", "Fine-tuned vs baseline (rule finetune)"),
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def embedded(page: str, script_id: str, variable: str):
    """The JSON a Snakemake 9 report embeds as `<script id="..."> var name = {...}; </script>`."""
    match = re.search(rf'<script id="{script_id}">\s*var {variable} = (.*?);\s*</script>', page, re.S)
    assert match, f"no <script id={script_id!r}> in the report"
    return json.loads(match.group(1))


def text_of(fragment: str) -> str:
    """The words of an HTML fragment: tags removed, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", fragment)).split())


def file_mtimes(folder):
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def assert_report_shows(results, expected, tmp_path, *args) -> str:
    """`snakemake --report` over a finished run's results (args: the same targets and config files): it runs no job
    and embeds each (path, category, caption) of `expected` as that very PNG, captioned, in its category. Returns
    the page. The autoencoder's and the sweep's tests use it for their figures."""
    before = file_mtimes(results)
    report = tmp_path / "report.html"
    made = snakemake(results, "--report", str(report), *args, timeout=300)
    assert made.returncode == 0, made.stdout[-4000:] + made.stderr[-4000:]
    assert "Report created" in made.stdout + made.stderr
    assert file_mtimes(results) == before, "making the report must not run any job or touch the results"

    page = report.read_text()
    items = {path.removeprefix(f"{results}/"): item for path, item in embedded(page, "results", "results").items()}
    categories = embedded(page, "categories", "categories")
    in_category = {path.removeprefix(f"{results}/"): name for name, subcategories in categories.items() for paths in subcategories.values() for path in paths}
    for path, category, caption in expected:
        assert path in items, f"{path} is not in the report (it has: {sorted(items)})"
        item = items[path]
        assert in_category[path] == category, path
        assert caption in text_of(item["caption"]), f"{path}: caption {text_of(item['caption'])!r}"
        header, _, data = item["data_uri"].partition(";base64,")
        assert header.startswith("data:image/png;"), header
        picture = base64.b64decode(data)
        assert picture[:8] == PNG_MAGIC and picture == (results / path).read_bytes(), f"{path}: embedded image differs from the file"
    return page


@pytest.mark.slow
def test_report_embeds_every_figure_with_its_caption(pipeline, tmp_path):
    results, _ = pipeline
    page = assert_report_shows(results, EXPECTED_ITEMS, tmp_path)
    description = text_of(embedded(page, "workflow-desc", "workflow_desc"))
    assert "hpcdl: from one notebook to many MPI ranks" in description
    assert f"This report shows one results folder of the hpcdl workflow ({results})" in description
    assert "MLflow experiment hpcdl-default" in description


@pytest.mark.slow
def test_finetune_curves_draw_the_baseline_history_mlflow_recorded(pipeline):
    """The fine-tuned-vs-baseline figure's baseline curves come from the finetune run's baseline_* metrics: they are
    in metrics.json, one entry per epoch of the same budget as the fine-tuned model, equal to MLflow's record."""
    from mlflow.tracking import MlflowClient

    results, _ = pipeline
    summary = json.loads((results / "finetune" / "metrics.json").read_text())
    assert len(summary["baseline_history"]) == len(summary["history"]) > 0
    client = MlflowClient(tracking_uri=f"sqlite:///{results}/mlflow.db")
    recorded = sorted(client.get_metric_history(summary["mlflow"]["run_id"], "baseline_val_accuracy"), key=lambda m: m.step)
    assert [m.value for m in recorded] == [entry["val_accuracy"] for entry in summary["baseline_history"]]
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow"]["run_id"], "finetune")}
    assert "finetune/curves.png" in artifacts
    train_run = json.loads((results / "train" / "metrics.json").read_text())["mlflow"]["run_id"]
    assert "train/curves.png" in {a.path for a in client.list_artifacts(train_run, "train")}


def test_curves_are_png_files_and_a_bad_history_leaves_none(tmp_path):
    from hpcdl.plots import plot_finetune_curves, plot_training_curves

    history = [{"loss": 1.0 / (e + 1), "val_loss": 1.1 / (e + 1), "accuracy": 0.5 + e / 10, "val_accuracy": 0.45 + e / 10} for e in range(4)]
    drawn = plot_training_curves(history, tmp_path / "train.png", title="train")
    assert drawn.read_bytes()[:8] == PNG_MAGIC
    both = plot_finetune_curves(history, 1, history, {"fine-tuned": 0.9, "baseline": 0.8}, tmp_path / "finetune.png", title="ft")
    assert both.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(KeyError):
        plot_training_curves([{"loss": 1.0}], tmp_path / "broken.png", title="a history without val_loss")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune.png", "train.png"], "no partial or temporary file is left"
