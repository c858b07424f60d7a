"""Re-create an MLflow run of this workflow (the workflow's parent run, or one stage's run) from its record, and
compare the result with the original:

    python -m hpcdl.reproduce RUN_ID --tracking-uri http://login1:5000 --results results-repro [--profile ...]

Run it in the checkout. What the record fixes, and what is refused when it cannot be honoured:
- the configuration: the parent run's config.json artifact (the whole config as the run saw it);
- the code: the run's git.commit; refused when the run was made from uncommitted changes (git.dirty), when the
  commit is not in this repository, or when this checkout is not at that commit with a clean tree;
- the image (stages that ran in Apptainer): the configured image file must have the recorded sha256 (images are not
  bit-reproducible, so a rebuilt image is not the same image);
- world size and seeds: from the configuration (checked against the run's world_size tag).
The reproduction runs into a fresh results folder with Snakemake (the recorded config, `results` replaced), every
run it makes tagged `hpcdl.reproduces=<RUN_ID>`. Then: on the CPU the trained weights must be bit-identical (the
sha256 of the state dict of the model the original run logged, and of the new model file) and the metrics equal
(per-epoch histories; throughput and timings excepted). Exit 0 when they are, 1 otherwise; the comparison is
written to <results>/reproduce.json."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPRODUCES_TAG = "hpcdl.reproduces"
TIMING_METRICS = {"samples_per_second", "epoch_seconds", "baseline_samples_per_second", "baseline_epoch_seconds"}
MACHINE_METRIC_PREFIXES = ("seconds.", "peak_rss_mb")  # where time went and memory peaks: the machine's, not the model's
# What a stage's reproduction asks Snakemake for: its outputs, and for train the evaluation of its model too (the
# test accuracy).
STAGE_TARGETS = {
    "train": ["train/model.pt", "evaluate/metrics.json"],
    "autoencode": ["autoencode/model.pt"],
    "evaluate": ["evaluate/metrics.json"],
    "finetune": ["finetune/metrics.json"],
    "preprocess": ["data/pretrain/manifest.json", "data/finetune/manifest.json"],
    "fetch": ["raw/pretrain/fetch.json", "raw/finetune/fetch.json"],
}
MODEL_FILES = {"train": "train/model.pt", "autoencode": "autoencode/model.pt", "finetune": "finetune/model.pt"}


class Refused(SystemExit):
    """The run cannot be re-created as recorded; the message says why and what to do."""


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def check_checkout(run_id: str, tags: dict) -> str:
    commit, dirty = tags.get("git.commit", "unknown"), tags.get("git.dirty")
    if commit == "unknown":
        raise Refused(f"run {run_id} records no git commit: it was not made from a git checkout")
    if dirty == "true":
        raise Refused(f"run {run_id} was made from uncommitted changes on top of {commit} (git.dirty=true): no commit holds its code")
    if git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        raise Refused(f"commit {commit} of run {run_id} is not in this repository: git fetch it first")
    head = git("rev-parse", "HEAD").stdout.strip()
    changes = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    if head != commit or changes:
        state = f"at {head}" + (" with uncommitted changes" if changes else "")
        raise Refused(f"this checkout is {state}, but run {run_id} was made at {commit}: "
                      f"`git switch --detach {commit}` (or `git worktree add ../repro {commit}`) and run reproduce there")
    return commit


def check_image(run_id: str, tags: dict, config: dict) -> bool:
    """True when the run ran in the Apptainer image (then the configured image file must be the same one)."""
    recorded = tags.get("hpcdl.image.sha256")
    if not recorded:
        return False
    image = Path(config["container"])
    if not image.is_file():
        raise Refused(f"run {run_id} ran in the image {tags.get('hpcdl.image.path')} (sha256 {recorded}); {image} does not exist")
    with open(image, "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if actual != recorded:
        raise Refused(f"run {run_id} ran in an image with sha256 {recorded}, but {image} has {actual}: use the image file it "
                      f"ran in ({tags.get('hpcdl.image.path')}); a rebuilt image is never the same one")
    return True


def state_dict_sha256(state_dict: dict) -> str:
    """A digest of the weights themselves (names, dtypes, shapes, bytes), independent of how they were pickled."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def original_weights(client, run) -> dict | None:
    """The state dict of the model the run logged (MLflow 3: its logged model), or None."""
    import mlflow

    outputs = run.outputs.model_outputs if run.outputs else []
    if not outputs:
        return None
    mlflow.set_tracking_uri(client.tracking_uri)  # models:/ URIs resolve against the current store
    model = mlflow.pytorch.load_model(f"models:/{outputs[0].model_id}", map_location="cpu")
    return model.state_dict()


def histories(client, run_id: str, keys) -> dict:
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]
            for key in keys if key not in TIMING_METRICS and not key.startswith(MACHINE_METRIC_PREFIXES)}


def reproduced_runs(client, experiment_name: str, run_id: str) -> list:
    experiment = client.get_experiment_by_name(experiment_name)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{REPRODUCES_TAG}` = '{run_id}'", max_results=1000)


def compare_stage(original_client, original, new_client, new, results: Path) -> dict:
    stage = original.data.tags.get("snakemake.rule")
    report = {"stage": stage, "original_run": original.info.run_id, "new_run": new.info.run_id}
    before = histories(original_client, original.info.run_id, original.data.metrics)
    after = histories(new_client, new.info.run_id, original.data.metrics)
    report["metrics_equal"] = before == after
    report["metrics_differing"] = sorted(key for key in before if before[key] != after.get(key))
    if stage in MODEL_FILES:
        import torch

        weights = original_weights(original_client, original)
        mine = torch.load(results / MODEL_FILES[stage], map_location="cpu", weights_only=False)["state_dict"]
        report["weights_sha256"] = {"original": weights and state_dict_sha256(weights), "new": state_dict_sha256(mine)}
        report["weights_identical"] = weights is not None and report["weights_sha256"]["original"] == report["weights_sha256"]["new"]
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_id")
    parser.add_argument("--tracking-uri", required=True, help="the store the run is in (a server, or sqlite:///<results>/mlflow.db)")
    parser.add_argument("--results", required=True, type=Path, help="a fresh results folder for the reproduction")
    parser.add_argument("--profile", help="Snakemake profile of the reproduction (default: the image's, profiles/apptainer, "
                        "when the run ran in Apptainer, else the local one)")
    parser.add_argument("--cores", default="all")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=args.tracking_uri)
    run = client.get_run(args.run_id)
    parent_id = run.data.tags.get("mlflow.parentRunId")
    parent = client.get_run(parent_id) if parent_id else run
    stage = run.data.tags.get("snakemake.rule") if parent_id else None
    if stage is not None and stage not in STAGE_TARGETS:
        raise Refused(f"run {args.run_id} is a {stage} run; reproduce takes the workflow's run or one of: {', '.join(STAGE_TARGETS)}")
    with tempfile.TemporaryDirectory() as tmp:
        config = json.loads(Path(client.download_artifacts(parent.info.run_id, "config.json", tmp)).read_text())
    commit = check_checkout(args.run_id, run.data.tags)
    in_image = check_image(args.run_id, run.data.tags, config)
    if stage in ("train", "autoencode", "finetune") and run.data.tags.get("world_size") != str(config[stage]["ranks"]):
        raise Refused(f"run {args.run_id} ran on {run.data.tags.get('world_size')} ranks but its config says {config[stage]['ranks']}")
    if args.results.exists():
        raise Refused(f"{args.results} exists: reproduce writes into a fresh folder")

    results = args.results.resolve()
    config["results"] = str(results)
    config_file = Path(tempfile.mkdtemp(prefix="hpcdl-reproduce-")) / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    targets = [str(results / target) for target in STAGE_TARGETS[stage]] if stage else []
    profile = args.profile or ("profiles/apptainer" if in_image else None)
    command = [str(Path(sys.executable).with_name("snakemake")), "--cores", args.cores, "--configfile", str(config_file),
               *(["--profile", profile] if profile else []), *(["--", *targets] if targets else [])]
    print(f"hpcdl: reproducing {'stage ' + stage if stage else 'workflow'} run {args.run_id} at commit {commit} into {results}", flush=True)
    env = dict(os.environ, HPCDL_REPRODUCES=args.run_id)
    if subprocess.run(command, env=env).returncode != 0:
        print("hpcdl: the reproduction's workflow failed", file=sys.stderr)
        return 1

    new_uri = config["tracking_uri"] or f"sqlite:///{results}/mlflow.db"
    new_client = MlflowClient(tracking_uri=new_uri)
    new_runs = reproduced_runs(new_client, config["experiment"], args.run_id)
    originals = [run] if stage else [r for r in client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000)]
    reports = []
    for original in originals:
        matching = [r for r in new_runs if r.info.run_name == original.info.run_name and r.data.tags.get("mlflow.parentRunId")]
        if not matching:
            reports.append({"stage": original.info.run_name, "original_run": original.info.run_id, "new_run": None, "metrics_equal": False})
            continue
        reports.append(compare_stage(client, original, new_client, matching[0], results))
    if stage == "train":  # the test accuracy of the trained model: the original evaluation of it vs the new one
        evaluation = client.search_runs([parent.info.experiment_id], f"tags.`hpcdl.model_run_id` = '{args.run_id}'", max_results=1)
        new_accuracy = json.loads((results / "evaluate" / "metrics.json").read_text())["accuracy"]
        old_accuracy = evaluation[0].data.metrics.get("test_accuracy") if evaluation else None
        reports.append({"stage": "evaluate", "test_accuracy": {"original": old_accuracy, "new": new_accuracy}, "metrics_equal": old_accuracy == new_accuracy})
    identical = all(r.get("metrics_equal") and r.get("weights_identical", True) for r in reports)
    (results / "reproduce.json").write_text(json.dumps({"run_id": args.run_id, "commit": commit, "identical": identical, "stages": reports}, indent=2))
    for r in reports:
        print(f"hpcdl: {r['stage']}: metrics {'equal' if r.get('metrics_equal') else 'DIFFER ' + str(r.get('metrics_differing', ''))}"
              + (f"; weights {'bit-identical' if r['weights_identical'] else 'DIFFER'} (sha256 {r['weights_sha256']['new'][:16]})" if "weights_identical" in r else "")
              + (f"; test accuracy {r['test_accuracy']['original']} -> {r['test_accuracy']['new']}" if "test_accuracy" in r else ""), flush=True)
    print(f"hpcdl: reproduction of {args.run_id} {'identical' if identical else 'DIFFERS'}; report {results / 'reproduce.json'}", flush=True)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
