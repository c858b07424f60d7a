"""Rule train: data-parallel training on the pretraining dataset, launched as N MPI ranks.

Rank 0 checkpoints every epoch (atomically) under <out>/checkpoints/; if a checkpoint made with the same
settings exists, training resumes from it and keeps logging to the same MLflow run (the order of all this is
hpcdl.single_model_stage's, shared with rule autoencode; this module says what rule train trains and writes)."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow

from hpcdl.atomic import atomic_write_json
from hpcdl.cli import stage_parser
from hpcdl.loop import PhaseSpec, predict
from hpcdl.metrics import classification_report
from hpcdl.models import build_model, count_parameters
from hpcdl.plots import plot_training_curves
from hpcdl.single_model_stage import SingleModelStage, Trained, run_single_model_stage
from hpcdl.stage_clock import StageClock
from hpcdl.stage_runtime import log_model, model_record, run_on_all_ranks, save_model_file
from hpcdl.sweep_grid import point_tags


def main(argv=None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--out-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    cfg = args.params["train"]
    # Rule train_sweep runs this module for one point of a sweep: its own run name and tags (hpcdl.sweep_grid).
    sweep = args.params.get("sweep")
    # A sweep point's model is logged with its run, not registered as the workflow's pretrained model.
    registered = {**cfg, "registered_model": None} if sweep else cfg

    def done(trained: Trained) -> None:
        finish(trained.model, registered, trained.manifest, trained.splits, trained.normalise, trained.history, args.out_dir,
               trained.run, trained.clock, world_size=trained.world_size)

    stage = SingleModelStage(
        name="train",
        rule="train_sweep" if sweep else "train",
        run_name=f"train_sweep-{sweep['point']}" if sweep else None,
        tags=point_tags(sweep),
        settings={"train": cfg},
        backend={"name": cfg["backend"], "threads": cfg["threads_per_rank"], "compression": cfg.get("compression", "none")},
        seed=cfg["seed"],
        build_model=lambda manifest: build_model(cfg["model"], in_channels=manifest["channels"], image_size=manifest["image_size"], num_classes=manifest["num_classes"]),
        phase=PhaseSpec("train", cfg["epochs"], cfg["batch_size"], cfg["seed"], cfg["augment"], cfg["precision"], cfg["grad_accum_steps"], cfg["memory_format"]),
        optimizer={"name": cfg["optimizer"], "lr": cfg["lr"], "momentum": cfg["momentum"], "nesterov": cfg["nesterov"], "weight_decay": cfg["weight_decay"]},
        schedule={"name": cfg["schedule"], "warmup_epochs": cfg["warmup_epochs"]},
        model_params=lambda model, manifest: {"model.parameters": count_parameters(model), "data.num_classes": manifest["num_classes"]},
        finish=done,
    )
    return run_single_model_stage(stage, args.params, args.data_dir, args.out_dir, args.parent_run)


def finish(model, cfg, manifest, splits, normalise, history, out_dir: Path, run, clock: StageClock | None = None, world_size: int | None = None) -> None:
    """Rank 0: log and register the model, then write the rule's outputs (last, so they mean 'complete')."""
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
