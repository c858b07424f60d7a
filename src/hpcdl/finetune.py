"""Rule finetune: transfer learning onto the target dataset, launched as N MPI ranks like train.

The pretrained model (this workflow's, or torchvision ImageNet weights) gets a new head for the target classes;
phase `frozen` trains only the head, phase `unfrozen` trains everything at lr x unfrozen_lr_factor. With
`baseline`, the same architecture is trained from scratch for the same number of epochs (phase `baseline`, at
finetune.lr) so the benefit of pretraining is measured, not assumed. Each phase checkpoints and resumes."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import torch

from hpcdl import tracking
from hpcdl.atomic import atomic_write_json
from hpcdl.autoencoder import MODEL_KIND, classifier_from_encoder
from hpcdl.checkpoint import CheckpointStore, config_digest
from hpcdl.cli import stage_parser
from hpcdl.data.download import sha256_file
from hpcdl.evaluate import evaluate_model
from hpcdl.loop import PhaseSpec, fit
from hpcdl.models import TorchvisionBackbone, build_model, replace_head, set_backbone_trainable
from hpcdl.optim import build_optimizer, build_schedule
from hpcdl.plots import plot_finetune_curves
from hpcdl.stage_clock import StageClock
from hpcdl.stage_runtime import (
    MlflowEpochReporter,
    StopRequest,
    exit_resumable,
    load_data,
    load_model_file,
    log_memory,
    log_model,
    model_record,
    run_context,
    run_on_all_ranks,
    save_model_file,
    stage_tags,
    start_backend,
)


# finetune.init values that name a model this workflow makes (the schema's pattern adds torchvision:<arch>):
# `pretrain` the classifier of rule train, `autoencoder` the encoder of rule autoencode.
INIT_NAMES = ("pretrain", "autoencoder")


def pretrained_model(init: str, init_file: Path, manifest: dict):
    """(model with the target head, arch name, lineage) for finetune.init."""
    if init in INIT_NAMES:
        model, record = load_model_file(init_file)
        for key in ("in_channels", "image_size"):
            target = manifest["channels" if key == "in_channels" else key]
            if record[key] != target:
                raise ValueError(f"{init_file}: pretrained model has {key}={record[key]} but the fine-tuning data has {target}; set data.channels/data.image_size for both datasets")
        lineage = {"parent_run_id": record.get("mlflow_run_id"), "parent_model_uri": record.get("model_uri"), "init": init}
        if init == "autoencoder":  # the classifier of the same arch: the encoder's weights as `features`, a new head
            if record.get("kind") != MODEL_KIND:
                raise ValueError(f"{init_file}: finetune.init is 'autoencoder' but this file holds a {record.get('kind', 'classifier')} model, not rule autoencode's")
            classifier = classifier_from_encoder(model, record["arch"], in_channels=record["in_channels"], image_size=record["image_size"], num_classes=manifest["num_classes"])
            return classifier, record["arch"], lineage
        return replace_head(model, manifest["num_classes"]), record["arch"], lineage
    arch = init.split(":", 1)[1]
    state = torch.load(init_file, map_location="cpu", weights_only=True)
    model = TorchvisionBackbone(arch, state, manifest["num_classes"])
    return model, init, {"init": init, "weights_sha256": sha256_file(init_file)}


def scratch_model(arch: str, manifest: dict):
    if arch.startswith("torchvision:"):
        return TorchvisionBackbone(arch.split(":", 1)[1], None, manifest["num_classes"])
    return build_model(arch, in_channels=manifest["channels"], image_size=manifest["image_size"], num_classes=manifest["num_classes"])


def main(argv=None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--init", required=True, type=Path, help="pretrained model file or torchvision weights")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--out-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    clock = StageClock()
    ft, tr = args.params["finetune"], args.params["train"]
    if ft["epochs_frozen"] + ft["epochs_unfrozen"] < 1:
        raise ValueError("finetune.epochs_frozen + finetune.epochs_unfrozen must be at least 1")
    stop = StopRequest()  # first: a walltime signal during start-up must not kill the rank
    backend, device = start_backend(tr["backend"], ft["threads_per_rank"], tr.get("compression", "none"))
    clock.mark("mpi_setup")
    manifest, splits, normalise = load_data(args.data_dir)
    clock.mark("data")
    torch.manual_seed(ft["seed"])
    model, arch, lineage = pretrained_model(ft["init"], args.init, manifest)
    checkpoint_dir = args.out_dir / "checkpoints"
    digest = config_digest({"finetune": ft, "train": tr, "data": manifest["files"], "init": sha256_file(args.init), "world_size": backend.size})
    world = backend.size

    def train_phase(net, name, epochs, lr, reporter, trainable_backbone):
        if epochs == 0:
            return net, []
        set_backbone_trainable(net, trainable_backbone)
        spec = PhaseSpec(name, epochs, ft["batch_size"], ft["seed"], ft["augment"], tr["precision"], tr["grad_accum_steps"], tr["memory_format"])
        store = CheckpointStore(checkpoint_dir / f"{name}.pt", digest)
        resume = backend.broadcast_object(store.load() if backend.is_root else None)
        trained, history = fit(
            model=net, backend=backend, device=device,
            make_optimizer=lambda params: build_optimizer(ft["optimizer"], params, lr=lr * world, momentum=ft["momentum"], nesterov=tr["nesterov"], weight_decay=ft["weight_decay"]),
            make_scheduler=lambda opt, steps: build_schedule(opt, world_size=world, warmup_steps=min(tr["warmup_epochs"], epochs) * steps, total_steps=epochs * steps, schedule=tr["schedule"]),
            train=splits["train"], val=splits["val"], normalise=normalise, spec=spec, store=store, resume=resume, reporter=reporter,
            should_stop=stop,
        )
        if len(history) < epochs:
            exit_resumable(backend, name, len(history), epochs, store.path)
        return trained, history

    resume_run = tracking.resumable_run(checkpoint_dir, digest) if backend.is_root else None
    with run_context(backend, args.params["mlflow"], stage="finetune", parent_run_file=args.parent_run, resume=resume_run, tags=stage_tags("finetune", backend, image_record=args.params.get("image_record"))) as run:
        if backend.is_root:
            tracking.remember_run(checkpoint_dir, digest, run)
            tracking.print_where(args.params["mlflow"], run)
            if resume_run is None or tracking.is_continuation(run):
                mlflow.log_params(tracking.flatten({"finetune": ft, "train": tr}))
                mlflow.set_tags({f"lineage.{k}": v for k, v in lineage.items() if v is not None})
            if resume_run is not None:
                tracking.print_resuming(resume_run, run)
        clock.mark("mlflow_setup")
        model, frozen = train_phase(model, "frozen", ft["epochs_frozen"], ft["lr"], MlflowEpochReporter(), trainable_backbone=False)
        model, unfrozen = train_phase(model, "unfrozen", ft["epochs_unfrozen"], ft["lr"] * ft["unfrozen_lr_factor"], MlflowEpochReporter(step_offset=ft["epochs_frozen"]), trainable_backbone=True)
        history = frozen + unfrozen
        baseline = None
        if ft["baseline"]:
            torch.manual_seed(ft["seed"])
            baseline = scratch_model(arch, manifest)
            baseline, _ = train_phase(baseline, "baseline", ft["epochs_frozen"] + ft["epochs_unfrozen"], ft["lr"], MlflowEpochReporter(prefix="baseline_"), trainable_backbone=True)
        clock.mark("epochs")
        log_memory(backend)
        if backend.is_root:
            finish(model, baseline, arch, lineage, ft, manifest, splits, normalise, history, args.out_dir, run)
            clock.mark("model_logging")
            mlflow.log_metrics(clock.metrics())
    backend.barrier()
    backend.shutdown()
    return 0


def finish(model, baseline, arch, lineage, ft, manifest, splits, normalise, history, out_dir: Path, run) -> None:
    """Rank 0: test both models, log and register the fine-tuned one, then write the rule's outputs."""
    report = evaluate_model(model, manifest, splits, normalise, out_dir, title=f"fine-tuned {arch}", misclassified=False)
    metrics = {"test_accuracy": report["accuracy"], "test_loss": report["loss"], "test_macro_f1": report["macro_f1"]}
    summary = {"finetuned": report, "history": history, "lineage": lineage}
    if baseline is not None:
        base_report = evaluate_model(baseline, manifest, splits, normalise, out_dir / "baseline", title=f"scratch {arch}", misclassified=False)
        summary["baseline"] = base_report
        summary["gain_over_baseline"] = report["accuracy"] - base_report["accuracy"]
        metrics.update({"baseline_test_accuracy": base_report["accuracy"], "baseline_test_loss": base_report["loss"], "gain_over_baseline": summary["gain_over_baseline"]})
        mlflow.log_artifact(str(out_dir / "baseline" / "confusion_matrix.png"), artifact_path="baseline")
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(str(out_dir / "confusion_matrix.png"))
    baseline_history = None
    if baseline is not None:
        # main() keeps only the baseline model; its per-epoch history is what this run recorded as baseline_*
        # (complete after a resume too: MlflowEpochReporter.on_resume logs the epochs an attempt missed).
        client = mlflow.MlflowClient()
        keys = ("loss", "accuracy", "val_loss", "val_accuracy")
        columns = [[m.value for m in sorted(client.get_metric_history(run.info.run_id, f"baseline_{key}"), key=lambda m: m.step)] for key in keys]
        baseline_history = summary["baseline_history"] = [dict(zip(keys, values)) for values in zip(*columns)]
    accuracies = {"fine-tuned": report["accuracy"], "baseline": summary["baseline"]["accuracy"] if baseline is not None else None}
    versus = f" vs {100 * accuracies['baseline']:.2f}% from scratch" if baseline is not None else ""
    curves = plot_finetune_curves(history, ft["epochs_frozen"], baseline_history, accuracies, out_dir / "curves.png",
                                  title=f"fine-tuned {arch}: test accuracy {100 * report['accuracy']:.2f}%{versus}")
    mlflow.log_artifact(str(curves), artifact_path="finetune")
    info = log_model(model, registered_name=ft["registered_model"], example=normalise(splits["val"].x[:4]).numpy())
    summary["mlflow"] = {"run_id": run.info.run_id, "model_uri": info.model_uri, "registered_model": ft["registered_model"]}
    mlflow.log_dict(summary, "finetune/metrics.json")
    save_model_file(out_dir / "model.pt", model_record(model, arch=arch, manifest=manifest, mlflow_run_id=run.info.run_id, model_uri=info.model_uri, lineage=lineage))
    atomic_write_json(out_dir / "metrics.json", summary)
    line = f"hpcdl: fine-tuned {arch}: test accuracy {100 * report['accuracy']:.2f}%"
    if baseline is not None:
        line += f" vs {100 * summary['baseline']['accuracy']:.2f}% from scratch"
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(run_on_all_ranks(main))
