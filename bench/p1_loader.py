"""P1: how much faster is the preprocessed uint8 batch loader than torchvision's per-sample PIL path?

Both paths serve the same mnist5k train split as shuffled, normalised float32 batches of 64 with labels:
  fast      - the training loop's loader: hpcdl.loop.gather_batch on the memory-mapped uint8 array + Normaliser
  per-sample - a torch Dataset returning PIL images through ToTensor()+Normalize, DataLoader(batch_size=64,
               num_workers=0), i.e. what torchvision.datasets.MNIST does per item.
Prints samples/s of both and the ratio; with --check exits 1 when the ratio is below the target."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from hpcdl.data.prepare import load_split, write_dataset
from hpcdl.data.sources import fetch_source, load_raw
from hpcdl.loop import Normaliser, Split, gather_batch

BATCH = 64
TARGET = 20.0


class PerSampleDataset(Dataset):
    """torchvision-style: one uint8 image -> PIL -> transform, per __getitem__."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.x[i, 0], mode="L")), int(self.y[i])


def fast_epoch(split: Split, normalise: Normaliser, rng) -> int:
    """The training loop's own path: hpcdl.loop.gather_batch + the Normaliser, on shuffled batches."""
    seen = 0
    order = rng.permutation(len(split))
    for start in range(0, len(order), BATCH):
        xb, yb = gather_batch(split, order[start:start + BATCH])
        seen += len(normalise(xb))
    return seen


def per_sample_epoch(loader) -> int:
    seen = 0
    for _images, labels in loader:
        seen += len(labels)
    return seen


def best_rate(run_epoch, min_seconds: float) -> float:
    """Best samples/s over repeated epochs (at least two, at least min_seconds): the steady state, not warm-up."""
    rates, spent = [], 0.0
    while len(rates) < 2 or spent < min_seconds:
        t0 = time.perf_counter()
        n = run_epoch()
        dt = time.perf_counter() - t0
        rates.append(n / dt)
        spent += dt
    return max(rates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 if the speedup is below {TARGET:g}x")
    parser.add_argument("--seconds", type=float, default=0.5, help="minimum timed seconds per path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # compare the data paths, not how many cores intra-op parallelism finds

    with tempfile.TemporaryDirectory() as tmp:
        raw, data = Path(tmp) / "raw", Path(tmp) / "data"
        provenance = fetch_source({"source": "mnist5k"}, raw)
        images, labels, classes = load_raw(raw)
        manifest = write_dataset(data, images, labels, classes, image_size=28, channels=1, val_fraction=0.1,
                                 test_fraction=0.2, seed=0, provenance=provenance)
        x, y = load_split(data, "train")
        mean, std = manifest["mean"], manifest["std"]

        rng = np.random.default_rng(0)
        fast = best_rate(lambda: fast_epoch(Split(x, y), Normaliser(mean, std), rng), args.seconds)
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
        loader = DataLoader(PerSampleDataset(np.asarray(x), y, transform), batch_size=BATCH, shuffle=True,
                            num_workers=0, generator=torch.Generator().manual_seed(0))
        slow = best_rate(lambda: per_sample_epoch(loader), args.seconds)

    ratio = fast / slow
    print(f"mnist5k train split: {len(y)} images {tuple(x.shape[1:])}, batch {BATCH}, 1 torch thread")
    print(f"preprocessed uint8 loader:   {fast:12,.0f} samples/s")
    print(f"torchvision per-sample PIL:  {slow:12,.0f} samples/s")
    print(f"P1 loader speedup: {ratio:.1f}x (target >= {TARGET:g}x)")
    return 1 if args.check and ratio < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
