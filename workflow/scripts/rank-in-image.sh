#!/usr/bin/env bash
# One MPI rank of train or finetune in the stage image (the hybrid model): the host's launcher (srun --mpi=pmix on
# Slurm, mpirun locally) starts this on every node, once per rank, and it enters the image:
#
#   rank-in-image.sh IMAGE [APPTAINER_ARGS ...] -- COMMAND ...
#
# Runs here, on the rank's own node, so what is node-local is found on that node, not on the submitting host:
# $TMPDIR (else /tmp), bound into the container, is where the node's ranks share Open MPI's session directory and
# the backing files of its shared-memory transport (their default, /dev/shm, is private to each container under
# --contain, and the ranks of one node would fall back to TCP).
set -euo pipefail
image=$1; shift
args=()
while (($#)) && [[ $1 != -- ]]; do args+=("$1"); shift; done
(($#)) || { echo "rank-in-image.sh: missing -- before the command" >&2; exit 2; }
shift
node_tmp=${TMPDIR:-/tmp}
exec apptainer exec "${args[@]}" --bind "$node_tmp" --env "OMPI_MCA_btl_vader_backing_directory=$node_tmp" "$image" "$@"
