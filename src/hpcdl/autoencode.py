"""Rule autoencode: a convolutional autoencoder (hpcdl.autoencoder) trained data-parallel on the pretraining
dataset, launched as N MPI ranks exactly like rule train, so that fine-tuning can start from its encoder
(finetune.init: autoencoder) without using any label of the pretraining data.

The same stage as train (hpcdl.single_model_stage: hpcdl.loop.fit, here with objective `reconstruct`):
sharding, checkpoint every epoch under <out>/checkpoints/ and resume, the Horovod/DDP step, the per-epoch MLflow
metrics loss, val_loss (MSE in the normalised pixel space) and val_psnr (dB). Rank 0 then writes the reconstructions grid, logs and registers the
model, and writes model.pt and metrics.json (last, so they mean 'complete')."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import numpy as np
import torch

from hpcdl.atomic import atomic_output, atomic_write_json
from hpcdl.autoencoder import MODEL_KIND, ConvAutoencoder
from hpcdl.cli import stage_parser
from hpcdl.loop import OBJECTIVES, PhaseSpec, Split, predict
from hpcdl.models import count_parameters
from hpcdl.single_model_stage import SingleModelStage, Trained, run_single_model_stage
from hpcdl.stage_clock import StageClock
from hpcdl.stage_runtime import log_model, model_record, run_on_all_ranks, save_model_file

GRID_IMAGES = 16  # reconstructions grid: at most this many validation images


def main(argv=None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--out-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    ae, tr = args.params["autoencode"], args.params["train"]  # train's: backend, precision, layout, schedule

    def done(trained: Trained) -> None:
        finish(trained.model, ae, trained.manifest, trained.splits, trained.normalise, trained.history, args.out_dir, trained.run, trained.clock)

    stage = SingleModelStage(
        name="autoencode",
        rule="autoencode",
        settings={"autoencode": ae, "train": tr},
        backend={"name": tr["backend"], "threads": ae["threads_per_rank"], "compression": tr.get("compression", "none")},
        seed=ae["seed"],
        build_model=lambda manifest: ConvAutoencoder(ae["model"], manifest["channels"], manifest["image_size"]),
        phase=PhaseSpec("autoencode", ae["epochs"], ae["batch_size"], ae["seed"], ae["augment"], tr["precision"],
                        tr["grad_accum_steps"], tr["memory_format"], objective="reconstruct"),
        optimizer={"name": ae["optimizer"], "lr": ae["lr"], "momentum": ae["momentum"], "nesterov": tr["nesterov"], "weight_decay": ae["weight_decay"]},
        schedule={"name": tr["schedule"], "warmup_epochs": min(tr["warmup_epochs"], ae["epochs"])},
        model_params=lambda model, manifest: {"model.parameters": count_parameters(model), "model.encoder_parameters": count_parameters(model.features)},
        finish=done,
    )
    return run_single_model_stage(stage, args.params, args.data_dir, args.out_dir, args.parent_run)


def mean_image_baseline(train: Split, val: Split, normalise) -> dict:
    """The trivial reconstruction: every validation image predicted as the training set's mean image. Its val
    loss and PSNR are what the autoencoder must beat to have learnt anything about the images."""
    total = np.zeros(train.x.shape[1:], dtype=np.float64)
    for start in range(0, len(train), 4096):  # in chunks: the images are memory-mapped
        total += train.x[start : start + 4096].sum(axis=0, dtype=np.float64)
    mean_pixels = torch.from_numpy(total / max(len(train), 1)).float() / 255
    outputs = normalise.from_unit(mean_pixels).unsqueeze(0).expand(len(val), -1, -1, -1)
    loss_sum, psnr_sum = OBJECTIVES["reconstruct"].eval_sums(outputs, val, np.arange(len(val)), normalise)
    return {"loss": loss_sum / len(val), "psnr": psnr_sum / len(val)}


def grid_indices(labels: np.ndarray, limit: int = GRID_IMAGES) -> np.ndarray:
    """A fixed set of validation images: the first of each class (in class order), then the first others."""
    chosen = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)][:limit]
    more = max(0, min(limit, 8, len(labels)) - len(chosen))  # few classes: at least 8 images all the same
    rest = [i for i in range(len(labels)) if i not in set(chosen)][:more] if more else []
    return np.array(chosen + rest, dtype=np.int64)


def plot_reconstructions(originals: np.ndarray, reconstructions: np.ndarray, path: Path, title: str) -> None:
    """Originals (top row) over their reconstructions (bottom row); both uint8 (N, C, H, W)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: compute nodes have no display
    import matplotlib.pyplot as plt

    cols = len(originals)
    fig, axes = plt.subplots(2, cols, figsize=(1.0 * cols + 0.8, 2.6), dpi=100, squeeze=False)
    for row, images in enumerate((originals, reconstructions)):
        for ax, image in zip(axes[row], images):
            grey = image.shape[0] == 1
            ax.imshow(image[0] if grey else image.transpose(1, 2, 0), cmap="gray" if grey else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(("original", "reconstructed")[row], fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def finish(model, ae, manifest, splits, normalise, history, out_dir: Path, run, clock: StageClock | None = None) -> None:
    """Rank 0: reconstructions grid, baseline, log and register the model, then write the rule's outputs."""
    val = splits["val"]
    baseline = mean_image_baseline(splits["train"], val, normalise)
    final = history[-1]
    indices = grid_indices(val.y)
    outputs = predict(model, val, normalise, indices=indices)
    pixels = (normalise.to_unit(outputs).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = out_dir / "reconstructions.png"
    plot_reconstructions(np.take(val.x, indices, axis=0), pixels, grid,
                         title=f"{ae['model']} autoencoder, validation images: MSE {final['val_loss']:.4f}, PSNR {final['val_psnr']:.1f} dB "
                               f"(mean image: {baseline['loss']:.4f}, {baseline['psnr']:.1f} dB)")
    mlflow.log_artifact(str(grid))
    mlflow.log_metrics({"final_val_loss": final["val_loss"], "final_val_psnr": final["val_psnr"],
                        "mean_image_val_loss": baseline["loss"], "mean_image_val_psnr": baseline["psnr"]})
    info = log_model(model, registered_name=ae["registered_model"], example=normalise(val.x[:4]).numpy())
    if clock is not None:
        clock.mark("model_logging")
        mlflow.log_metrics(clock.metrics())
    summary = {
        "epochs": len(history),
        "history": history,
        "final": final,
        "val": {"loss": final["val_loss"], "psnr": final["val_psnr"]},
        "mean_image_baseline": baseline,
        "grid_indices": indices.tolist(),
        "mlflow": {"run_id": run.info.run_id, "model_uri": info.model_uri, "registered_model": ae["registered_model"]},
    }
    mlflow.log_dict(summary, "autoencode/metrics.json")
    record = model_record(model, arch=ae["model"], manifest=manifest, kind=MODEL_KIND, mlflow_run_id=run.info.run_id, model_uri=info.model_uri)
    save_model_file(out_dir / "model.pt", record)
    atomic_write_json(out_dir / "metrics.json", summary)
    print(f"hpcdl: autoencoder ({ae['model']} encoder): val MSE {final['val_loss']:.4f}, PSNR {final['val_psnr']:.2f} dB "
          f"(mean image {baseline['loss']:.4f}, {baseline['psnr']:.2f} dB); model {info.model_uri}", flush=True)


if __name__ == "__main__":
    sys.exit(run_on_all_ranks(main))
