"""P4: the default pipeline, cold (no results folder), and where each stage's seconds go.

Runs `snakemake --cores 2` (the local profile, the embedded default, 2 ranks) into a fresh results folder, then
prints the wall time, the accuracies, and per stage the phases it recorded in its MLflow run (hpcdl.stage_clock:
startup = interpreter and imports, mpi_setup, data, mlflow_setup, the work itself, model_logging) and, for train
and finetune, every rank's peak resident memory. --check: exit 1 unless the wall time is <= 45 s and the accuracy
targets are met (mnist5k >= 97% test; fine-tuned >= 98% and above its baseline)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 45


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--keep", type=Path, help="keep the results here (default: a temporary folder)")
    parser.add_argument("--configfile", type=Path, help="an extra config file over the default (e.g. onnx: {export: false})")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = args.keep or Path(tmp) / "results"
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        snakemake = str(Path(sys.executable).with_name("snakemake"))
        started = time.monotonic()
        extra = ["--configfile", str(REPO / "config" / "config.yaml"), str(args.configfile.resolve())] if args.configfile else []
        run = subprocess.run([snakemake, "--cores", "2", *extra, "--config", f"results={results}"], cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.monotonic() - started
        if run.returncode != 0:
            print(run.stdout[-4000:] + run.stderr[-4000:], file=sys.stderr)
            return 1
        evaluation = json.loads((results / "evaluate" / "metrics.json").read_text())
        finetune = json.loads((results / "finetune" / "metrics.json").read_text())
        client = MlflowClient(tracking_uri=f"sqlite:///{results}/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("hpcdl-default").experiment_id])
        print(f"default pipeline, cold, --cores 2: {wall:.1f} s wall (target <= {TARGET_S} s)")
        print(f"accuracy: mnist5k test {100 * evaluation['accuracy']:.2f}%; fine-tuned {100 * finetune['finetuned']['accuracy']:.2f}% "
              f"vs {100 * finetune['baseline']['accuracy']:.2f}% from scratch")
        phases = ["startup", "mpi_setup", "data", "mlflow_setup", "fetch", "preprocess", "epochs", "evaluation", "export", "parity", "artifacts", "model_logging", "total"]
        print(f"{'stage':22s}" + "".join(f"{p:>14s}" for p in phases) + f"{'peak RSS MB/rank':>20s}")
        for stage in sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.start_time):
            seconds = {p: stage.data.metrics.get(f"seconds.{p}") for p in phases}
            memory = [v for k, v in sorted(stage.data.metrics.items()) if k.startswith("peak_rss_mb.rank")]
            print(f"{stage.info.run_name:22s}" + "".join(f"{'' if v is None else f'{v:.1f}':>14s}" for v in seconds.values())
                  + f"{' / '.join(f'{m:.0f}' for m in memory):>20s}")
    met = evaluation["accuracy"] >= 0.97 and finetune["finetuned"]["accuracy"] >= 0.98 and finetune["finetuned"]["accuracy"] > finetune["baseline"]["accuracy"]
    return 1 if args.check and (wall > TARGET_S or not met) else 0


if __name__ == "__main__":
    sys.exit(main())
