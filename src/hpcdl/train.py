"""Rule train: data-parallel training on the pretraining dataset, launched as N MPI ranks.

Rank 0 checkpoints every epoch (atomically) under <out>/checkpoints/; if a checkpoint made with the same
settings exists, training resumes from it and keeps logging to the same MLflow run."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import torch

from hpcdl import tracking
from hpcdl.atomic import atomic_write_json
from hpcdl.checkpoint import CheckpointStore, config_digest
from hpcdl.cli import stage_parser
from hpcdl.loop import PhaseSpec, fit, predict
from hpcdl.models import build_model, count_parameters
from hpcdl.optim import build_optimizer, build_schedule
from hpcdl.stage_clock import StageClock
from hpcdl.stage_runtime import (
    MlflowEpochReporter,
    StopRequest,
    exit_resumable,
    load_data,
    log_memory,
    log_model,
    model_record,
    run_context,
    run_on_all_ranks,
    save_model_file,
    stage_tags,
    start_backend,
)
from hpcdl.sweep_grid import point_tags


def main(argv=None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--out-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    clock = StageClock()
    cfg = args.params["train"]
    stop = StopRequest()  # first: a walltime signal during start-up must not kill the rank
    backend, device = start_backend(cfg["backend"], cfg["threads_per_rank"], cfg.get("compression", "none"))
    clock.mark("mpi_setup")
    manifest, splits, normalise = load_data(args.data_dir)
    checkpoint_dir = args.out_dir / "checkpoints"
    # The world size is part of the settings: other shards and another loss scale would not resume exactly.
    digest = config_digest({"train": cfg, "data": manifest["files"], "world_size": backend.size})
    store = CheckpointStore(checkpoint_dir / "train.pt", digest)
    resume = backend.broadcast_object(store.load() if backend.is_root else None)
    clock.mark("data")

    torch.manual_seed(cfg["seed"])  # same initial weights on every rank (and rank 0's are broadcast anyway)
    model = build_model(cfg["model"], in_channels=manifest["channels"], image_size=manifest["image_size"], num_classes=manifest["num_classes"])
    spec = PhaseSpec("train", cfg["epochs"], cfg["batch_size"], cfg["seed"], cfg["augment"], cfg["precision"], cfg["grad_accum_steps"], cfg["memory_format"])
    world = backend.size

    def make_optimizer(params):
        return build_optimizer(cfg["optimizer"], params, lr=cfg["lr"] * world, momentum=cfg["momentum"], nesterov=cfg["nesterov"], weight_decay=cfg["weight_decay"])

    def make_scheduler(optimizer, steps_per_epoch):
        return build_schedule(optimizer, world_size=world, warmup_steps=cfg["warmup_epochs"] * steps_per_epoch, total_steps=cfg["epochs"] * steps_per_epoch, schedule=cfg["schedule"])

    resume_run = tracking.resumable_run(checkpoint_dir, digest) if backend.is_root else None
    # Rule train_sweep runs this module for one point of a sweep: its own run name and tags (hpcdl.sweep_grid).
    sweep = args.params.get("sweep")
    rule, run_name = ("train_sweep", f"train_sweep-{sweep['point']}") if sweep else ("train", None)
    tags = stage_tags(rule, backend, image_record=args.params.get("image_record"), **point_tags(sweep))
    with run_context(backend, args.params["mlflow"], stage="train", run_name=run_name, parent_run_file=args.parent_run, resume=resume_run, tags=tags) as run:
        if backend.is_root:
            tracking.remember_run(checkpoint_dir, digest, run)
            tracking.print_where(args.params["mlflow"], run)
            if resume_run is None or tracking.is_continuation(run):
                mlflow.log_params(tracking.flatten({"train": cfg}))
                mlflow.log_params({"model.parameters": count_parameters(model), "data.num_classes": manifest["num_classes"]})
                log_split_inputs(manifest, splits, args.data_dir)
            if resume_run is not None:
                tracking.print_resuming(resume_run, run, resume["epoch"] if resume else 0)
        clock.mark("mlflow_setup")
        model, history = fit(
            model=model,
            backend=backend,
            device=device,
            make_optimizer=make_optimizer,
            make_scheduler=make_scheduler,
            train=splits["train"],
            val=splits["val"],
            normalise=normalise,
            spec=spec,
            store=store,
            resume=resume,
            reporter=MlflowEpochReporter(),
            should_stop=stop,
        )
        if len(history) < spec.epochs:
            exit_resumable(backend, "train", len(history), spec.epochs, store.path)
        clock.mark("epochs")
        log_memory(backend)
        if backend.is_root:
            if sweep:  # a point's model is logged with its run, not registered as the workflow's pretrained model
                cfg = {**cfg, "registered_model": None}
            finish(model, cfg, manifest, splits, normalise, history, args.out_dir, run, clock, world_size=world)
    backend.barrier()
    backend.shutdown()
    return 0


def log_split_inputs(manifest: dict, splits: dict, data_dir: Path) -> None:
    for name, context in (("train", "training"), ("val", "validation")):
        sha = {k: v for k, v in manifest["files"].items() if k.startswith(f"{name}_")}
        tracking.log_dataset(splits[name].x, splits[name].y, name=f"{manifest['provenance']['source']}-{name}", context=context, sha256=sha, source=data_dir.resolve().as_uri())


def finish(model, cfg, manifest, splits, normalise, history, out_dir: Path, run, clock: StageClock | None = None, world_size: int | None = None) -> None:
    """Rank 0: log and register the model, then write the rule's outputs (last, so they mean 'complete')."""
    from hpcdl.metrics import classification_report  # scikit-learn and matplotlib: rank 0 only, at the end
    from hpcdl.plots import plot_training_curves

    val_logits = predict(model, splits["val"], normalise)
    val_report = classification_report(val_logits, splits["val"].y, manifest["classes"])
    mlflow.log_metrics({"final_val_accuracy": val_report["accuracy"], "final_val_loss": val_report["loss"]})
    curves = plot_training_curves(history, out_dir / "curves.png", title=f"train {cfg['model']}: {len(history)} epochs, val accuracy {100 * val_report['accuracy']:.2f}%")
    mlflow.log_artifact(str(curves), artifact_path="train")
    example = normalise(splits["val"].x[:4]).numpy()
    info = log_model(model, registered_name=cfg["registered_model"], example=example)
    if clock is not None:
        clock.mark("model_logging")
        mlflow.log_metrics(clock.metrics())
    summary = {
        "epochs": len(history),
        "world_size": world_size,
        "history": history,
        "final": history[-1],
        "val": {"accuracy": val_report["accuracy"], "loss": val_report["loss"]},
        "mlflow": {"run_id": run.info.run_id, "model_uri": info.model_uri, "registered_model": cfg["registered_model"]},
    }
    mlflow.log_dict(summary, "train/metrics.json")
    record = model_record(model, arch=cfg["model"], manifest=manifest, mlflow_run_id=run.info.run_id, model_uri=info.model_uri)
    save_model_file(out_dir / "model.pt", record)
    atomic_write_json(out_dir / "metrics.json", summary)
    print(f"hpcdl: trained {cfg['model']}: val accuracy {100 * val_report['accuracy']:.2f}%; model {info.model_uri}", flush=True)


if __name__ == "__main__":
    sys.exit(run_on_all_ranks(main))
