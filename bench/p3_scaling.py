"""P3: weak scaling of data-parallel training on this machine: 2 ranks x 1 thread vs 1 rank x 1 thread.

Runs the real train stage with the local rule's launcher (hpcdl.launch.LOCAL_MPIRUN -n R python -m hpcdl.train) on mnist5k with the per-rank batch fixed, for each
backend that is installed, and prints samples/s and weak-scaling efficiency = throughput(2) / (2 x throughput(1)),
all measured in this one run. Steady state: the first epoch (warm-up, allocator, rendezvous) is dropped.

It also measures the ceiling that no communication scheme can pass on this machine: two independent 1-rank runs
started together (no MPI between them, nothing to wait for): their summed throughput / (2 x one run alone) is
what two busy cores give (shared caches, memory bandwidth, frequency, the OS and Snakemake's own processes).
A backend's efficiency divided by that ceiling is the part the communication costs.

Each backend is also run the way it was before its CPU tuning (hpcdl.backends), to show what that buys:
torch with gloo summing DDP's gradients (HPCDL_TORCH_CPU_ALLREDUCE=gloo) instead of MPI, horovod with Horovod's
default cycle time (HOROVOD_CYCLE_TIME=1 ms) instead of 0.1 ms. --check judges the defaults only."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from hpcdl.launch import LOCAL_MPIRUN

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.90


def prepare(root: Path) -> Path:
    from hpcdl.data.prepare import write_dataset
    from hpcdl.data.sources import fetch_source, load_raw

    provenance = fetch_source({"source": "mnist5k"}, root / "raw")
    images, labels, classes = load_raw(root / "raw")
    write_dataset(root / "data", images, labels, classes, image_size=28, channels=1, val_fraction=0.05, test_fraction=0.15, seed=0, provenance=provenance)
    return root / "data"


# The settings each backend ran with before its CPU tuning (hpcdl.backends): printed beside the defaults.
UNTUNED = {"torch": {"HPCDL_TORCH_CPU_ALLREDUCE": "gloo"}, "horovod": {"HOROVOD_CYCLE_TIME": "1"}}


def start(root: Path, data: Path, backend: str, ranks: int, epochs: int, name: str, settings: dict | None = None) -> tuple[subprocess.Popen, Path]:
    cfg = copy.deepcopy(yaml.safe_load((REPO / "config" / "config.yaml").read_text())["train"])
    cfg.update(backend=backend, ranks=ranks, threads_per_rank=1, epochs=epochs, augment=[])
    out = root / name
    params = {"mlflow": {"tracking_uri": f"sqlite:///{out}.db", "experiment": "p3"}, "train": cfg}
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **(settings or {}))
    command = [*LOCAL_MPIRUN.split(), "-n", str(ranks), sys.executable, "-m", "hpcdl.train", "--params", json.dumps(params), "--data-dir", str(data), "--out-dir", str(out)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO), out


def steady(process: subprocess.Popen, out: Path) -> float:
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{out.name}: training failed:\n{err[-3000:]}")
    history = json.loads((out / "metrics.json").read_text())["history"]
    return statistics.median(epoch["samples_per_second"] for epoch in history[1:])


def throughput(root: Path, data: Path, backend: str, ranks: int, epochs: int, settings: dict | None = None) -> float:
    return steady(*start(root, data, backend, ranks, epochs, f"{backend}-{ranks}{'-untuned' if settings else ''}", settings))


def ceiling(root: Path, data: Path, backend: str, epochs: int) -> float:
    """Summed throughput of two independent 1-rank runs started together (their own MLflow stores, no MPI link)."""
    runs = [start(root, data, backend, 1, epochs, f"{backend}-alone-{i}") for i in range(2)]
    return sum(steady(*run) for run in runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--check", action="store_true", help=f"exit 1 if an efficiency is below {TARGET}")
    args = parser.parse_args(argv)
    backends = ["torch"] + (["horovod"] if importlib.util.find_spec("horovod") else [])
    worst = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare(root)
        print(f"mnist5k, lenet5, per-rank batch 64, 1 thread per rank, {os.cpu_count()} cores, median of epochs 2..{args.epochs}")
        for backend in backends:
            one = throughput(root, data, backend, 1, args.epochs)
            two = throughput(root, data, backend, 2, args.epochs)
            untuned = throughput(root, data, backend, 2, args.epochs, UNTUNED[backend])
            apart = ceiling(root, data, backend, args.epochs)
            efficiency = two / (2 * one)
            worst = min(worst, efficiency)
            print(f"{backend:8s} 1 rank {one:9,.0f} samples/s | 2 ranks {two:9,.0f} samples/s | speedup {two / one:.2f}x | weak-scaling efficiency {efficiency:.2f} (target >= {TARGET})")
            before = " ".join(f"{key}={value}" for key, value in UNTUNED[backend].items())
            print(f"{'':8s} 2 ranks with {before}: {untuned:9,.0f} samples/s, efficiency {untuned / (2 * one):.2f} (before the CPU tuning)")
            print(f"{'':8s} 2 independent 1-rank runs together {apart:9,.0f} samples/s: ceiling {apart / (2 * one):.2f}; "
                  f"efficiency / ceiling {efficiency / (apart / (2 * one)):.2f} (what communication costs)")
    return 1 if args.check and worst < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
