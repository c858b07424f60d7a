#!/usr/bin/env bash
# README command 1: set up (idempotent), then run the pipeline on the embedded default with the local profile.
# Extra arguments go to snakemake, e.g. scripts/run.sh --configfile my.yaml, or --profile profiles/slurm; paths
# among them are taken relative to the folder you call from (made absolute), the workflow runs in the checkout.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
absolute_args "$@"
"$HPCDL_ROOT/scripts/setup.sh"
allow_mpi_as_root
cd "$HPCDL_ROOT"
exec "$HPCDL_ROOT/.venv/bin/snakemake" "${ABSOLUTE_ARGS[@]}"
