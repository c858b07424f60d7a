"""Optimizers and the LR schedule of Horovod's recipe: the per-rank LR is scaled by the number of ranks, reached
by a linear warm-up (Goyal et al. 2017), then cosine-annealed or held; stepped once per optimizer step."""

from __future__ import annotations

import torch

OPTIMIZER_NAMES = ("sgd", "adam", "rmsprop", "adagrad")
SCHEDULE_NAMES = ("cosine", "constant")


def build_optimizer(name: str, params, *, lr: float, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0):
    """PyTorch's optimizers with their multi-tensor implementations: `fused` (one kernel for every parameter; CPU and
    GPU) where PyTorch has one, else `foreach`. The default on the CPU is a Python loop over the parameters, one
    small update at a time; the update is the same (up to float summation order)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, weight_decay=weight_decay, fused=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay, foreach=True)
    raise ValueError(f"optimizer: unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")


def build_schedule(optimizer, *, world_size: int, warmup_steps: int, total_steps: int, schedule: str):
    """The optimizer must already hold the scaled LR (base LR x world size); warm-up starts from the base LR."""
    phases, milestones = [], []
    if warmup_steps > 0 and world_size > 1:
        phases.append(torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / world_size, total_iters=warmup_steps))
        milestones.append(warmup_steps)
    else:
        warmup_steps = 0
    rest = max(total_steps - warmup_steps, 1)
    if schedule == "cosine":
        phases.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=rest))
    else:
        phases.append(torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0))
    if len(phases) == 1:
        return phases[0]
    return torch.optim.lr_scheduler.SequentialLR(optimizer, phases, milestones=milestones)
