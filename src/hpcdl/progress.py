"""Console progress: one line per epoch (the record that lands in Snakemake and Slurm logs), plus a tqdm bar
over the steps only when stdout is a terminal (a bar in a log file is noise).

mpirun hands its ranks a pseudo-terminal even when its own output goes to a file or a pipe (the rules tee into
their log), so under an MPI launcher the bar is off unless HPCDL_PROGRESS_BAR=1 asks for it."""

from __future__ import annotations

import datetime
import os
import sys

from tqdm import tqdm


def _launched_by_mpi() -> bool:
    return any(name in os.environ for name in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "SLURM_STEP_ID"))


def step_bar(iterable, *, desc: str, enabled: bool):
    wanted = os.environ.get("HPCDL_PROGRESS_BAR")
    show = wanted == "1" if wanted is not None else sys.stdout.isatty() and not _launched_by_mpi()
    if enabled and show:
        return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)
    return iterable


def epoch_line(phase: str, epoch: int, epochs: int, metrics: dict, seconds_left: float) -> str:
    eta = datetime.timedelta(seconds=round(seconds_left))
    if "accuracy" not in metrics:  # reconstruction (rule autoencode): losses are MSEs, quality is PSNR
        return (
            f"[{phase}] epoch {epoch + 1}/{epochs}  loss {metrics['loss']:.4f}  val_loss {metrics['val_loss']:.4f}  "
            f"val_psnr {metrics['val_psnr']:.2f} dB  lr {metrics['lr']:.4g}  "
            f"{metrics['samples_per_second']:,.0f} samples/s  {metrics['epoch_seconds']:.1f}s  ETA {eta}"
        )
    return (
        f"[{phase}] epoch {epoch + 1}/{epochs}  loss {metrics['loss']:.4f}  acc {100 * metrics['accuracy']:.2f}%  "
        f"val_loss {metrics['val_loss']:.4f}  val_acc {100 * metrics['val_accuracy']:.2f}%  lr {metrics['lr']:.4g}  "
        f"{metrics['samples_per_second']:,.0f} samples/s  {metrics['epoch_seconds']:.1f}s  ETA {eta}"
    )
