"""P2: what does the pipeline's training step cost over a bare PyTorch loop on the same model and batches?

Pipeline: hpcdl.loop.fit on one rank with the default backend and the default train settings (memory format), everything on: uint8 gather + normalisation,
backend wrapper, loss scaling, metric accumulation, per-epoch validation, checkpoint and MLflow logging (SQLite).
Bare: the textbook loop a user writes (the textbook LeNet-5 below: conv, ReLU, max-pool; plain `torch.optim.SGD`,
default memory format, eager) over the same shuffled batches, already normalised in memory, no metrics, no logging.
hpcdl's LeNet-5 computes the same function and gradients with cheaper ordering (tests/test_models.py).
--compiled also times the step the pipeline would take with `torch.compile` (inductor; channels-last, fused SGD, as
the pipeline's defaults), compilation excluded, to show whether compilation pays at this size (informational: the
pipeline runs eager unless it does).
Prints both throughputs measured in one run and the ratios: step throughput (the target) and whole
epochs including the per-epoch validation/checkpoint/MLflow work (informational). Target >= 1.0x in every run,
stretch 1.5x."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import torch
import yaml
import torch.nn.functional as F
from torch import nn

from hpcdl.checkpoint import CheckpointStore
from hpcdl.data.prepare import load_split, write_dataset
from hpcdl.data.sources import fetch_source, load_raw
from hpcdl.loop import Normaliser, PhaseSpec, Split, epoch_shard, fit
from hpcdl.models import build_model
from hpcdl.optim import build_optimizer, build_schedule
from hpcdl.stage_runtime import MlflowEpochReporter, start_backend

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.0
STRETCH = 1.5
BATCH = 64


class TextbookLeNet5(nn.Module):
    """LeNet-5 as a user writes it (as hpcdl defined it until 2026-12-07): its parameters created in hpcdl's order."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(5), nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(84, 10)

    def forward(self, x):
        return self.head(self.features(x))


def bare_loop(x: torch.Tensor, y: torch.Tensor, epochs: int) -> float:
    """samples/s of PyTorch's canonical loop (same model, optimizer, batches)."""
    torch.manual_seed(0)
    model = TextbookLeNet5()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    seen, started = 0, time.perf_counter()
    for epoch in range(epochs):
        order = torch.from_numpy(epoch_shard(len(y), epoch, seed=0, rank=0, world=1))
        for start in range(0, len(order), BATCH):
            index = order[start : start + BATCH]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            seen += len(index)
    return seen / (time.perf_counter() - started)


def compiled_loop(x: torch.Tensor, y: torch.Tensor, epochs: int) -> tuple[float, float]:
    """(samples/s, seconds of compilation) of the pipeline's step settings under torch.compile."""
    torch.manual_seed(0)
    model = torch.compile(build_model("lenet5", in_channels=1, image_size=28, num_classes=10).to(memory_format=torch.channels_last))
    optimizer = build_optimizer("sgd", model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = x.contiguous(memory_format=torch.channels_last)
    model.train()

    def step(index):
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()

    started = time.perf_counter()
    step(torch.arange(BATCH))  # compiles, then once more for the epoch's last, smaller batch
    step(torch.arange(len(y) % BATCH or BATCH))
    compile_s = time.perf_counter() - started
    seen, started = 0, time.perf_counter()
    for epoch in range(epochs):
        order = torch.from_numpy(epoch_shard(len(y), epoch, seed=0, rank=0, world=1))
        for start in range(0, len(order), BATCH):
            step(order[start : start + BATCH])
            seen += min(BATCH, len(order) - start)
    return seen / (time.perf_counter() - started), compile_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--compiled", action="store_true", help="also time the pipeline's step settings under torch.compile")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if the step ratio is below {TARGET}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        provenance = fetch_source({"source": "mnist5k"}, root / "raw")
        images, labels, classes = load_raw(root / "raw")
        manifest = write_dataset(root / "data", images, labels, classes, image_size=28, channels=1, val_fraction=0.05, test_fraction=0.15, seed=0, provenance=provenance)
        train, val = (Split(*load_split(root / "data", s)) for s in ("train", "val"))
        normalise = Normaliser(manifest["mean"], manifest["std"])

        bare_before = bare_loop(normalise(train.x[:]), torch.from_numpy(train.y[:]), args.epochs)
        backend, device = start_backend("horovod", 1)
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        torch.manual_seed(0)
        model = build_model("lenet5", in_channels=1, image_size=28, num_classes=10)
        defaults = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["train"]
        spec = PhaseSpec("bench", args.epochs, BATCH, seed=0, memory_format=defaults["memory_format"])
        with mlflow.start_run():  # the store's creation (~6 s of SQLite schema set-up) is not per-epoch work
            started = time.perf_counter()
            _, history = fit(
                model=model, backend=backend, device=device,
                make_optimizer=lambda p: build_optimizer("sgd", p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
                make_scheduler=lambda o, steps: build_schedule(o, world_size=1, warmup_steps=0, total_steps=args.epochs * steps, schedule="cosine"),
                train=train, val=val, normalise=normalise, spec=spec, store=CheckpointStore(root / "ckpt.pt", "bench"), resume=None,
                reporter=MlflowEpochReporter(),
            )
            whole = len(train) * args.epochs / (time.perf_counter() - started)
        pipeline_steps = sum(len(train) for _ in history) / sum(len(train) / e["samples_per_second"] for e in history)
        # The bare loop runs before and after the pipeline and keeps its faster run: any warm-up or drift favours it.
        bare = max(bare_before, bare_loop(normalise(train.x[:]), torch.from_numpy(train.y[:]), args.epochs))
        backend.shutdown()
        if args.compiled:
            compiled, compile_s = compiled_loop(normalise(train.x[:]), torch.from_numpy(train.y[:]), args.epochs)

    print(f"mnist5k train split {len(train)} images, lenet5, batch {BATCH}, 1 rank x 1 thread, {args.epochs} epochs")
    print(f"bare PyTorch loop:                  {bare:9,.0f} samples/s")
    print(f"pipeline train steps:               {pipeline_steps:9,.0f} samples/s")
    print(f"pipeline whole epochs (+val/ckpt/MLflow): {whole:9,.0f} samples/s")
    if args.compiled:
        print(f"torch.compile'd step (channels-last, fused SGD; {compile_s:.0f} s to compile, not counted): {compiled:9,.0f} samples/s = {compiled / bare:.3f}x the bare loop (informational)")
    print(f"P2 step throughput ratio: {pipeline_steps / bare:.3f}x (target >= {TARGET}x, stretch {STRETCH}x); whole-epoch ratio {whole / bare:.3f}x")
    return 1 if args.check and pipeline_steps / bare < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
