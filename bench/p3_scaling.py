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
default cycle time (HOROVOD_CYCLE_TIME=1 ms) instead of 0.1 ms. --check judges the defaults only.

Then it decomposes what a synchronous step costs, outside the pipeline (bench/p3_lockstep.py: rule train's step on
the same data, 1 and 2 ranks): two ranks that never communicate, two that wait for each other every step
(MPI_Barrier, nothing exchanged: the limit for any synchronous data-parallel scheme), and two that also sum their
gradients with one MPI_Allreduce (the torch backend's hook), with that sum's own time per step.

--repeats N measures every variant N times in alternating rounds (1 rank, 2 ranks, untuned, ceiling; then again)
and reports each ratio's median over the rounds with its range, each round's ratio taken from runs made minutes
apart: on a machine whose throughput drifts from minute to minute, one reading of a setting says little."""

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


def local_mpirun(ranks: int, *argv: str, settings: dict | None = None) -> tuple[list[str], dict]:
    """(command, environment) that start `ranks` ranks of `python argv...` with the local rule's launcher (as root too)."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **(settings or {}))
    return [*LOCAL_MPIRUN.split(), "-n", str(ranks), sys.executable, *argv], env


def start(root: Path, data: Path, backend: str, ranks: int, epochs: int, name: str, settings: dict | None = None) -> tuple[subprocess.Popen, Path]:
    cfg = copy.deepcopy(yaml.safe_load((REPO / "config" / "config.yaml").read_text())["train"])
    cfg.update(backend=backend, ranks=ranks, threads_per_rank=1, epochs=epochs, augment=[])
    out = root / name
    params = {"mlflow": {"tracking_uri": f"sqlite:///{out}.db", "experiment": "p3"}, "train": cfg}
    command, env = local_mpirun(ranks, "-m", "hpcdl.train", "--params", json.dumps(params), "--data-dir", str(data), "--out-dir", str(out), settings=settings)
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO), out


def steady(process: subprocess.Popen, out: Path) -> float:
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{out.name}: training failed:\n{err[-3000:]}")
    history = json.loads((out / "metrics.json").read_text())["history"]
    return statistics.median(epoch["samples_per_second"] for epoch in history[1:])


def throughput(root: Path, data: Path, backend: str, ranks: int, epochs: int, tag: str, settings: dict | None = None) -> float:
    return steady(*start(root, data, backend, ranks, epochs, f"{backend}-{ranks}{'-untuned' if settings else ''}{tag}", settings))


def ceiling(root: Path, data: Path, backend: str, epochs: int, tag: str) -> float:
    """Summed throughput of two independent 1-rank runs started together (their own MLflow stores, no MPI link)."""
    runs = [start(root, data, backend, 1, epochs, f"{backend}-alone-{i}{tag}") for i in range(2)]
    return sum(steady(*run) for run in runs)


LOCKSTEP_STEPS = 600


def lockstep(data: Path, ranks: int) -> dict:
    """bench/p3_lockstep.py under the local launcher: samples/s of all ranks per mode (and the sum's own time)."""
    command, env = local_mpirun(ranks, str(REPO / "bench" / "p3_lockstep.py"), str(data), str(LOCKSTEP_STEPS))
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"p3_lockstep.py with {ranks} ranks failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def lockstep_round(data: Path) -> dict:
    """One rank alone, then two ranks in every mode of bench/p3_lockstep.py."""
    return {"one": lockstep(data, 1)["alone"], **lockstep(data, 2)}


def one_round(root: Path, data: Path, backend: str, epochs: int, tag: str) -> dict:
    """Each variant once, one after another: samples/s of 1 rank, 2 ranks, 2 untuned ranks, two runs apart."""
    return {"one": throughput(root, data, backend, 1, epochs, tag), "two": throughput(root, data, backend, 2, epochs, tag),
            "untuned": throughput(root, data, backend, 2, epochs, tag, UNTUNED[backend]), "apart": ceiling(root, data, backend, epochs, tag)}


def spread(values: list[float], fmt: str = ".2f") -> str:
    """The median, and the range where there are several readings."""
    middle = format(statistics.median(values), fmt)
    return middle if len(values) == 1 else f"{middle} (median of {len(values)}, {min(values):{fmt}}-{max(values):{fmt}})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds of every variant; ratios are their medians")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if an efficiency (the median, with --repeats) is below {TARGET}")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: {args.repeats} is not allowed (allowed: 1 or more)")
    backends = ["torch"] + (["horovod"] if importlib.util.find_spec("horovod") else [])
    worst = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare(root)
        print(f"mnist5k, lenet5, per-rank batch 64, 1 thread per rank, {os.cpu_count()} cores, median of epochs 2..{args.epochs}, "
              f"{args.repeats} round{'s' if args.repeats > 1 else ''}")
        rounds = {backend: [] for backend in backends}
        steps = []
        for index in range(args.repeats):  # the backends alternate too, so a slow minute does not land on one of them
            for backend in backends:
                rounds[backend].append(one_round(root, data, backend, args.epochs, f"-{index}"))
            steps.append(lockstep_round(data))
        for backend in backends:
            readings = rounds[backend]
            column = {key: [r[key] for r in readings] for key in readings[0]}
            efficiency = [r["two"] / (2 * r["one"]) for r in readings]
            limit = [r["apart"] / (2 * r["one"]) for r in readings]
            worst = min(worst, statistics.median(efficiency))
            print(f"{backend:8s} 1 rank {statistics.median(column['one']):9,.0f} samples/s | 2 ranks {statistics.median(column['two']):9,.0f} samples/s | "
                  f"weak-scaling efficiency {spread(efficiency)} (target >= {TARGET})")
            before = " ".join(f"{key}={value}" for key, value in UNTUNED[backend].items())
            print(f"{'':8s} 2 ranks with {before}: efficiency {spread([r['untuned'] / (2 * r['one']) for r in readings])} (before the CPU tuning)")
            print(f"{'':8s} 2 independent 1-rank runs together: ceiling {spread(limit)}; "
                  f"efficiency / ceiling {spread([e / c for e, c in zip(efficiency, limit)])} (what communication costs)")
        print(f"the step alone (bench/p3_lockstep.py: rule train's step, {LOCKSTEP_STEPS} steps), 2 ranks vs twice 1 rank "
              f"({statistics.median(r['one'] for r in steps):,.0f} samples/s):")
        print(f"{'':8s} never communicating {spread([r['alone'] / (2 * r['one']) for r in steps])}; "
              f"waiting for each other every step (MPI_Barrier) {spread([r['lockstep'] / (2 * r['one']) for r in steps])}; "
              f"+ one MPI_Allreduce of the gradients {spread([r['summed'] / (2 * r['one']) for r in steps])}")
        print(f"{'':8s} that sum alone (after the barrier; the Allreduce and its copies into and out of one flat buffer): {spread([r['allreduce_us_median'] for r in steps], '.0f')} us a step "
              f"(90th percentile {spread([r['allreduce_us_p90'] for r in steps], '.0f')} us)")
    return 1 if args.check and worst < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
