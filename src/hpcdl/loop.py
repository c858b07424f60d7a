"""The one data-parallel training loop of the pipeline (train and finetune stages), after Horovod's and
PyTorch's examples, written against hpcdl.backends.Backend so it never branches on the backend.

Sharding: each epoch a permutation seeded by (seed, epoch) is cut into `world` strided shards, so every
sample is seen exactly once per epoch across ranks (torch's DistributedSampler pads or drops instead). Ranks
whose shard is one sample shorter get a one-sample-shorter last batch; all ranks take the same number of steps.
Batches are gathered from the memory-mapped uint8 arrays and normalised/augmented as whole tensors.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from hpcdl.augment import augment_batch
from hpcdl.backends import Backend, unwrap
from hpcdl.checkpoint import CheckpointStore
from hpcdl.data.formats import DataError
from hpcdl.progress import step_bar


PRECISION_NAMES = ("fp32", "bf16", "fp16")
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


@dataclass
class Split:
    """One split's arrays: x uint8 (N, C, H, W) (usually memory-mapped) and y int64 (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self):
        return len(self.y)


@dataclass
class Normaliser:
    """(x / 255 - mean) / std per channel, as one multiply and one subtract with factors made once per device
    (not per batch: the training step calls this every few milliseconds)."""

    mean: list[float]
    std: list[float]
    _factors: dict = field(default_factory=dict, repr=False, compare=False)

    def __call__(self, x_uint8) -> torch.Tensor:
        """uint8 (B,C,H,W) numpy array or tensor -> float32 tensor on the input's device: pass a tensor already
        moved to the GPU to normalise there and transfer 4x fewer bytes."""
        if isinstance(x_uint8, np.ndarray):
            if not x_uint8.flags.writeable:  # e.g. a slice of the read-only memmap; torch wants writable
                x_uint8 = np.array(x_uint8)
            x_uint8 = torch.from_numpy(x_uint8)
        if x_uint8.dtype != torch.uint8 or x_uint8.ndim != 4:
            raise DataError(f"Normaliser expects a uint8 (B,C,H,W) batch, got {x_uint8.dtype}{tuple(x_uint8.shape)}")
        device = x_uint8.device
        if device not in self._factors:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self._factors[device] = (1.0 / (255.0 * std), mean / std)
        scale, shift = self._factors[device]
        return x_uint8.float().mul_(scale).sub_(shift)

    def from_unit(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images on the 0..1 pixel scale, (C, H, W) or (N, C, H, W), normalised like the uint8 ones."""
        mean, std = self._unit_factors(pixels)
        return (pixels - mean) / std

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse: normalised images back on the 0..1 pixel scale (unclamped), e.g. an autoencoder's
        reconstructions as an image shows them."""
        mean, std = self._unit_factors(x)
        return x * std + mean

    def _unit_factors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1) for values in (self.mean, self.std))

    @property
    def black(self) -> torch.Tensor:
        """A 0-valued pixel after normalisation: the fill for pixels uncovered by augmentation."""
        return -torch.tensor(self.mean) / torch.tensor(self.std)


@dataclass
class PhaseSpec:
    """One training phase: the whole of `train`, or one of finetune's frozen/unfrozen/baseline phases."""

    name: str
    epochs: int
    batch_size: int
    seed: int
    augment: list[str] = field(default_factory=list)
    precision: str = "fp32"
    grad_accum_steps: int = 1
    memory_format: str = "contiguous"
    objective: str = "classify"  # a key of OBJECTIVES: what the loss compares the model's output with


def micro_steps_per_epoch(n: int, world: int, batch_size: int, grad_accum_steps: int) -> int:
    """Batches per rank per epoch, rounded up to whole optimizer steps (missing micro-batches are empty)."""
    batches = math.ceil(math.ceil(n / world) / batch_size)
    return math.ceil(batches / grad_accum_steps) * grad_accum_steps


def samples_per_optimizer_step(n: int, world: int, batch_size: int, grad_accum_steps: int) -> list[int]:
    """Samples all ranks together contribute to each optimizer step, known to every rank without communication.

    Each rank's loss is its sample sum x world / this count, so the averaged gradient is the exact mean over the
    step's samples, even when shards and last batches differ in size (2 ranks x B/2 == 1 rank x B)."""
    shard_sizes = [len(range(rank, n, world)) for rank in range(world)]
    micro = micro_steps_per_epoch(n, world, batch_size, grad_accum_steps)
    per_micro = [sum(min(max(size - step * batch_size, 0), batch_size) for size in shard_sizes) for step in range(micro)]
    return [sum(per_micro[g : g + grad_accum_steps]) for g in range(0, micro, grad_accum_steps)]


def epoch_shard(n: int, epoch: int, seed: int, rank: int, world: int) -> np.ndarray:
    """This rank's indices for this epoch: the same permutation on every rank, strided by rank."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)[rank::world].numpy()


def gather_batch(split: Split, indices: np.ndarray):
    """The uint8 images and int64 labels of `indices` (the loader the training loop and bench/p1 use)."""
    # Sorted reads are sequential on the memory map; order within a batch does not matter to the loss.
    order = np.sort(indices)
    return np.take(split.x, order, axis=0), torch.from_numpy(np.take(split.y, order, axis=0))


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision: fp16 needs a GPU (use bf16 on CPU)")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict(model, split: Split, normalise: Normaliser, *, batch_size: int = 1024, precision="fp32", indices=None):
    """Logits (on the CPU) for `indices` (default: all) of a split, in order. The inputs go to the device the
    model is on, wherever training left it: callers cannot pass a device that disagrees with the model's."""
    device = model_device(model)
    model.eval()
    indices = np.arange(len(split)) if indices is None else indices
    outputs = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        x = normalise(np.take(split.x, chunk, axis=0)).to(device)
        with autocast_context(precision, device):
            outputs.append(model(x).float().cpu())
    if not outputs:
        return torch.empty(0)
    return torch.cat(outputs)


class Classification:
    """Objective `classify`: cross-entropy on the labels; accuracy. Each rank keeps (loss sum, hits, samples)."""

    def loss_sum(self, output, x, y):
        return F.cross_entropy(output.float(), y, reduction="sum")

    def hits(self, output, y):
        return (output.argmax(1) == y).sum()

    def train_metrics(self, sums) -> dict:
        return {"loss": sums[0].item() / sums[2].item(), "accuracy": sums[1].item() / sums[2].item()}

    def eval_sums(self, outputs, split: Split, indices, normalise) -> tuple[float, float]:
        labels = torch.from_numpy(split.y[indices])
        return F.cross_entropy(outputs, labels, reduction="sum").item(), (outputs.argmax(1) == labels).sum().item()

    eval_metrics = train_metrics


class Reconstruction:
    """Objective `reconstruct` (autoencoders): the target is the input itself, as the model saw it (normalised,
    and augmented when augmentation is on). Loss per image: the mean squared error over its pixels, in the
    normalised space. Validation adds the mean PSNR in dB of the reconstructions on the 0..1 pixel scale (clamped
    to it, as an image shows them). No accuracy: there are no predicted labels."""

    def loss_sum(self, output, x, y):
        return F.mse_loss(output.float(), x.float(), reduction="sum") / math.prod(x.shape[1:])

    def hits(self, output, y):
        return 0

    def train_metrics(self, sums) -> dict:
        return {"loss": sums[0].item() / sums[2].item()}

    def eval_sums(self, outputs, split: Split, indices, normalise) -> tuple[float, float]:
        images = np.take(split.x, indices, axis=0)
        x = normalise(images)
        mse = (outputs - x).pow(2).flatten(1).mean(1)
        pixels = torch.from_numpy(images).float() / 255
        mse_pixels = (normalise.to_unit(outputs).clamp(0, 1) - pixels).pow(2).flatten(1).mean(1)
        psnr = -10 * torch.log10(mse_pixels.clamp_min(1e-10))
        return mse.sum().item(), psnr.sum().item()

    def eval_metrics(self, sums) -> dict:
        return {"loss": sums[0].item() / sums[2].item(), "psnr": sums[1].item() / sums[2].item()}


OBJECTIVES = {"classify": Classification(), "reconstruct": Reconstruction()}


def _sharded_eval(model, split: Split, normalise, backend: Backend, precision, objective=OBJECTIVES["classify"]) -> dict:
    indices = np.arange(len(split))[backend.rank :: backend.size]
    outputs = predict(model, split, normalise, precision=precision, indices=indices)
    sums = torch.zeros(3, dtype=torch.float64)
    if len(indices):
        sums[0], sums[1] = objective.eval_sums(outputs, split, indices, normalise)
        sums[2] = len(indices)
    sums = backend.allreduce_sum(sums)
    return objective.eval_metrics(sums)


def _seed_everything(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Per (seed, epoch, rank) RNG: a resumed epoch draws exactly what the uninterrupted one drew."""
    mixed = (seed * 1_000_003 + epoch) * 65_537 + rank
    torch.manual_seed(mixed)
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    return torch.Generator().manual_seed(mixed)


class EpochReporter:
    """Receives each finished epoch's metrics on rank 0 (printing, MLflow). Subclass and override."""

    def on_epoch(self, phase: PhaseSpec, epoch: int, metrics: dict) -> None:
        pass

    def on_resume(self, phase: PhaseSpec, history: list[dict]) -> None:
        """Called before training continues from a checkpoint holding `history` (one entry per finished epoch):
        report the epochs a killed attempt checkpointed but did not get to report."""


def fit(
    *,
    model,
    backend: Backend,
    device: torch.device,
    make_optimizer,
    make_scheduler,
    train: Split,
    val: Split,
    normalise: Normaliser,
    spec: PhaseSpec,
    store: CheckpointStore | None,
    resume: dict | None,
    reporter: EpochReporter,
    should_stop=lambda: False,
) -> tuple[torch.nn.Module, list[dict]]:
    """Train `model` for spec.epochs, checkpointing after every epoch on rank 0; returns the trained module
    (the backend may have trained a copy: use the returned one) and the per-epoch history.

    make_optimizer(params) builds the optimizer with the world-scaled LR; make_scheduler(optimizer,
    steps_per_epoch) its per-step LR schedule. `resume` is a checkpoint already broadcast to every rank (or None).
    should_stop() is polled after each epoch (e.g. a walltime signal); when it turns true, training stops after
    the checkpoint of that epoch is written, and the history so far is returned.
    """
    world, rank, accum = backend.size, backend.rank, spec.grad_accum_steps
    objective = OBJECTIVES[spec.objective]
    step_samples = samples_per_optimizer_step(len(train), world, spec.batch_size, accum)
    steps = len(step_samples)
    micro = steps * accum
    layout = MEMORY_FORMATS[spec.memory_format]
    model = model.to(device, memory_format=layout)
    model, optimizer = backend.wrap(model, make_optimizer, accum)
    scheduler = make_scheduler(optimizer, steps)
    history, start_epoch = [], 0
    if resume is not None:
        unwrap(model).load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        history, start_epoch = list(resume["history"]), resume["epoch"]
        if backend.is_root:
            reporter.on_resume(spec, history)
    backend.sync_initial_state(unwrap(model), optimizer, resumed=resume is not None)
    scaler = torch.amp.GradScaler(device.type) if spec.precision == "fp16" else None
    fill = normalise.black

    for epoch in range(start_epoch, spec.epochs):
        started = time.perf_counter()
        generator = _seed_everything(spec.seed, epoch, rank)
        shard = epoch_shard(len(train), epoch, spec.seed, rank, world)
        model.train()
        # loss sum, correct (classify), samples of this rank, kept on the device: no host sync per step (it stalls GPUs)
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for step in step_bar(range(micro), desc=f"{spec.name} epoch {epoch + 1}", enabled=backend.is_root):
            indices = shard[step * spec.batch_size : (step + 1) * spec.batch_size]
            xb, yb = gather_batch(train, indices)
            # uint8 goes to the device (4x fewer bytes than float), normalisation and augmentation run there
            x = augment_batch(normalise(torch.from_numpy(xb).to(device)), spec.augment, generator, fill).contiguous(memory_format=layout)
            y = yb.to(device)
            last_micro = (step + 1) % accum == 0
            with (nullcontext() if last_micro else backend.no_sync(model)):
                with autocast_context(spec.precision, device):
                    output = model(x)
                    loss_sum = objective.loss_sum(output, x, y)
                # After the backend averages over ranks: the mean over all samples of this optimizer step.
                loss = loss_sum * world / max(step_samples[step // accum], 1)
                (scaler.scale(loss) if scaler else loss).backward()
            if last_micro:
                backend.step(optimizer, scaler)
                optimizer.zero_grad()  # set_to_none by default; Horovod's wrapper takes no arguments
                scheduler.step()
            if len(indices):
                sums[0] += loss_sum.detach()
                sums[1] += objective.hits(output, y)
                sums[2] += len(indices)
        sums = sums.cpu()  # waits for the device, so the time below covers all the queued work
        train_seconds = time.perf_counter() - started
        sums = backend.allreduce_sum(sums)
        val_metrics = _sharded_eval(unwrap(model), val, normalise, backend, spec.precision, objective)
        metrics = {
            **objective.train_metrics(sums),
            **{f"val_{name}": value for name, value in val_metrics.items()},
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_second": sums[2].item() / train_seconds,
            "epoch_seconds": time.perf_counter() - started,
        }
        history.append(metrics)
        if backend.is_root:
            # Checkpoint first, then report: a kill in between leaves an epoch that is saved but not reported,
            # which the resumed attempt reports (on_resume). Each epoch is trained once and reported once.
            if store is not None:
                store.save(
                    {
                        "epoch": epoch + 1,
                        "model": unwrap(model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "history": history,
                    }
                )
            reporter.on_epoch(spec, epoch, metrics)
        if epoch + 1 < spec.epochs and backend.broadcast_object(bool(should_stop()), root=0):
            break
    return unwrap(model), history
