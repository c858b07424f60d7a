"""The command line every stage module shares: `python -m hpcdl.<stage> --params JSON --parent-run FILE ...`.

--params is the JSON that the rule builds from the validated config (workflow/rules/common.smk:stage_params),
so a stage runs the same from Snakemake, from a test, or by hand."""

from __future__ import annotations

import argparse
import json


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", required=True, type=json.loads, help="stage parameters as JSON (see common.smk)")
    parser.add_argument("--parent-run", help="file holding the parent MLflow run id (written by the Snakefile's onstart)")
    return parser
