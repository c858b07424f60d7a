"""The configuration has one source of truth (workflow/schemas/config.schema.yaml): config/config.yaml, the README's
table and the name lists in the code agree with it; bad input is rejected before any job runs with a short error
naming the key, the value and what is allowed; the default config plans every stage; `snakemake --lint` passes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import LOCAL_MPIRUN, REPO
from hpcdl.config_check import check_config, load_schema, schema_defaults

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SCHEMA_PATH = REPO / "workflow" / "schemas" / "config.schema.yaml"
SCHEMA = load_schema(SCHEMA_PATH)


def dry_run(tmp_path, override: dict | None = None, *extra):
    command = [SNAKEMAKE, "--dry-run", "--config", f"results={tmp_path / 'results'}"]
    if override is not None:
        path = tmp_path / "override.yaml"
        path.write_text(yaml.safe_dump(override))
        command = [SNAKEMAKE, "--dry-run", "--configfile", str(path), "--config", f"results={tmp_path / 'results'}"]
    result = subprocess.run([*command, *extra], cwd=REPO, capture_output=True, text=True, timeout=120)
    return result, result.stdout + result.stderr


# --- one source of truth ---------------------------------------------------------------------------------------


def test_config_yaml_holds_exactly_the_schema_defaults():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert config == schema_defaults(SCHEMA)


def test_readme_configuration_table_is_generated_from_the_schema():
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "config-reference.py"), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    readme = (REPO / "README.md").read_text()
    for key, default in (("train.epochs", "30"), ("finetune.lr", "0.03"), ("finetune.unfrozen_lr_factor", "0.5"), ("finetune.batch_size", "16")):
        assert re.search(rf"^\| `{re.escape(key)}` \| `{default}` \|", readme, re.M), key


def _enum(*path):
    node = SCHEMA
    for part in path:
        node = node["properties"][part] if "properties" in node else node[part]
        if "$ref" in node:
            node = {**SCHEMA["$defs"][node["$ref"].split("/")[-1]], **node}
    return node["enum"] if "enum" in node else node["items"]["enum"]


def test_the_names_the_code_accepts_are_the_schemas():
    from hpcdl.augment import AUGMENT_NAMES
    from hpcdl.backends import BACKEND_NAMES, COMPRESSION_NAMES
    from hpcdl.data.sources import DEFAULT_BASE_URLS, SOURCE_NAMES
    from hpcdl.loop import MEMORY_FORMATS, PRECISION_NAMES
    from hpcdl.models import MODEL_NAMES, TORCHVISION_ARCHS
    from hpcdl.optim import OPTIMIZER_NAMES, SCHEDULE_NAMES

    assert set(MODEL_NAMES) == set(_enum("train", "model"))
    assert set(BACKEND_NAMES) == set(_enum("train", "backend"))
    assert set(COMPRESSION_NAMES) == set(_enum("train", "compression"))
    assert set(PRECISION_NAMES) == set(_enum("train", "precision"))
    assert set(MEMORY_FORMATS) == set(_enum("train", "memory_format"))
    assert set(SCHEDULE_NAMES) == set(_enum("train", "schedule"))
    assert set(OPTIMIZER_NAMES) == set(_enum("train", "optimizer")) == set(_enum("finetune", "optimizer"))
    assert set(AUGMENT_NAMES) == set(_enum("train", "augment")) == set(_enum("finetune", "augment"))
    assert set(SOURCE_NAMES) == set(SCHEMA["$defs"]["dataset"]["properties"]["source"]["enum"])
    assert set(DEFAULT_BASE_URLS) == set(SCHEMA["properties"]["data"]["properties"]["mirror"]["propertyNames"]["enum"])
    init_pattern = SCHEMA["properties"]["finetune"]["properties"]["init"]["pattern"]
    assert set(re.search(r"torchvision:\(([^)]*)\)", init_pattern).group(1).split("|")) == set(TORCHVISION_ARCHS)
    from hpcdl.finetune import INIT_NAMES

    assert set(MODEL_NAMES) == set(_enum("autoencode", "model"))
    assert set(OPTIMIZER_NAMES) == set(_enum("autoencode", "optimizer"))
    assert set(AUGMENT_NAMES) == set(_enum("autoencode", "augment"))
    assert set(re.fullmatch(r"\^\(([^(]*)\|torchvision:.*", init_pattern).group(1).split("|")) == set(INIT_NAMES)


def test_the_keys_a_sweep_may_vary_are_the_schemas():
    from hpcdl.sweep_grid import SWEEP_KEYS

    grid = SCHEMA["properties"]["sweep"]["properties"]["grid"]
    assert set(SWEEP_KEYS) == set(grid["propertyNames"]["enum"]) == set(grid["properties"])
    for key in SWEEP_KEYS:  # each swept value is checked by that train key's own definition
        assert grid["properties"][key]["items"] == {"$ref": f"#/properties/train/properties/{key.split('.', 1)[1]}"}, key


# --- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"train": {"learning_rate": 0.1}}, "train.learning_rate: unknown key (allowed: augment, backend,"),
        ({"train": {"lr": -1}}, "train.lr: -1 is out of range (allowed: > 0)"),
        ({"train": {"ranks": 0}}, "train.ranks: 0 is out of range (allowed: >= 1)"),
        ({"train": {"model": "vgg99"}}, "train.model: 'vgg99' is not allowed (allowed: mlp, lenet5, cnn, resnet18)"),
        ({"train": {"augment": ["cutmix"]}}, "train.augment.0: 'cutmix' is not allowed (allowed: random-crop, hflip, rotate)"),
        ({"train": {"epochs": "5"}}, "train.epochs: '5' is not an integer"),
        ({"data": {"pretrain": {"source": "imagenet"}}}, "data.pretrain.source: 'imagenet' is not allowed (allowed: mnist5k, digits,"),
        ({"data": {"pretrain": {"source": "imagefolder"}}}, "data.pretrain.path: missing (required)"),
        ({"data": {"channels": 2}}, "data.channels: 2 is not allowed (allowed: 1, 3)"),
        ({"data": {"mirror": {"svhn": "https://x/"}}}, "data.mirror: 'svhn' is not allowed (allowed: mnist, fashion-mnist, cifar10)"),
        ({"finetune": {"init": "torchvision:resnet18"}}, "finetune.weights: null is not a mapping"),
        ({"finetune": {"weights": {"url": "https://x/y.pth", "sha256": "abc"}, "init": "torchvision:resnet18"}}, "finetune.weights.sha256: 'abc' does not match"),
        ({"container_sandbox": "/scratch/my images/hpcdl"}, "container_sandbox: '/scratch/my images/hpcdl' does not match"),
        ({"train": {"backend": "torch", "compression": "fp16"}}, "train.compression: 'fp16' needs train.backend horovod"),
        ({"experimnet": "typo"}, "experimnet: unknown key (allowed: autoencode, container, container_sandbox, data, experiment,"),
    ],
)
def test_bad_config_is_rejected_before_any_job_in_one_line(tmp_path, override, expected):
    result, output = dry_run(tmp_path, override)
    assert result.returncode != 0
    assert expected in output, output[-3000:]
    assert len(output.strip().splitlines()) <= 10, f"a short error, not a schema dump:\n{output}"
    assert not (tmp_path / "results").exists()


def test_every_problem_of_a_config_is_listed_once():
    config = schema_defaults(SCHEMA)
    config["train"].update(model="vgg99", lr=0, learning_rate=1)
    with pytest.raises(ValueError) as error:
        check_config(config, SCHEMA_PATH)
    lines = str(error.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == ["train.learning_rate", "train.lr", "train.model"]


# --- the plan -----------------------------------------------------------------------------------------------------


def test_default_config_plans_every_stage(tmp_path):
    result, output = dry_run(tmp_path)
    assert result.returncode == 0, output
    for rule in ("fetch", "preprocess", "train", "evaluate", "finetune"):
        assert f"rule {rule}:" in output, rule
    assert f"mpi={LOCAL_MPIRUN}, nodes=1, tasks=2" in output, "training runs as 2 MPI ranks by default"
    assert not (tmp_path / "results").exists(), "a dry run writes nothing"


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
