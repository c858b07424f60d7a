"""Fine-tuning from torchvision weights (finetune.init: torchvision:<arch>): the weights file is accepted only
with the configured sha256, and the fine-tuned run records where it started from."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import torchvision

from conftest import DEFAULT_CONFIG, REPO, mpi_env, mpirun, tracking
from hpcdl.data.download import sha256_file


def fetch_weights(tmp_path, source, digest, out):
    params = {"mlflow": tracking(tmp_path), "arch": "resnet18", "weights": {"path": str(source), "sha256": digest}}
    return subprocess.run([sys.executable, "-m", "hpcdl.fetch", "--params", json.dumps(params), "--weights-out", str(out)],
                          cwd=REPO, env=mpi_env(), capture_output=True, text=True, timeout=120)


def test_torchvision_weights_are_verified_then_fine_tuned(data_copy, tmp_path):
    torch.manual_seed(0)
    source = tmp_path / "resnet18-imagenet.pth"  # torchvision's state-dict format; random values (no download here)
    torch.save(torchvision.models.resnet18().state_dict(), source)
    digest = sha256_file(source)
    weights = tmp_path / "raw" / "weights" / "resnet18.pth"

    wrong = fetch_weights(tmp_path, source, "0" * 64, weights)
    assert wrong.returncode != 0
    assert "sha256 mismatch" in wrong.stderr and digest in wrong.stderr and "0" * 64 in wrong.stderr
    assert not weights.exists() and not list(weights.parent.glob("*.part"))

    assert fetch_weights(tmp_path, source, digest, weights).returncode == 0
    assert sha256_file(weights) == digest

    finetune = {**DEFAULT_CONFIG["finetune"], "init": "torchvision:resnet18", "weights": {"path": str(source), "sha256": digest},
                "lr": 0.01, "weight_decay": 0.0, "batch_size": 32, "epochs_frozen": 1, "epochs_unfrozen": 0, "ranks": 1,
                "augment": [], "baseline": False, "registered_model": "tv-finetuned"}
    train = {**DEFAULT_CONFIG["train"], "backend": "torch", "warmup_epochs": 0}
    out = tmp_path / "finetune"
    mpirun(1, "hpcdl.finetune", ["--params", json.dumps({"mlflow": tracking(tmp_path), "finetune": finetune, "train": train}),
                                 "--init", str(weights), "--data-dir", str(data_copy), "--out-dir", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lineage"] == {"init": "torchvision:resnet18", "weights_sha256": digest}
    assert len(metrics["history"]) == 1 and "baseline" not in metrics
    record = torch.load(out / "model.pt", map_location="cpu", weights_only=False)
    assert record["arch"] == "torchvision:resnet18" and record["num_classes"] == 10
