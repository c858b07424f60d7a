"""P5: the same total ranks on 2 nodes vs on 1 node: what the cross-node transport costs.

On the multi-node test cluster (tests/slurm/cluster-up.sh: nodes n1, n2 on this one machine), the real train stage
runs as `srun --mpi=pmix -n 2 -N <1 or 2> --ntasks-per-node=<2 or 1>` (the rules' launch line) on mnist5k, for
each installed backend. 1 node x 2 ranks talk through shared memory (Open MPI's vader, gloo over loopback); 2 nodes
x 1 rank through TCP. All ranks share this machine's 2 cores either way, so the ratio measures the transport, not a
cluster's speed-up. Prints samples/s (median of epochs 2..E) for both placements and their ratio, measured in one
run. Root on Debian (it starts the test cluster in a temporary folder, and stops it), or SLURM_CONF of a running
cluster with 2 nodes. --check: exit 1 when a ratio is below 0.5 (a broken transport, not a slow one)."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
FLOOR = 0.5


def prepare(root: Path) -> Path:
    from hpcdl.data.prepare import write_dataset
    from hpcdl.data.sources import fetch_source, load_raw

    provenance = fetch_source({"source": "mnist5k"}, root / "raw")
    images, labels, classes = load_raw(root / "raw")
    write_dataset(root / "data", images, labels, classes, image_size=28, channels=1, val_fraction=0.05, test_fraction=0.15, seed=0, provenance=provenance)
    return root / "data"


def throughput(root: Path, data: Path, backend: str, nodes: int, epochs: int) -> float:
    cfg = copy.deepcopy(yaml.safe_load((REPO / "config" / "config.yaml").read_text())["train"])
    cfg.update(backend=backend, ranks=2, nodes=nodes, threads_per_rank=1, epochs=epochs, augment=[])
    out = root / f"{backend}-{nodes}"
    params = {"mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "experiment": "p5"}, "train": cfg}
    command = ["srun", "--mpi=pmix", "-n", "2", "-N", str(nodes), f"--ntasks-per-node={2 // nodes}", "--cpus-per-task=1",
               "--kill-on-bad-exit=1", "-t", "20", sys.executable, "-m", "hpcdl.train", "--params", json.dumps(params),
               "--data-dir", str(data), "--out-dir", str(out)]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=root)
    history = json.loads((out / "metrics.json").read_text())["history"]
    return statistics.median(epoch["samples_per_second"] for epoch in history[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--check", action="store_true", help=f"exit 1 if a ratio is below {FLOOR}")
    args = parser.parse_args(argv)
    backends = ["torch"] + (["horovod"] if importlib.util.find_spec("horovod") else [])
    # Not under /tmp: every node of the test cluster has a /tmp of its own, and the data must be shared.
    root = Path(tempfile.mkdtemp(prefix="hpcdl-p5-", dir="/var/tmp"))
    root.chmod(0o755)
    own_cluster = "SLURM_CONF" not in os.environ
    state = root / "slurm"
    try:
        if own_cluster:
            subprocess.run(["bash", str(REPO / "tests" / "slurm" / "cluster-up.sh"), str(state)], check=True, capture_output=True, text=True,
                           env=dict(os.environ, HPCDL_SLURM_NODES="2"))
            os.environ["SLURM_CONF"] = str(state / "etc" / "slurm.conf")
        data = prepare(root)
        print(f"mnist5k, lenet5, 2 ranks x 1 thread, per-rank batch 64, {os.cpu_count()} cores, median of epochs 2..{args.epochs}")
        worst = 1.0
        for backend in backends:
            one = throughput(root, data, backend, 1, args.epochs)
            two = throughput(root, data, backend, 2, args.epochs)
            worst = min(worst, two / one)
            print(f"{backend:8s} 1 node x 2 ranks {one:9,.0f} samples/s | 2 nodes x 1 rank {two:9,.0f} samples/s | ratio {two / one:.2f}")
    finally:
        if own_cluster:
            subprocess.run(["bash", str(REPO / "tests" / "slurm" / "cluster-down.sh"), str(state)], capture_output=True, text=True)
        shutil.rmtree(root, ignore_errors=True)
    return 1 if args.check and worst < FLOOR else 0


if __name__ == "__main__":
    sys.exit(main())
