"""Autoencoder pretraining (rule autoencode) and fine-tuning from its encoder (finetune.init: autoencoder), through
Snakemake on the embedded data as a user runs it: 2 Horovod ranks learn to reconstruct the images better than
their mean image does, the reconstructions grid and the registered model are in MLflow under the workflow's run,
and fine-tuning starts from exactly the encoder's weights and is compared with the from-scratch baseline."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, SNAKEMAKE, snakemake
from hpcdl.data.download import sha256_file

AE_EPOCHS = 3
OVERRIDES = {
    "autoencode": {"epochs": AE_EPOCHS},
    "finetune": {"init": "autoencoder", "epochs_frozen": 1, "epochs_unfrozen": 1},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`snakemake <results>/finetune/metrics.json` with finetune.init: autoencoder (defaults otherwise: mnist5k,
    digits, horovod, 2 ranks): (results, completed run)."""
    root = tmp_path_factory.mktemp("autoencoder")
    overrides = root / "overrides.yaml"
    overrides.write_text(yaml.safe_dump(OVERRIDES))
    results = root / "results"
    started = time.monotonic()
    done = snakemake(results, str(results / "finetune" / "metrics.json"), "--configfile", str(overrides))
    print(f"autoencode + finetune: {time.monotonic() - started:.1f} s wall")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    return results, done


def client_of(results) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{results}/mlflow.db")


def stage_runs(results) -> dict:
    client = client_of(results)
    runs = client.search_runs([client.get_experiment_by_name("hpcdl-default").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return {"workflow": parent, **{r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}}


def mean_image_val_mse(data_dir) -> float:
    """The trivial reconstruction, computed here from the preprocessed arrays: every validation image predicted
    as the training images' mean, error in the normalised space the autoencoder's loss uses."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    mean, std = (np.array(manifest[k]).reshape(1, -1, 1, 1) for k in ("mean", "std"))
    train = (np.load(data_dir / "train_x.npy") / 255 - mean) / std
    val = (np.load(data_dir / "val_x.npy") / 255 - mean) / std
    return float(((val - train.mean(axis=0, keepdims=True)) ** 2).mean())


def test_autoencoder_learns_to_reconstruct_and_is_tracked(run):
    results, _ = run
    metrics = json.loads((results / "autoencode" / "metrics.json").read_text())
    history = metrics["history"]
    assert len(history) == AE_EPOCHS
    val_losses = [epoch["val_loss"] for epoch in history]
    assert val_losses[-1] < val_losses[0], val_losses
    trivial = mean_image_val_mse(results / "data" / "pretrain")
    assert metrics["mean_image_baseline"]["loss"] == pytest.approx(trivial, rel=1e-4)
    assert val_losses[-1] < 0.6 * trivial, f"val MSE {val_losses[-1]:.4f} vs the mean image's {trivial:.4f}"
    assert metrics["val"]["psnr"] > metrics["mean_image_baseline"]["psnr"]
    assert "accuracy" not in history[0] and "val_accuracy" not in history[0]

    runs = stage_runs(results)
    assert sorted(runs) == ["autoencode", "fetch-finetune", "fetch-pretrain", "finetune", "preprocess-finetune", "preprocess-pretrain", "workflow"], "no classifier pretraining"
    autoencode = runs["autoencode"]
    assert autoencode.info.status == "FINISHED"
    assert autoencode.data.tags["snakemake.rule"] == "autoencode"
    assert autoencode.data.tags["world_size"] == "2" and autoencode.data.tags["backend"] == "horovod"
    assert autoencode.data.params["autoencode.epochs"] == str(AE_EPOCHS) and autoencode.data.params["train.backend"] == "horovod"
    client = client_of(results)
    for name in ("loss", "val_loss", "val_psnr", "lr", "samples_per_second"):
        logged = sorted(client.get_metric_history(autoencode.info.run_id, name), key=lambda m: m.step)
        assert [m.step for m in logged] == list(range(AE_EPOCHS)), name
        assert [m.value for m in logged] == pytest.approx([epoch[name] for epoch in history]), name
    assert "val_accuracy" not in autoencode.data.metrics
    assert autoencode.data.metrics["mean_image_val_loss"] == pytest.approx(trivial, rel=1e-4)

    grid = results / "autoencode" / "reconstructions.png"
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reconstructions.png" in {a.path for a in client.list_artifacts(autoencode.info.run_id)}
    logged_grid = client.download_artifacts(autoencode.info.run_id, "reconstructions.png", str(results.parent))
    assert sha256_file(logged_grid) == sha256_file(grid)

    (version,) = client.search_model_versions("name='hpcdl-autoencoder'")
    assert version.run_id == autoencode.info.run_id
    record = torch.load(results / "autoencode" / "model.pt", map_location="cpu", weights_only=False)
    assert record["kind"] == "autoencoder" and record["arch"] == "lenet5" and record["mlflow_run_id"] == autoencode.info.run_id


def test_finetuning_starts_from_the_encoder_and_is_compared_with_scratch(run):
    from hpcdl.finetune import pretrained_model

    results, _ = run
    runs = stage_runs(results)
    autoencoder = json.loads((results / "autoencode" / "metrics.json").read_text())
    finetune = json.loads((results / "finetune" / "metrics.json").read_text())
    assert finetune["lineage"] == {"init": "autoencoder", "parent_run_id": runs["autoencode"].info.run_id,
                                   "parent_model_uri": autoencoder["mlflow"]["model_uri"]}
    assert runs["finetune"].data.tags["lineage.parent_run_id"] == runs["autoencode"].info.run_id
    assert runs["finetune"].data.tags["lineage.parent_model_uri"] == autoencoder["mlflow"]["model_uri"]
    assert len(finetune["history"]) == 2 and 0 <= finetune["finetuned"]["accuracy"] <= 1
    assert "accuracy" in finetune["baseline"] and finetune["gain_over_baseline"] == pytest.approx(
        finetune["finetuned"]["accuracy"] - finetune["baseline"]["accuracy"])

    # The model fine-tuning starts from: the classifier whose features are the encoder, weight for weight.
    manifest = json.loads((results / "data" / "finetune" / "manifest.json").read_text())
    classifier, arch, _ = pretrained_model("autoencoder", results / "autoencode" / "model.pt", manifest)
    encoder = torch.load(results / "autoencode" / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
    features = classifier.features.state_dict()
    assert arch == "lenet5" and set(features) == {k.removeprefix("features.") for k in encoder if k.startswith("features.")}
    for key, value in features.items():
        assert torch.equal(value, encoder[f"features.{key}"]), key
    assert classifier.head.out_features == len(manifest["classes"]) and not hasattr(classifier, "decoder")


def test_psnr_is_measured_on_the_pixels_the_images_had(digits_dir):
    """val_psnr and the reconstructions grid map the model's normalised output back to 0..1 pixels: a perfect
    reconstruction scores the 100 dB cap, one off by 1/255 on every pixel of a 3-channel image scores 48.1 dB."""
    from hpcdl.loop import OBJECTIVES, Normaliser
    from hpcdl.stage_runtime import load_data

    _, splits, normalise = load_data(digits_dir)
    val = splits["val"]
    indices = np.arange(len(val))
    exact = normalise(torch.from_numpy(np.array(val.x)))
    loss_sum, psnr_sum = OBJECTIVES["reconstruct"].eval_sums(exact, val, indices, normalise)
    assert loss_sum == pytest.approx(0, abs=1e-6) and psnr_sum / len(val) == pytest.approx(100, abs=1e-3)

    colour = Normaliser(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    pixels = torch.full((2, 3, 4, 4), 100, dtype=torch.uint8)
    off = colour.from_unit((pixels.float() + 1) / 255)
    assert torch.allclose(colour.to_unit(colour(pixels)), pixels.float() / 255, atol=1e-6)
    mse_pixels = (colour.to_unit(off) - pixels.float() / 255).pow(2).mean()
    assert float(-10 * torch.log10(mse_pixels)) == pytest.approx(20 * np.log10(255), abs=1e-2)


def test_init_autoencoder_refuses_a_classifier_file(tmp_path):
    from hpcdl.finetune import pretrained_model
    from hpcdl.models import build_model
    from hpcdl.stage_runtime import model_record, save_model_file

    manifest = {"channels": 1, "image_size": 16, "num_classes": 10, "classes": [str(d) for d in range(10)], "mean": [0.3], "std": [0.3]}
    path = tmp_path / "model.pt"
    save_model_file(path, model_record(build_model("lenet5", in_channels=1, image_size=16, num_classes=10), arch="lenet5", manifest=manifest))
    with pytest.raises(ValueError, match=r"finetune.init is 'autoencoder' but this file holds a classifier model"):
        pretrained_model("autoencoder", path, manifest)


def test_autoencode_is_planned_only_when_asked_for(tmp_path):
    def plan(override: dict) -> str:
        path = tmp_path / "override.yaml"
        path.write_text(yaml.safe_dump(override))
        results = tmp_path / "results"
        done = subprocess.run([SNAKEMAKE, "--dry-run", "--configfile", str(path), "--config", f"results={results}", "--",
                               str(results / "evaluate" / "metrics.json"), str(results / "finetune" / "metrics.json")],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    assert "rule autoencode:" not in plan({}), "the default workflow does not train an autoencoder"
    output = plan({"finetune": {"init": "autoencoder"}})
    assert "rule autoencode:" in output and "rule train:" in output, "classifier and autoencoder in one workflow"
    finetune = output[output.index("rule finetune:"):]
    assert "autoencode/model.pt" in finetune.split("output:")[0], "finetune starts from the autoencoder"


@pytest.mark.slow
def test_the_report_shows_the_reconstructions_with_their_caption(run, tmp_path):
    from test_report import assert_report_shows

    results, _ = run
    assert_report_shows(results, [
        ("autoencode/reconstructions.png", "Autoencoder", "Validation images of the pretraining dataset (top row) and their reconstructions"),
        ("finetune/curves.png", "Fine-tuning", "Fine-tuned vs baseline (rule finetune)"),
    ], tmp_path, str(results / "finetune" / "metrics.json"), "--configfile", str(results.parent / "overrides.yaml"))
