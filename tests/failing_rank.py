"""A real MPI training job in which rank 1 raises at its third batch (tests/test_distributed.py launches it):
the failure must end the whole job quickly, naming the rank, instead of leaving rank 0 hung in a collective."""

import sys

import hpcdl.loop as loop
from hpcdl import train
from hpcdl.backends import mpi_comm
from hpcdl.stage_runtime import run_on_all_ranks

_augment = loop.augment_batch
_calls = {"n": 0}


def augment_then_fail(x, names, generator, fill):
    _calls["n"] += 1
    if mpi_comm().Get_rank() == 1 and _calls["n"] == 3:
        raise RuntimeError("injected failure in batch 3")
    return _augment(x, names, generator, fill)


loop.augment_batch = augment_then_fail
sys.exit(run_on_all_ranks(train.main))
