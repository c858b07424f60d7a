"""The parent MLflow run of a workflow invocation: opened by the Snakefile's onstart handler, marked finished or
failed by its onsuccess/onerror handlers. Every stage's run is its child.

The run is opened by a child process that then stays, idle, until Snakemake tells it how the workflow ended
(`open --hold`, driven by `ParentRun`): closing then costs one request instead of a new interpreter that imports
MLflow and sets up its store again (about 1.8 s at the end of every invocation, README: Measured, P4), and a
Snakemake that dies without running a handler (SIGKILL, a lost login session) still gets its run marked KILLED,
when the keeper's stdin reaches end of file. A separate process, not Snakemake's own: MLflow's credentials go into
the environment of the process that talks to the server, and Snakemake's environment is every job's.
MLflow is imported inside the functions that run in the keeper: the Snakefile imports this module."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from hpcdl.cli import skip_the_final_collection

RUN_ID_LINE = re.compile(r"^hpcdl-parent-run (?P<run_id>[0-9a-f]{32}) (?P<uri>\S+)$", re.MULTILINE)
STATUSES = ("FINISHED", "FAILED", "KILLED")
CLOSE_TIMEOUT_S = 300


def open_parent(params: dict, out: Path) -> tuple[str, str]:
    """Create the parent run with the whole workflow config as params; it stays RUNNING until closed."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from hpcdl import tracking
    from hpcdl.atomic import atomic_write_text

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
    return run.info.run_id, store.uri


def close_run(run_id: str, uri: str, status: str) -> None:
    """Mark the run ended, unless something else ended it already."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status=status)


def close_parent(log: Path, status: str) -> None:
    """Close the run that the `open` output in `log` names (no-op if it names none)."""
    match = RUN_ID_LINE.search(Path(log).read_text())
    if match:
        close_run(match["run_id"], match["uri"], status)


def hold_until_told(run_id: str, uri: str) -> None:
    """Keeper side: end the output (Snakemake reads it to its end), then wait for one status line on stdin; end of
    file without one means Snakemake is gone without a handler: KILLED."""
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    told = sys.stdin.readline().strip()
    close_run(run_id, uri, told if told in STATUSES else "KILLED")


class ParentRun:
    """Snakemake side: the keeper process of this invocation's parent run."""

    def __init__(self, keeper: subprocess.Popen, log: Path):
        self.keeper, self.log = keeper, log

    @classmethod
    def open(cls, python: str, params_json: str, out: Path, log: Path) -> tuple[ParentRun | None, str, str]:
        """Start the keeper and wait until the run is open: (ParentRun, its output, '') or, when it could not
        open the run, (None, its output, its error output). Writes the log only once the run is open."""
        errors = tempfile.TemporaryFile("w+")
        keeper = subprocess.Popen([python, "-m", "hpcdl.mlflow_parent", "open", "--params", params_json, "--out", str(out), "--hold"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True,
                                  start_new_session=True)  # Ctrl-C reaches Snakemake, whose onerror then closes the run
        output = keeper.stdout.read()  # to its end: the keeper ends its output once the run is open, or exits
        keeper.stdout.close()
        errors.seek(0)
        if not RUN_ID_LINE.search(output):
            keeper.wait()
            return None, output, errors.read()
        os.makedirs(log.parent, exist_ok=True)
        log.write_text(output + errors.read())
        return cls(keeper, log), output, ""

    def close(self, status: str, python: str) -> None:
        """Tell the keeper; if it is gone or fails, close the run from the log with a new process instead."""
        try:
            self.keeper.stdin.write(status + "\n")
            self.keeper.stdin.close()
            told = self.keeper.wait(timeout=CLOSE_TIMEOUT_S) == 0
        except (OSError, subprocess.TimeoutExpired):
            self.keeper.kill()
            told = False
        if not told:
            subprocess.run([python, "-m", "hpcdl.mlflow_parent", "close", "--log", str(self.log), "--status", status])


def main(argv=None) -> int:
    skip_the_final_collection()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    opener = commands.add_parser("open")
    opener.add_argument("--params", required=True, type=json.loads)
    opener.add_argument("--out", required=True, type=Path)
    opener.add_argument("--hold", action="store_true", help="stay, and close the run with the status read from stdin")
    closer = commands.add_parser("close")
    closer.add_argument("--log", required=True, type=Path)
    closer.add_argument("--status", required=True, choices=STATUSES)
    args = parser.parse_args(argv)
    if args.command == "open":
        run_id, uri = open_parent(args.params, args.out)
        if args.hold:
            hold_until_told(run_id, uri)
    else:
        close_parent(args.log, args.status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
