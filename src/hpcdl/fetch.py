"""Rule fetch (and fetch_weights): get a dataset's raw files, or pretrained weights, onto local disk with their
sha256 verified. Runs on the login node: compute nodes often have no internet."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow

from hpcdl import tracking
from hpcdl.cli import stage_parser
from hpcdl.data.download import download
from hpcdl.data.sources import fetch_source
from hpcdl.stage_clock import StageClock


def fetch_weights(weights: dict, out: Path) -> Path:
    """Weights from a URL or a local path (as file://), verified against the configured sha256."""
    url = weights.get("url") or Path(weights["path"]).expanduser().resolve().as_uri()
    if "path" in weights and not Path(weights["path"]).expanduser().exists():
        raise FileNotFoundError(f"finetune.weights.path: {weights['path']} does not exist")
    return download(url, out, weights["sha256"])


def main(argv=None) -> int:
    parser = stage_parser(__doc__)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out-dir", type=Path, help="dataset: folder for the raw files and fetch.json")
    target.add_argument("--weights-out", type=Path, help="weights: the file to write")
    args = parser.parse_args(argv)
    clock = StageClock()
    params = args.params
    stage = "fetch_weights" if args.weights_out else "fetch"
    tags = tracking.runtime_tags(stage, image_record=params.get("image_record"), role=params.get("role"), arch=params.get("arch"))
    run_name = f"fetch_weights-{params['arch']}" if args.weights_out else f"fetch-{params['role']}"
    with tracking.stage_run(params["mlflow"], stage=stage, parent_run_file=args.parent_run, tags=tags, run_name=run_name) as run:
        clock.mark("mlflow_setup")
        if args.weights_out:
            path = fetch_weights(params["weights"], args.weights_out)
            mlflow.log_params({"weights.arch": params["arch"], "weights.source": params["weights"].get("url") or params["weights"]["path"], "weights.sha256": params["weights"]["sha256"]})
            print(f"hpcdl: weights for {params['arch']} at {path}", flush=True)
        else:
            dataset = params["dataset"]
            provenance = fetch_source(dataset, args.out_dir, mirror=params.get("mirror", {}).get(dataset["source"]))
            mlflow.log_params(tracking.flatten({"role": params["role"], "dataset": dataset}))
            mlflow.log_dict(provenance, f"{params['role']}/fetch.json")
            print(f"hpcdl: fetched {dataset['source']} ({len(provenance['files'])} files) into {args.out_dir}; run {run.info.run_id}", flush=True)
        clock.mark("fetch")
        mlflow.log_metrics(clock.metrics())
    return 0


if __name__ == "__main__":
    sys.exit(main())
