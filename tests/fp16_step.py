"""One mixed-precision optimizer step through Backend.step on 2 MPI ranks, where rank 1's gradients overflow
(tests/test_distributed.py launches it with a long Horovod cycle time, so that the allreduce started during
backward is still in flight when the step begins). Correct: every rank sees the averaged, non-finite gradients,
skips the step and halves the loss scale; the weights stay finite and equal on all ranks. Prints one JSON line
per rank: {"rank", "changed", "finite", "scale"}."""

import json
import sys

import torch

from hpcdl.backends import make_backend, unwrap

backend = make_backend(sys.argv[1])
torch.manual_seed(0)
model, optimizer = backend.wrap(torch.nn.Linear(4, 2), lambda params: torch.optim.SGD(params, lr=0.1), grad_accum_steps=1)
backend.sync_initial_state(unwrap(model), optimizer, resumed=False)
before = [p.detach().clone() for p in unwrap(model).parameters()]
scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
loss = model(torch.ones(3, 4)).sum()
if backend.rank == 1:
    loss = loss * float("inf")  # this rank's gradients overflow
scaler.scale(loss).backward()
backend.step(optimizer, scaler)
after = [p.detach() for p in unwrap(model).parameters()]
print(json.dumps({
    "rank": backend.rank,
    "changed": any(not torch.equal(a, b) for a, b in zip(before, after)),
    "finite": all(bool(torch.isfinite(a).all()) for a in after),
    "scale": scaler.get_scale(),
}), flush=True)
backend.barrier()
backend.shutdown()
