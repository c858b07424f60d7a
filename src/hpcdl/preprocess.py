"""Rule preprocess: decode a fetched dataset once into uint8 (N, C, H, W) arrays per split (seeded, stratified),
resized and converted to data.image_size/data.channels, plus manifest.json (classes, shapes, train mean/std,
sha256 of every file, provenance)."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow

from hpcdl import tracking
from hpcdl.cli import stage_parser
from hpcdl.data.prepare import SPLITS, load_split, write_dataset
from hpcdl.data.sources import load_raw, read_fetch_record
from hpcdl.stage_clock import StageClock


def main(argv=None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--raw-dir", required=True, type=Path)
    parser.add_argument("--out-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    clock = StageClock()
    params, data = args.params, args.params["data"]
    tags = tracking.runtime_tags("preprocess", image_record=params.get("image_record"), role=params["role"])
    with tracking.stage_run(params["mlflow"], stage="preprocess", parent_run_file=args.parent_run, tags=tags, run_name=f"preprocess-{params['role']}"):
        clock.mark("mlflow_setup")
        images, labels, classes = load_raw(args.raw_dir)
        provenance = read_fetch_record(args.raw_dir)
        manifest = write_dataset(
            args.out_dir, images, labels, classes,
            image_size=data["image_size"], channels=data["channels"], val_fraction=data["val_fraction"],
            test_fraction=data["test_fraction"], seed=data["seed"], provenance=provenance,
        )
        mlflow.log_params(tracking.flatten({"role": params["role"], "data": data}))
        mlflow.log_metrics({f"n_{split}": manifest["splits"][split]["n"] for split in SPLITS})
        mlflow.log_artifact(str(args.out_dir / "manifest.json"), artifact_path=params["role"])
        for split in SPLITS:
            x, y = load_split(args.out_dir, split)
            sha = {k: v for k, v in manifest["files"].items() if k.startswith(f"{split}_")}
            tracking.log_dataset(x, y, name=f"{provenance['source']}-{split}", context=f"preprocess-{split}", sha256=sha, source=args.out_dir.resolve().as_uri())
        clock.mark("preprocess")
        mlflow.log_metrics(clock.metrics())
    counts = ", ".join(f"{split} {manifest['splits'][split]['n']}" for split in SPLITS)
    print(f"hpcdl: preprocessed {provenance['source']} ({len(classes)} classes): {counts} -> {args.out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
