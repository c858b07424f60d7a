"""The parent MLflow run of a workflow invocation: opened by the Snakefile's onstart handler (`open`), marked
finished or failed by its onsuccess/onerror handlers (`close`). Every stage's run is its child."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from hpcdl import tracking
from hpcdl.atomic import atomic_write_text
from hpcdl.cli import skip_the_final_collection

RUN_ID_LINE = re.compile(r"^hpcdl-parent-run (?P<run_id>[0-9a-f]{32}) (?P<uri>\S+)$", re.MULTILINE)


def open_parent(params: dict, out: Path) -> str:
    """Create the parent run with the whole workflow config as params; it stays RUNNING until closed."""
    mlflow_cfg = params["mlflow"]
    experiment_id, store = tracking.configure(mlflow_cfg, job="workflow")
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name="workflow", tags=tracking.runtime_tags("onstart"))
    # One log_batch (MLflow splits it at 100 params per request), not a request per key: ~70 keys, ~60 ms a
    # request to a tracking server (README, Measured: P6).
    client.log_batch(run.info.run_id, params=[Param(key, str(value)) for key, value in tracking.flatten(params["config"]).items()])
    client.log_text(run.info.run_id, json.dumps(params["config"], indent=2, sort_keys=True), "config.json")
    atomic_write_text(out, run.info.run_id + "\n")
    # The log line is what `close` reads back: it names the store too, so closing needs no config.
    print(f"hpcdl-parent-run {run.info.run_id} {store.uri}")
    print(f"MLflow runs table: {tracking.runs_url(mlflow_cfg, experiment_id)}")
    return run.info.run_id


def close_parent(log: Path, status: str) -> None:
    match = RUN_ID_LINE.search(Path(log).read_text())
    if not match:
        return
    import mlflow

    mlflow.set_tracking_uri(match["uri"])
    client = MlflowClient()
    if client.get_run(match["run_id"]).info.status == "RUNNING":
        client.set_terminated(match["run_id"], status=status)


def main(argv=None) -> int:
    skip_the_final_collection()
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    opener = commands.add_parser("open")
    opener.add_argument("--params", required=True, type=json.loads)
    opener.add_argument("--out", required=True, type=Path)
    closer = commands.add_parser("close")
    closer.add_argument("--log", required=True, type=Path)
    closer.add_argument("--status", required=True, choices=["FINISHED", "FAILED", "KILLED"])
    args = parser.parse_args(argv)
    if args.command == "open":
        open_parent(args.params, args.out)
    else:
        close_parent(args.log, args.status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
