# Shared by scripts/run.sh, scripts/test.sh and scripts/setup.sh (sourced, not run).
# Why: the README commands must work as `scripts/run.sh`, `./scripts/run.sh`, `bash scripts/run.sh` or from any
# other folder, so every path is made absolute before the first `cd`.

# The checkout this script belongs to, absolute and independent of the caller's working directory.
HPCDL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)

# absolute_args ARG...: the arguments, each one that names an existing file or folder relative to the caller's
# working directory replaced by its absolute path (e.g. `--configfile my.yaml` from another folder); the rest
# unchanged. Sets the array ABSOLUTE_ARGS.
absolute_args() {
    ABSOLUTE_ARGS=()
    local arg
    for arg in "$@"; do
        if [[ $arg != -* && $arg != /* && -e $arg ]]; then
            ABSOLUTE_ARGS+=("$(cd "$(dirname "$arg")" && pwd -P)/$(basename "$arg")")
        else
            ABSOLUTE_ARGS+=("$arg")
        fi
    done
}

# Open MPI refuses to start as root unless told (containers, CI); ordinary users need nothing.
allow_mpi_as_root() {
    if [[ $(id -u) == 0 ]]; then
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
}
