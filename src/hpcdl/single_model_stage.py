"""The skeleton rules train and autoencode share: one model trained data-parallel on one dataset, as N MPI ranks.

Start the backend, read the data, find a checkpoint made with the same settings and resume from it (and into the
MLflow run that made it), train with hpcdl.loop.fit, stop resumably on SIGUSR1, then let rank 0 write the rule's
outputs. One copy of this order, because resumption and the walltime stop depend on every step of it (the stop
handler installed before MPI starts, the digest including the world size, the run remembered before the first
epoch). What differs between the rules comes in a SingleModelStage; rule finetune, with its several phases and two
models, has its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import torch

from hpcdl import tracking
from hpcdl.checkpoint import CheckpointStore, config_digest
from hpcdl.loop import Normaliser, PhaseSpec, fit
from hpcdl.optim import build_optimizer, build_schedule
from hpcdl.stage_clock import StageClock
from hpcdl.stage_runtime import (
    MlflowEpochReporter,
    StopRequest,
    exit_resumable,
    load_data,
    log_memory,
    run_context,
    stage_tags,
    start_backend,
)


@dataclass
class Trained:
    """What a stage's `finish` gets on rank 0 once every epoch ran."""

    model: torch.nn.Module
    history: list[dict]
    manifest: dict
    splits: dict
    normalise: Normaliser
    run: mlflow.ActiveRun
    clock: StageClock
    world_size: int


@dataclass
class SingleModelStage:
    """One rule's choices. `settings` are the config sections its run depends on: they key the checkpoint (with
    the data's sha256 and the world size) and are logged as the run's params. `build_model(manifest)` is called
    after torch.manual_seed(seed), so every rank starts from the same weights. `optimizer` and `schedule` hold
    the keyword arguments of hpcdl.optim's builders without the ones the world size sets (the lr is scaled by
    it, the warm-up counted in epochs)."""

    name: str  # the MLflow stage and the checkpoint's name (<out>/checkpoints/<name>.pt)
    rule: str  # the Snakemake rule, tagged on the run (train_sweep runs hpcdl.train too)
    settings: dict
    backend: dict  # hpcdl.stage_runtime.start_backend's keyword arguments: name, threads, compression
    seed: int
    build_model: Callable[[dict], torch.nn.Module]
    phase: PhaseSpec
    optimizer: dict  # name, lr (per rank), momentum, nesterov, weight_decay
    schedule: dict  # name, warmup_epochs
    model_params: Callable[[torch.nn.Module, dict], dict]  # (model, manifest) -> params logged beside the settings
    finish: Callable[[Trained], None]  # rank 0, after the last epoch: log the model, write the rule's outputs
    run_name: str | None = None
    tags: dict = field(default_factory=dict)


def run_single_model_stage(stage: SingleModelStage, params: dict, data_dir: Path, out_dir: Path, parent_run: Path | None) -> int:
    """Every rank runs this; only rank 0 talks to MLflow and writes files."""
    clock = StageClock()
    stop = StopRequest()  # first: a walltime signal during start-up must not kill the rank
    backend, device = start_backend(**stage.backend)
    clock.mark("mpi_setup")
    manifest, splits, normalise = load_data(data_dir)
    checkpoint_dir = out_dir / "checkpoints"
    # The world size is part of the settings: other shards and another loss scale would not resume exactly.
    digest = config_digest({**stage.settings, "data": manifest["files"], "world_size": backend.size})
    store = CheckpointStore(checkpoint_dir / f"{stage.name}.pt", digest)
    resume = backend.broadcast_object(store.load() if backend.is_root else None)
    clock.mark("data")

    torch.manual_seed(stage.seed)  # same initial weights on every rank (and rank 0's are broadcast anyway)
    model = stage.build_model(manifest)
    spec = stage.phase
    world = backend.size
    optimizer_args = {**stage.optimizer, "lr": stage.optimizer["lr"] * world}
    optimizer_name = optimizer_args.pop("name")

    def make_optimizer(parameters):
        return build_optimizer(optimizer_name, parameters, **optimizer_args)

    def make_scheduler(optimizer, steps_per_epoch):
        return build_schedule(optimizer, world_size=world, warmup_steps=stage.schedule["warmup_epochs"] * steps_per_epoch,
                              total_steps=spec.epochs * steps_per_epoch, schedule=stage.schedule["name"])

    resume_run = tracking.resumable_run(checkpoint_dir, digest) if backend.is_root else None
    tags = stage_tags(stage.rule, backend, image_record=params.get("image_record"), **stage.tags)
    with run_context(backend, params["mlflow"], stage=stage.name, run_name=stage.run_name, parent_run_file=parent_run, resume=resume_run, tags=tags) as run:
        if backend.is_root:
            tracking.remember_run(checkpoint_dir, digest, run)
            tracking.print_where(params["mlflow"], run)
            if resume_run is None or tracking.is_continuation(run):
                mlflow.log_params({**tracking.flatten(stage.settings), **stage.model_params(model, manifest)})
                log_split_inputs(manifest, splits, data_dir)
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
            exit_resumable(backend, stage.name, len(history), spec.epochs, store.path)
        clock.mark("epochs")
        log_memory(backend)
        if backend.is_root:
            stage.finish(Trained(model, history, manifest, splits, normalise, run, clock, world))
    backend.barrier()
    backend.shutdown()
    return 0


def log_split_inputs(manifest: dict, splits: dict, data_dir: Path) -> None:
    """The training and validation splits as the run's MLflow dataset inputs, with their files' sha256."""
    for name, context in (("train", "training"), ("val", "validation")):
        sha = {k: v for k, v in manifest["files"].items() if k.startswith(f"{name}_")}
        tracking.log_dataset(splits[name].x, splits[name].y, name=f"{manifest['provenance']['source']}-{name}", context=context, sha256=sha, source=data_dir.resolve().as_uri())
