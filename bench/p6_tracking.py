"""P6: what tracking to a server costs a stage, and how long the offline sync takes.

    MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=... bench/p6_tracking.py --server http://login1:5000

1. Metric points per second one stage logs, to the server vs to a local SQLite file, both measured in this run: one
   point per request (log_metric), and one epoch's 7 metrics per request (log_metrics, what the stages do).
2. The sync: the default pipeline with `tracking_offline: always` (every run in offline stores), then the time of
   `python -m hpcdl.mlflow_sync` into the server, and of a second sync (which adds nothing).
Credentials: MLflow's usual places. --skip-pipeline measures only 1."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "samples_per_second", "epoch_seconds")


def points_per_second(uri: str, points: int, batched: bool) -> float:
    client = MlflowClient(tracking_uri=uri)
    name = "p6-bench"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id):
        started = time.perf_counter()
        if batched:
            for step in range(points // len(METRICS)):
                mlflow.log_metrics({key: float(step) for key in METRICS}, step=step)
        else:
            for step in range(points):
                mlflow.log_metric("x", float(step), step=step)
        return points / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--points", type=int, default=700)
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = f"sqlite:///{tmp}/p6.db"
        for batched, what in ((False, "1 point per request"), (True, f"{len(METRICS)} metrics per request (an epoch)")):
            server = points_per_second(args.server, args.points, batched)
            local = points_per_second(sqlite, args.points, batched)
            print(f"{what:38s} server {server:8,.0f} points/s | SQLite {local:8,.0f} points/s | server/SQLite {server / local:.2f}")
        if args.skip_pipeline:
            return 0
        results = Path(tmp) / "results"
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        snakemake = str(Path(sys.executable).with_name("snakemake"))
        run = subprocess.run([snakemake, "--cores", "2", "--config", f"results={results}", f"tracking_uri={args.server}", "tracking_offline=always",
                              "experiment=p6-sync", "--no-hooks"], cwd=REPO, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stdout[-3000:] + run.stderr[-3000:], file=sys.stderr)
            return 1
        stores = results / "mlflow-offline"
        for attempt in ("first sync", "second sync"):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "hpcdl.mlflow_sync", str(stores), args.server], check=True, capture_output=True, text=True)
            print(f"{attempt} of the default pipeline's {len(list(stores.glob('*.db')))} offline stores: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
