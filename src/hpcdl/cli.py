"""The command line every stage module shares: `python -m hpcdl.<stage> --params JSON --parent-run FILE ...`.

--params is the JSON that the rule builds from the validated config (workflow/rules/common.smk:stage_params),
so a stage runs the same from Snakemake, from a test, or by hand."""

from __future__ import annotations

import argparse
import atexit
import gc
import json


def skip_the_final_collection() -> None:
    """At exit, Python's last garbage collection walks every object that torch, MLflow and scikit-learn created at
    import: about 0.5 s per process, paid by every stage on the pipeline's critical path. Registered first, this runs
    after every other exit handler (MLflow's flushes included) and moves those objects out of the collector's reach
    (gc.freeze). Files and stores are closed explicitly before that; nothing relies on the final collection."""
    atexit.register(gc.freeze)


def stage_parser(description: str) -> argparse.ArgumentParser:
    skip_the_final_collection()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", required=True, type=json.loads, help="stage parameters as JSON (see common.smk)")
    parser.add_argument("--parent-run", help="file holding the parent MLflow run id (written by the Snakefile's onstart)")
    return parser
