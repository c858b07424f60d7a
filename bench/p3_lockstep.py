"""P3's decomposition: where a synchronous 2-rank step loses throughput, measured with no pipeline around it.

Started by bench/p3_scaling.py under the local rule's launcher (hpcdl.launch.LOCAL_MPIRUN -n 1 or -n 2). Each rank
runs the training step of rule train (hpcdl's LeNet-5 in the configured memory format, the configured SGD, its
per-rank batch, 1 thread) on the same batches, in three modes, one after another, and rank 0 prints one JSON line:
- alone: no communication at all (the ranks never wait for each other);
- lockstep: an MPI_Barrier after every backward, so each step waits for the slower rank, and nothing is exchanged;
- summed: the gradients copied into one flat buffer and summed by one in-place MPI_Allreduce after every backward,
  what the torch backend's hook (hpcdl.backends.mpi_allreduce_hook) does with DDP's single bucket; the time of
  that sum after a barrier (its own cost without the wait for the slower rank, the copies into and out of the flat
  buffer included, as DDP copies into and out of its bucket) is reported too.
The ratios to twice one rank alone say what lockstep itself costs on this machine and what the sum adds: no
communication scheme for synchronous data parallelism beats the lockstep row."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from hpcdl.backends import mpi_comm, set_cpu_mpi_defaults
from hpcdl.data.prepare import load_split, read_manifest
from hpcdl.loop import MEMORY_FORMATS, Normaliser
from hpcdl.models import build_model
from hpcdl.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]
MODES = ("alone", "lockstep", "summed")
WARMUP_STEPS = 20


def main(data_dir: Path, steps: int) -> None:
    set_cpu_mpi_defaults()
    from mpi4py import MPI

    comm = mpi_comm()
    torch.set_num_threads(1)
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["train"]
    manifest = read_manifest(data_dir)
    x_uint8, labels = load_split(data_dir, "train")
    layout = MEMORY_FORMATS[cfg["memory_format"]]
    x = Normaliser(manifest["mean"], manifest["std"])(x_uint8).contiguous(memory_format=layout)
    y = torch.from_numpy(np.asarray(labels))
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["model"], in_channels=manifest["channels"], image_size=manifest["image_size"], num_classes=manifest["num_classes"])
    model = model.to(memory_format=layout)
    optimizer = build_optimizer(cfg["optimizer"], model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"], weight_decay=cfg["weight_decay"])
    parameters = list(model.parameters())
    flat = torch.zeros(sum(p.numel() for p in parameters))
    batch = cfg["batch_size"]
    batches = len(y) // batch
    allreduce_s: list[float] = []

    def step(index: int, mode: str) -> None:
        rows = slice((index % batches) * batch, (index % batches + 1) * batch)
        optimizer.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        if mode == "lockstep":
            comm.Barrier()
        elif mode == "summed":
            comm.Barrier()
            started = time.perf_counter()
            torch.cat([p.grad.reshape(-1) for p in parameters], out=flat)
            comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
            flat.div_(comm.Get_size())
            offset = 0
            for p in parameters:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
            allreduce_s.append(time.perf_counter() - started)
        optimizer.step()

    result = {}
    for mode in MODES if comm.Get_size() > 1 else ("alone",):
        for index in range(WARMUP_STEPS):
            step(index, mode)
        comm.Barrier()
        started = time.perf_counter()
        for index in range(steps):
            step(index, mode)
        result[mode] = comm.allreduce(steps * batch / (time.perf_counter() - started))  # samples/s of all ranks
    if allreduce_s:
        result["allreduce_us_median"] = 1e6 * float(np.median(allreduce_s))
        result["allreduce_us_p90"] = 1e6 * float(np.percentile(allreduce_s, 90))
    if comm.Get_rank() == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
