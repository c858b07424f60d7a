"""The config schema rejects bad input before any job runs, naming the key (as `snakemake -n` shows it), and
the default config plans every stage; the workflow passes `snakemake --lint`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def dry_run(tmp_path, override: dict | None = None, *extra):
    command = [SNAKEMAKE, "--dry-run", "--config", f"results={tmp_path / 'results'}"]
    if override is not None:
        path = tmp_path / "override.yaml"
        path.write_text(yaml.safe_dump(override))
        command = [SNAKEMAKE, "--dry-run", "--configfile", str(path), "--config", f"results={tmp_path / 'results'}"]
    result = subprocess.run([*command, *extra], cwd=REPO, capture_output=True, text=True, timeout=120)
    return result, result.stdout + result.stderr


def test_default_config_plans_every_stage(tmp_path):
    result, output = dry_run(tmp_path)
    assert result.returncode == 0, output
    for rule in ("fetch", "preprocess", "train", "evaluate", "finetune"):
        assert f"rule {rule}:" in output, rule
    assert "mpi=mpirun --bind-to none --mca mpi_yield_when_idle 1, tasks=2" in output, "training runs as 2 MPI ranks by default"
    assert not (tmp_path / "results").exists(), "a dry run writes nothing"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"train": {"learning_rate": 0.1}}, "learning_rate"),
        ({"train": {"lr": -1}}, "lr"),
        ({"train": {"ranks": 0}}, "ranks"),
        ({"train": {"model": "vgg99"}}, "vgg99"),
        ({"train": {"augment": ["cutmix"]}}, "cutmix"),
        ({"data": {"pretrain": {"source": "imagenet"}}}, "imagenet"),
        ({"data": {"pretrain": {"source": "imagefolder"}}}, "path"),
        ({"data": {"channels": 2}}, "channels"),
        ({"finetune": {"init": "torchvision:resnet18"}}, "weights"),
        ({"finetune": {"weights": {"url": "https://x/y.pth", "sha256": "abc"}, "init": "torchvision:resnet18"}}, "sha256"),
        ({"experimnet": "typo"}, "experimnet"),
    ],
)
def test_bad_config_is_rejected_before_any_job_naming_the_key(tmp_path, override, named):
    result, output = dry_run(tmp_path, override)
    assert result.returncode != 0
    assert "Error validating config file" in output
    assert named in output
    assert not (tmp_path / "results").exists()


def test_workflow_passes_snakemake_lint():
    result = subprocess.run([SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_torchvision_init_plans_a_verified_weights_fetch(tmp_path):
    override = {"finetune": {"init": "torchvision:resnet18", "weights": {"path": "/data/resnet18.pth", "sha256": "a" * 64}}}
    result, output = dry_run(tmp_path, override)
    assert result.returncode == 0, output
    assert "rule fetch_weights:" in output and "--weights-out" in output
    finetune = output[output.index("rule finetune:"):]
    assert "raw/weights/resnet18.pth" in finetune.split("output:")[0], "finetune starts from the fetched weights"
