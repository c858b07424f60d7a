#!/usr/bin/env bash
# Reproducible, cached build of Horovod 0.28.1 for the project's torch (2.14.x),
# from the PyPI sdist plus scripts/horovod-0.28.1-torch2.14.patch.
#
# Usage: scripts/build-horovod.sh [--python PATH] [--cpu | --gpu]
#   --python PATH  target interpreter (default: $VIRTUAL_ENV/bin/python, else <repo>/.venv/bin/python)
#   --cpu / --gpu  flavour. Default (auto): gpu only if nvcc is found AND torch is a CUDA
#                  build AND torch.cuda.is_available() (a GPU is actually visible); cpu otherwise.
#                  A CUDA torch + nvcc alone is not enough: PyPI torch is always a CUDA build and
#                  CPU hosts often carry a partial toolkit. Pass --gpu on GPU-less build/login nodes.
#   cpu: HOROVOD_CPU_OPERATIONS=MPI (the patch keeps CUDA off).
#   gpu: additionally HOROVOD_GPU_OPERATIONS=NCCL; NCCL comes from HOROVOD_NCCL_HOME if set,
#        else from the nvidia-nccl wheel that torch depends on. Compiles and passes the CPU-side
#        checks on a GPU-less host; NCCL on real GPUs is untested. HOROVOD_BUILD_CUDA_CC_LIST
#        (e.g. 80,90) limits the CUDA archs built (default: all nvcc knows, ~9 min on 2 cores).
#
# Requirements (Debian 12): g++ cmake make patch libopenmpi-dev openmpi-bin
#   (apt-get install -y g++ cmake make patch libopenmpi-dev openmpi-bin); in the target env:
#   torch, setuptools>=70.1, packaging, cloudpickle, psutil, pyyaml; gpu: nvcc (CUDA toolkit).
# Cache: ${HPCDL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcdl}/wheels/<key>/horovod-*.whl
#   key = horovod-<ver>_torch-<torch ver>_<python tag>_<cpu|gpu>_<MPI>_patch-<sha256[:16] of patch>
#   (<MPI>: the MPI library the wheel links, e.g. ompi-4.1.4, so a wheel built on a host with another MPI, or
#   in an image with another one, is never reused. The Apptainer image build shares this cache when
#   containers/build-image.sh is given HPCDL_CACHE.)
set -euo pipefail

HVD_VERSION=0.28.1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PATCH=$ROOT/scripts/horovod-$HVD_VERSION-torch2.14.patch
PY=${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}; PY=${PY:-$ROOT/.venv/bin/python}
FLAVOUR=auto
while [[ $# -gt 0 ]]; do
  case $1 in
    --python) PY=$2; shift 2 ;;   # made absolute below, before any cd
    --cpu) FLAVOUR=cpu; shift ;;
    --gpu) FLAVOUR=gpu; shift ;;
    -h|--help) sed -n '2,/^set -e/{/^#/p}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
log() { echo "[build-horovod $(date +%T)] $*"; }
# Relative paths are the caller's. The script does not change folder (pip gets the unpacked sdist's path: a `cd`
# into it once broke a relative --python from scripts/setup.sh), and both paths are made absolute here, so a step
# that does change folder still finds them (tests/test_setup.py checks the logged paths). Not resolved through
# symlinks: a venv's python is a link to the base interpreter, and only the link's path selects the venv.
[[ $PY == /* ]] || PY=$PWD/$PY
[[ -n ${HPCDL_CACHE:-} && $HPCDL_CACHE != /* ]] && HPCDL_CACHE=$PWD/$HPCDL_CACHE
START=$SECONDS

[[ -x $PY ]] || { echo "python not found: $PY" >&2; exit 1; }
BIN=$(dirname "$PY")   # horovodrun lands next to the interpreter
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
# CUDA toolkit root: HOROVOD_CUDA_HOME, CUDA_HOME, CUDA_PATH, /usr/local/cuda, else <nvcc on PATH>/../..
# (an nvcc *wrapper* in /usr/local/bin would otherwise make torch and CMake look in /usr/local).
CUDA_ROOT=${HOROVOD_CUDA_HOME:-${CUDA_HOME:-${CUDA_PATH:-}}}
[[ -z $CUDA_ROOT && -x /usr/local/cuda/bin/nvcc ]] && CUDA_ROOT=/usr/local/cuda
[[ -z $CUDA_ROOT ]] && NVCC=$(command -v nvcc) && CUDA_ROOT=$(dirname "$(dirname "$NVCC")")
NVCC=""; [[ -n $CUDA_ROOT && -x $CUDA_ROOT/bin/nvcc ]] && NVCC=$CUDA_ROOT/bin/nvcc
if [[ $FLAVOUR == auto ]]; then
  FLAVOUR=cpu
  if [[ -n $NVCC ]] && "$PY" -c 'import torch, sys; sys.exit(not (torch.version.cuda and torch.cuda.is_available()))' 2>/dev/null; then
    FLAVOUR=gpu
  fi
fi
PATCH_SHA=$(sha256sum "$PATCH" | cut -c1-16)
MPI_TAG=$(mpirun --version 2>/dev/null | sed -n '1s/^mpirun (Open MPI) \([0-9.]*\).*/ompi-\1/p')
[[ -n $MPI_TAG ]] || { echo "Open MPI's mpirun not found (apt-get install openmpi-bin libopenmpi-dev)" >&2; exit 1; }
KEY=horovod-${HVD_VERSION}_torch-${TORCH_VERSION}_${PYTAG}_${FLAVOUR}_${MPI_TAG}_patch-${PATCH_SHA}
CACHE_DIR=${HPCDL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcdl}/wheels/$KEY
log "python=$PY torch=$TORCH_VERSION flavour=$FLAVOUR"
log "cache dir: $CACHE_DIR"

shopt -s nullglob
wheels=("$CACHE_DIR"/horovod-*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
  TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
  log "cache miss: downloading horovod==$HVD_VERSION sdist (index from pip's own config)"
  "$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation -d "$TMP" "horovod==$HVD_VERSION"
  tar -xzf "$TMP/horovod-$HVD_VERSION.tar.gz" -C "$TMP"
  SRC=$TMP/horovod-$HVD_VERSION
  log "applying $(basename "$PATCH")"
  patch -p1 --forward --batch -d "$SRC" < "$PATCH" || { echo "patch did not apply cleanly" >&2; exit 1; }

  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
         HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=MPI MAKEFLAGS="-j$(nproc)"
  unset HOROVOD_GPU_OPERATIONS HOROVOD_GPU_ALLREDUCE HOROVOD_GPU_ALLGATHER HOROVOD_GPU_BROADCAST \
        HOROVOD_GPU_ALLTOALL HOROVOD_GPU_REDUCESCATTER
  if [[ $FLAVOUR == gpu ]]; then
    [[ -n $NVCC ]] || { echo "gpu flavour needs a CUDA toolkit (nvcc; set CUDA_HOME)" >&2; exit 1; }
    export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME=$CUDA_ROOT CUDA_HOME=$CUDA_ROOT
    if [[ -z ${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_INCLUDE:-} ]]; then
      # Reuse the NCCL wheel torch itself loads; FindNCCL wants lib/libnccl.so, the wheel ships .so.2.
      NCCL_PKG=$("$PY" -c 'import nvidia.nccl as m; print(list(m.__path__)[0])')
      mkdir -p "$TMP/nccl/lib"; ln -s "$NCCL_PKG/include" "$TMP/nccl/include"
      ln -s "$NCCL_PKG/lib/libnccl.so.2" "$TMP/nccl/lib/libnccl.so"
      export HOROVOD_NCCL_HOME=$TMP/nccl HOROVOD_NCCL_LINK=SHARED
    fi
  fi
  log "building wheel (MAKEFLAGS=$MAKEFLAGS, this takes minutes)"
  t0=$SECONDS
  "$PY" -m pip wheel --no-cache-dir --no-build-isolation --no-deps -w "$TMP/dist" "$SRC"
  log "wheel built in $((SECONDS - t0)) s"
  mkdir -p "$CACHE_DIR"
  cp "$TMP"/dist/horovod-*.whl "$CACHE_DIR/"
  wheels=("$CACHE_DIR"/horovod-*.whl)
else
  log "cache hit: ${wheels[0]##*/}"
fi
log "installing ${wheels[0]##*/}"
"$PY" -m pip install --no-deps --force-reinstall "${wheels[0]}"

log "horovodrun --check-build"
check=$("$BIN/horovodrun" --check-build)
echo "$check"
grep -Eq '\[X\] PyTorch' <<<"$check" || { echo "PyTorch support missing" >&2; exit 1; }
grep -Eq '\[X\] MPI' <<<"$check" || { echo "MPI support missing" >&2; exit 1; }

log "smoke test: 2 MPI ranks allreduce"
MPI_FLAGS=(--oversubscribe); [[ $EUID -eq 0 ]] && MPI_FLAGS+=(--allow-run-as-root)
mpirun "${MPI_FLAGS[@]}" -np 2 "$PY" -c '
import torch, horovod.torch as hvd
hvd.init()
assert hvd.size() == 2, hvd.size()
out = hvd.allreduce(torch.tensor([hvd.rank() + 1.0]), op=hvd.Sum)
assert out.item() == 3.0, out
print(f"rank {hvd.rank()}/{hvd.size()}: allreduce ok")
'
log "done in $((SECONDS - START)) s (key $KEY)"
