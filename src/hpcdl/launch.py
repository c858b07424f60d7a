"""How the MPI stages' ranks are started on one machine without Slurm: the one launch line the rules, tests and
benchmarks share, and the warning printed when a local run asks for more ranks than the machine has cores.

No torch/MLflow imports: the Snakefile imports this at parse time."""

from __future__ import annotations

import os

# --bind-to none: ranks x threads_per_rank decide the CPU use, not Open MPI's core binding.
# --oversubscribe: Open MPI counts one slot per core and refuses more ranks ("not enough slots"); users try 4 ranks
#   on a 2-core laptop. On Slurm the allocation decides instead (srun; this line is not used there).
# mpi_yield_when_idle: ranks that wait in a collective give their core to the others (weak-scaling efficiency on
#   2 cores 0.58-0.67 -> 0.81, README: Measured).
LOCAL_MPIRUN = "mpirun --bind-to none --oversubscribe --mca mpi_yield_when_idle 1"


def local_cores() -> int:
    """CPUs this process may run on (its affinity mask: a cgroup or taskset limit counts, not the machine)."""
    return len(os.sched_getaffinity(0))


def oversubscription_warning(ranks: int, threads_per_rank: int, cores: int | None = None) -> str | None:
    """One line for the job's log when ranks x threads exceed the cores of this machine, else None."""
    cores = local_cores() if cores is None else cores
    wanted = ranks * threads_per_rank
    if wanted <= cores:
        return None
    return (f"hpcdl: warning: {ranks} MPI ranks x {threads_per_rank} thread(s) on {cores} cores: the ranks share "
            f"cores (oversubscribed), so each runs slower than it would on its own core")
