#!/usr/bin/env bash
# README command 2: set up (idempotent), then run the test suite (CI runs exactly this through .ci/run).
# Extra arguments go to pytest, e.g. scripts/test.sh -k horovod.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [[ $(id -u) == 0 ]]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
exec .venv/bin/python -m pytest "$@"
