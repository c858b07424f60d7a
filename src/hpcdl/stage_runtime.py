"""What the MPI stages (train, finetune) share: start-up of the backend, their data, the epoch reporter that
prints and logs to MLflow, and the model file they hand to the next stage."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path

import mlflow
import numpy as np
import torch

from hpcdl import tracking
from hpcdl.backends import Backend, abort_all_ranks, make_backend, mpi_comm
from hpcdl.atomic import atomic_torch_save
from hpcdl.data.prepare import load_split, read_manifest
from hpcdl.loop import EpochReporter, Normaliser, PhaseSpec, Split
from hpcdl.models import build_model
from hpcdl.progress import epoch_line
from hpcdl.stage_clock import peak_rss_mb


def start_backend(name: str, threads: int, compression: str = "none") -> tuple[Backend, torch.device]:
    """Each rank gets `threads` CPU threads (ranks x threads should not exceed the cores it was given)."""
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    backend = make_backend(name, compression=compression)
    backend.hosts = mpi_comm().allgather(socket.gethostname())  # where every rank runs, for the MLflow record
    return backend, backend.device()


EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint written; a retry or re-run resumes


class StopRequest:
    """SIGUSR1 asks training to stop after the current epoch's checkpoint (Slurm: `--signal=USR1@<seconds>`
    before the time limit reaches every rank of the srun step; mpirun forwards it too). Polled by the loop,
    which takes rank 0's answer so all ranks stop at the same epoch."""

    def __init__(self):
        self.signal_name = None
        signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def __call__(self) -> bool:
        return self.signal_name is not None


def exit_resumable(backend: Backend, phase: str, epochs_done: int, epochs: int, checkpoint: Path) -> None:
    """End a stopped stage on every rank alike: MLflow run KILLED (resumed later), exit code 75."""
    if backend.is_root:
        mlflow.end_run(status="KILLED")
        print(f"hpcdl: stopped on SIGUSR1 after epoch {epochs_done}/{epochs} of {phase}; checkpoint {checkpoint}; "
              f"a retry or re-run resumes from it", flush=True)
    backend.barrier()
    backend.shutdown()
    raise SystemExit(EXIT_RESUMABLE)


def run_on_all_ranks(main, argv=None) -> int:
    """Run a stage's main; if any rank raises, name it and abort the MPI job instead of leaving peers hanging.
    SystemExit is a deliberate, collective exit (argument errors, a stop request) and passes through."""
    try:
        return main(argv)
    except BaseException as error:
        if isinstance(error, SystemExit):
            raise
        from hpcdl.backends import mpi_comm

        abort_all_ranks(mpi_comm().Get_rank(), error)
        raise


def load_data(data_dir: Path) -> tuple[dict, dict[str, Split], Normaliser]:
    manifest = read_manifest(data_dir)
    splits = {name: Split(*load_split(data_dir, name)) for name in ("train", "val", "test")}
    return manifest, splits, Normaliser(manifest["mean"], manifest["std"])


def run_context(backend: Backend, mlflow_cfg: dict, **kwargs):
    """The stage's MLflow run on rank 0; nothing on the other ranks (only rank 0 talks to MLflow)."""
    if backend.is_root:
        return tracking.stage_run(mlflow_cfg, **kwargs)
    return contextlib.nullcontext()


class MlflowEpochReporter(EpochReporter):
    """Prints the epoch line and logs each metric with step = epoch (offset across consecutive phases)."""

    def __init__(self, prefix: str = "", step_offset: int = 0):
        self.prefix = prefix
        self.step_offset = step_offset
        self.epoch_seconds: list[float] = []

    def on_epoch(self, phase: PhaseSpec, epoch: int, metrics: dict) -> None:
        # ETA from the mean time of the epochs run so far in this phase (restarts count from the resume point).
        self.epoch_seconds.append(metrics["epoch_seconds"])
        left = (phase.epochs - epoch - 1) * float(np.mean(self.epoch_seconds))
        print(epoch_line(phase.name, epoch, phase.epochs, metrics, left), flush=True)
        mlflow.log_metrics({f"{self.prefix}{k}": v for k, v in metrics.items()}, step=self.step_offset + epoch)

    def on_resume(self, phase: PhaseSpec, history: list[dict]) -> None:
        # One log_metrics call per epoch is one batch in the store: an epoch is either logged whole or not at all.
        run_id = mlflow.active_run().info.run_id
        logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, f"{self.prefix}loss")}
        for epoch, metrics in enumerate(history):
            if self.step_offset + epoch not in logged:
                mlflow.log_metrics({f"{self.prefix}{k}": v for k, v in metrics.items()}, step=self.step_offset + epoch)
                print(f"hpcdl: logged epoch {epoch + 1} of {phase.name}, checkpointed but not reported before the interruption", flush=True)


def model_record(model, *, arch: str, manifest: dict, **extra) -> dict:
    """The model file passed between stages: weights plus what is needed to rebuild and feed the model."""
    return {
        "arch": arch,
        "state_dict": model.state_dict(),
        "num_classes": manifest["num_classes"],
        "classes": manifest["classes"],
        "in_channels": manifest["channels"],
        "image_size": manifest["image_size"],
        "mean": manifest["mean"],
        "std": manifest["std"],
        **extra,
    }


def save_model_file(path: Path, record: dict) -> None:
    atomic_torch_save(record, path)


def load_model_file(path: Path):
    """Rebuild the model a stage saved (hpcdl arch, a torchvision backbone, or an autoencoder) and return (model,
    record)."""
    record = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(record, dict) or "arch" not in record:
        raise ValueError(f"{path}: not an hpcdl model file (no 'arch' key)")
    if record.get("kind") == "autoencoder":  # rule autoencode's model (hpcdl.autoencoder)
        from hpcdl.autoencoder import ConvAutoencoder

        model = ConvAutoencoder(record["arch"], record["in_channels"], record["image_size"])
    elif record["arch"].startswith("torchvision:"):
        from hpcdl.models import TorchvisionBackbone

        model = TorchvisionBackbone(record["arch"].split(":", 1)[1], None, record["num_classes"])
    else:
        model = build_model(record["arch"], in_channels=record["in_channels"], image_size=record["image_size"], num_classes=record["num_classes"])
    model.load_state_dict(record["state_dict"])
    return model, record


def log_model(model, *, registered_name: str, example: np.ndarray):
    """Log and register the model as MLflow's docs show. Pickle serialisation, not MLflow 3's default pt2: pt2
    traces the graph at the example's batch size, while users load this model to run and fine-tune it further.
    Pip requirements are given, not inferred (inference imports the model in a subprocess: many seconds), and
    torchvision's version is read from its metadata: importing it (for __version__) costs 1.7 s, as it imports
    torch._dynamo."""
    from importlib.metadata import version

    from mlflow.models import infer_signature

    model = model.cpu().eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    return mlflow.pytorch.log_model(
        model,
        name="model",
        registered_model_name=registered_name,
        signature=infer_signature(example, output),
        serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={version('torchvision').split('+')[0]}"],
    )


def log_memory(backend: Backend) -> None:
    """Every rank's peak resident memory so far, as metrics of the stage's run (`peak_rss_mb.rank<r>`, and the
    largest as `peak_rss_mb`). Collective: every rank calls it at the same point."""
    peaks = mpi_comm().gather(peak_rss_mb(), root=0)
    if backend.is_root:
        mlflow.log_metrics({**{f"peak_rss_mb.rank{rank}": round(mb, 1) for rank, mb in enumerate(peaks)}, "peak_rss_mb": round(max(peaks), 1)})


def stage_tags(stage: str, backend: Backend, image_record=None, **extra) -> dict:
    """Where and how the ranks ran: world size, backend, what averaged the gradients (gradient_allreduce), and the
    host of every rank (`hosts` in rank order, the number of `nodes` and the most `ranks_per_node`), beside the
    Slurm job's own record (slurm.nodelist)."""
    hosts = list(dict.fromkeys(backend.hosts))
    per_node = max(backend.hosts.count(host) for host in hosts)
    return tracking.runtime_tags(stage, image_record=image_record, world_size=backend.size, backend=backend.name,
                                 gradient_allreduce=backend.gradient_allreduce,
                                 hosts=",".join(hosts), nodes=len(hosts), ranks_per_node=per_node, **extra)
