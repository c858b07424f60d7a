#!/usr/bin/env bash
# README command 2: set up (idempotent), then run the test suite (CI runs exactly this through .ci/run).
# Extra arguments go to pytest, e.g. scripts/test.sh -k horovod; paths among them are taken relative to the folder
# you call from (made absolute).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
absolute_args "$@"
"$HPCDL_ROOT/scripts/setup.sh"
allow_mpi_as_root
cd "$HPCDL_ROOT"
exec "$HPCDL_ROOT/.venv/bin/python" -m pytest "${ABSOLUTE_ARGS[@]}"
