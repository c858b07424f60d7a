#!/usr/bin/env bash
# README command 1: set up (idempotent), then run the pipeline on the embedded default with the local profile.
# Extra arguments go to snakemake, e.g. scripts/run.sh --configfile my.yaml, or --profile profiles/slurm.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [[ $(id -u) == 0 ]]; then  # Open MPI refuses root unless told (containers, CI); users need nothing
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
exec .venv/bin/snakemake "$@"
