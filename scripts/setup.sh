#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine for hpcdl (run by scripts/run.sh and scripts/test.sh):
#   1. Debian packages (as root; otherwise it names what is missing): Open MPI (the ranks; mpi4py and Horovod build
#      against it), a C++ toolchain and CMake (the Horovod build), git (runs are tagged with the commit), patch,
#      Python 3.11 with venv and headers (Debian 12's python3).
#   2. .venv from requirements.txt constrained by requirements.lock (every package pinned), and this package.
#   3. Horovod 0.28.1 built with the project's patch (scripts/build-horovod.sh; the wheel is cached by key).
# Skips steps 2-3 when their inputs have not changed since the last successful set-up.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$HPCDL_ROOT"
VENV=$HPCDL_ROOT/.venv

APT_PACKAGES=(libopenmpi-dev openmpi-bin g++ cmake make git patch python3 python3-venv python3-dev)
missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        echo "setup: missing Debian packages: ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
        exit 1
    fi
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "setup: hpcdl needs Python 3.11 (torch 2.14.1 wheels); $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=python3.11" >&2
    exit 1
fi

inputs=(scripts/common.sh requirements.txt requirements-runtime.txt requirements.lock pyproject.toml scripts/setup.sh scripts/build-horovod.sh scripts/horovod-0.28.1-torch2.14.patch)
stamp=$(cat "${inputs[@]}" | sha256sum | cut -c1-16)
if [[ -x $VENV/bin/python && $(cat "$VENV/.hpcdl-setup" 2>/dev/null) == "$stamp" ]]; then
    exit 0
fi
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip==25.3"
# Byte-compiled on every core afterwards, not by pip on one (the first import of torch then finds its .pyc files);
# like pip's own step, files that do not compile are skipped quietly (torch ships a Python 3.12-only test helper).
"$VENV/bin/python" -m pip install -q --no-compile -r requirements.txt -c requirements.lock
"$VENV/bin/python" -m compileall -qq -j 0 "$VENV/lib/python3.11/site-packages" || true
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$HPCDL_ROOT/scripts/build-horovod.sh" --python "$VENV/bin/python"
echo "$stamp" > "$VENV/.hpcdl-setup"
echo "setup: done ($VENV)"
