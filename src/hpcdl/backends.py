"""Data-parallel backends behind one small interface, so the training loop (hpcdl.loop) never branches on them.

Both start from MPI: ranks are launched by `mpirun` locally or `srun --mpi=pmix` on Slurm, so rank, size and
local rank come from MPI itself (works under every launcher, no OMPI_*/SLURM_* guessing).
- TorchBackend: torch.distributed (gloo on CPU, nccl on GPU) + DistributedDataParallel; rank 0's address and a
  free port are broadcast over MPI for the rendezvous. On CPU, DDP's gradient buckets are summed by MPI instead of
  gloo (mpi_allreduce_hook, through DDP's own comm-hook API): gloo's TCP allreduce of LeNet-5's 62k gradients
  takes ~600 us on one node where Open MPI's shared memory takes ~40 us, on a step of ~5 ms.
- HorovodBackend: Horovod's own recipe (hvd.DistributedOptimizer, broadcast_parameters), with a shorter
  background cycle on CPU where ranks wait for each other (CPU_HOROVOD_CYCLE_TIME_MS) and a longer one for a lone rank.

Measured in bench/p3_scaling.py, which runs both choices side by side (HPCDL_TORCH_CPU_ALLREDUCE=gloo, and
HOROVOD_CYCLE_TIME=1, Horovod's default).
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import sys
from datetime import timedelta

import torch
from torch import nn

BACKEND_NAMES = ("torch", "horovod")
TORCH_CPU_ALLREDUCE_NAMES = ("mpi", "gloo")  # HPCDL_TORCH_CPU_ALLREDUCE: what sums DDP's gradients on CPU (default mpi)
# Horovod's background thread looks for ready gradients every HOROVOD_CYCLE_TIME ms (0.28's default: 1): a ~5 ms
# CPU step then waits up to 1 ms for its allreduce to start. 0.1 ms measured best on 2 cores (P3, one run: 0.71 ->
# 0.87 weak scaling); a user's HOROVOD_CYCLE_TIME wins. GPU jobs keep Horovod's default (their steps are not this short).
CPU_HOROVOD_CYCLE_TIME_MS = "0.1"
# ...but a 1-rank world has nothing to average, and the thread's wake-ups then only take the core from the compute
# thread where cores are shared (other ranks, other jobs). Two 1-rank runs side by side on 2 cores (P3's ceiling
# row) made 0.73 of twice one alone at 0.1 ms, 0.89-0.94 at 1 ms and 1.01-1.03 at 5 ms. A 1-rank Horovod run on CPU
# therefore cycles every 5 ms, and its collectives (HorovodBackend.allreduce_sum, ...) return at once without Horovod.
CPU_SINGLE_RANK_HOROVOD_CYCLE_TIME_MS = "5"
# On CPU, MPI calls that wait give their core away (Open MPI's mpi_yield_when_idle, which mpirun's line in
# hpcdl.launch also sets): a rank's compute thread shares its cores with Horovod's background thread and, on a busy
# node, with other ranks. srun starts the ranks without mpirun, so the setting comes from the environment, read at
# MPI's initialisation. Measured in bench/p5_nodes.py on the test cluster (srun, 2 ranks on 2 cores): Horovod
# 9.5k -> 18.3-20.2k samples/s on one node and 8.7k -> 19.3-19.6k on two; torch 18.3-21.7k either way (noise).
# A user's value wins.
CPU_MPI_ENVIRONMENT = {"OMPI_MCA_mpi_yield_when_idle": "1"}
COMPRESSION_NAMES = ("none", "fp16")  # Horovod allreduce compression


def set_cpu_mpi_defaults() -> None:
    """CPU_MPI_ENVIRONMENT where the user set nothing; before MPI is initialised (by mpi4py or hvd.init())."""
    if not torch.cuda.is_available():
        for name, value in CPU_MPI_ENVIRONMENT.items():
            os.environ.setdefault(name, value)


def mpi_comm():
    """COMM_WORLD, initialising MPI once (a singleton when started without a launcher)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def abort_all_ranks(rank: int, error: BaseException) -> None:
    """Report which rank failed and abort the whole MPI job, so peers blocked in a collective do not hang."""
    import traceback

    detail = "".join(traceback.format_exception(error))
    print(f"{detail}hpcdl: rank {rank} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    comm = mpi_comm()
    if comm.Get_size() > 1:
        comm.Abort(1)


class Backend:
    """What the loop needs from a data-parallel runtime."""

    name = "base"
    rank = 0
    size = 1
    local_rank = 0  # rank among the ranks of this node: selects the GPU
    hosts: list[str] = []  # host name of every rank, in rank order (set by stage_runtime.start_backend)
    gradient_allreduce = "none"  # what averages the gradients: the run's tag gradient_allreduce

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def wrap(self, model: nn.Module, make_optimizer, grad_accum_steps: int):
        """Return (model, optimizer) that average gradients across ranks; make_optimizer(params) builds the
        plain optimizer. The returned model may be a wrapper or a copy: use unwrap() on it afterwards."""
        raise NotImplementedError

    def sync_initial_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, resumed: bool) -> None:
        """Make every rank start from rank 0's weights and (after loading a checkpoint) optimizer state."""

    def no_sync(self, model: nn.Module):
        """Context for accumulation micro-steps whose gradients must not be averaged yet."""
        return contextlib.nullcontext()

    def step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
        """One optimizer step on the averaged gradients; with a gradient scaler (fp16), unscale them first and
        skip the step when any rank's gradients overflowed. DDP has averaged them by the end of backward()."""
        if scaler is None:
            optimizer.step()
            return
        scaler.step(optimizer)
        scaler.update()

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def broadcast_object(self, obj, root: int = 0):
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        pass

    @property
    def is_root(self) -> bool:
        return self.rank == 0


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, timeout_s: float = 300.0):
        set_cpu_mpi_defaults()
        comm = mpi_comm()
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.local_rank = comm.Split_type(split_type=_shared_split_type()).Get_rank()
        address = comm.bcast(_rendezvous_address() if self.rank == 0 else None, root=0)
        use_cuda = torch.cuda.is_available()
        torch.distributed.init_process_group(
            "nccl" if use_cuda else "gloo",
            init_method=f"tcp://{address[0]}:{address[1]}",
            rank=self.rank,
            world_size=self.size,
            timeout=timedelta(seconds=timeout_s),
        )
        if self.size > 1:  # (parameters are float32, which mpi4py sums; fp16/bf16 are autocast, not stored)
            self.gradient_allreduce = "nccl" if use_cuda else cpu_allreduce()
        if self.gradient_allreduce == "mpi":  # the hook's own communicator, so its sums never match another call's
            self.gradient_comm = comm.Dup()  # collective: every rank, here, once

    def wrap(self, model, make_optimizer, grad_accum_steps):
        if self.size == 1:  # nothing to average: DDP's buckets and hooks would be pure overhead
            return model, make_optimizer(trainable_parameters(model))
        on_gpu = next(model.parameters()).is_cuda
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[self.local_rank] if on_gpu else None)
        if self.gradient_allreduce == "mpi":
            wrapped.register_comm_hook(self.gradient_comm, mpi_allreduce_hook)
        return wrapped, make_optimizer(trainable_parameters(model))

    def no_sync(self, model):
        return model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()

    def allreduce_sum(self, tensor):
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj, root=0):
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=root)
        return box[0]

    def barrier(self):
        torch.distributed.barrier()

    def shutdown(self):
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def cpu_allreduce() -> str:
    """What sums DDP's gradients on CPU: HPCDL_TORCH_CPU_ALLREDUCE (mpi, the default, or gloo: for comparison)."""
    name = os.environ.get("HPCDL_TORCH_CPU_ALLREDUCE", "mpi")
    if name not in TORCH_CPU_ALLREDUCE_NAMES:
        raise ValueError(f"HPCDL_TORCH_CPU_ALLREDUCE={name!r}: choose one of {', '.join(TORCH_CPU_ALLREDUCE_NAMES)}")
    return name


def mpi_allreduce_hook(comm, bucket):  # unannotated: DDP rejects annotations that are strings
    """A DDP comm hook (DistributedDataParallel.register_comm_hook) that averages a CPU gradient bucket with one
    in-place MPI_Allreduce, the same sum-then-divide as DDP's default allreduce hook. DDP launches the buckets in
    the same order on every rank, so the blocking collectives on `comm` (the hook's state) match; returns a
    completed Future[Tensor]."""
    from mpi4py import MPI

    buffer = bucket.buffer()
    comm.Allreduce(MPI.IN_PLACE, buffer.numpy(), op=MPI.SUM)
    buffer.div_(comm.Get_size())
    future = torch.futures.Future()
    future.set_result(buffer)
    return future


class KeepLayout:
    """A Horovod compression that lets gradients of any memory layout through. Horovod's allreduce takes only
    contiguous tensors, and the gradients of channels-last weights are channels-last (PyTorch gives a gradient its
    parameter's strides): those go through a contiguous copy and are written back into the gradient itself, so the
    optimizer sees the layout it expects. Contiguous gradients pass untouched. Wraps Horovod's none or fp16."""

    def __init__(self, inner):
        self.inner = inner

    def compress(self, tensor):
        if tensor.is_contiguous():
            compressed, context = self.inner.compress(tensor)
            return compressed, (None, context)
        compressed, context = self.inner.compress(tensor.contiguous())
        return compressed, (tensor, context)

    def decompress(self, tensor, context):
        original, inner_context = context
        result = self.inner.decompress(tensor, inner_context)
        return result if original is None else original.copy_(result)


class HorovodBackend(Backend):
    name = "horovod"

    def __init__(self, compression: str = "none"):
        import horovod.torch as hvd

        set_cpu_mpi_defaults()
        if not torch.cuda.is_available():  # read by hvd.init(); MPI, initialised first, gives the world's size
            several = mpi_comm().Get_size() > 1  # (Horovod then uses that MPI as it is)
            os.environ.setdefault("HOROVOD_CYCLE_TIME", CPU_HOROVOD_CYCLE_TIME_MS if several else CPU_SINGLE_RANK_HOROVOD_CYCLE_TIME_MS)
        self.hvd = hvd
        hvd.init()
        self.rank, self.size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        self.compression = KeepLayout(hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none)
        if self.size > 1:
            self.gradient_allreduce = f"horovod, HOROVOD_CYCLE_TIME={os.environ.get('HOROVOD_CYCLE_TIME', '1')} ms"

    def wrap(self, model, make_optimizer, grad_accum_steps):
        # Horovod hooks the parameters' gradient accumulators and offers no way to unhook them, so a second
        # phase on the same module (fine-tuning: frozen, then unfrozen) would allreduce every gradient twice.
        # Each phase therefore trains its own copy of the module, with the optimizer rebuilt on the copy.
        model = copy.deepcopy(model)
        if self.size == 1:  # nothing to average: the per-parameter hooks and the background allreduce are overhead
            return model, make_optimizer(trainable_parameters(model))
        optimizer = self.hvd.DistributedOptimizer(
            make_optimizer(trainable_parameters(model)),
            named_parameters=[(name, p) for name, p in model.named_parameters() if p.requires_grad],
            compression=self.compression,
            backward_passes_per_step=grad_accum_steps,
        )
        return model, optimizer

    def step(self, optimizer, scaler=None):
        if scaler is None or self.size == 1:  # (a plain optimizer at world size 1: see wrap)
            super().step(optimizer, scaler)
            return
        # Horovod's own recipe for mixed precision (examples/pytorch): the allreduce launched during backward
        # must finish before the scaler reads the gradients. scaler.step alone would unscale (and test for
        # overflow) the local gradients while their allreduce is still in flight, then step on the averaged,
        # still-scaled result; and one rank could skip a step that another takes.
        optimizer.synchronize()
        scaler.unscale_(optimizer)
        with optimizer.skip_synchronize():
            scaler.step(optimizer)
        scaler.update()

    def sync_initial_state(self, model, optimizer, resumed):
        """Rank 0's weights to every rank (Horovod's broadcast_parameters, through contiguous copies: Horovod's
        collectives take only contiguous tensors, and channels-last weights are not). The optimizer state needs no
        broadcast: a resumed phase loads the same checkpoint on every rank (broadcast as an object by the stage),
        and a fresh one has none (Horovod's broadcast_optimizer_state would also initialise an empty state with a
        zero-gradient step, which applies weight decay once and seeds momentum unlike a plain first step)."""
        if self.size == 1:
            return
        pending = []
        for name, tensor in model.state_dict().items():
            buffer = tensor if tensor.is_contiguous() else tensor.contiguous()
            pending.append((tensor, buffer, self.hvd.broadcast_async_(buffer, root_rank=0, name=f"hpcdl.initial.{name}")))
        for tensor, buffer, handle in pending:
            self.hvd.synchronize(handle)
            if buffer is not tensor:
                tensor.copy_(buffer)

    # One rank: the sum is the tensor and the broadcast the object itself, without waiting for Horovod's next
    # background cycle (5 ms on CPU at this size: CPU_SINGLE_RANK_HOROVOD_CYCLE_TIME_MS).
    def allreduce_sum(self, tensor):
        return tensor if self.size == 1 else self.hvd.allreduce(tensor, op=self.hvd.Sum)

    def broadcast_object(self, obj, root=0):
        if self.size == 1:
            return obj
        # Horovod names the collective after type(obj) unless told: rank 0 sending a checkpoint dict while
        # the others pass None would then never match (a silent stall). One fixed name: calls are sequential.
        return self.hvd.broadcast_object(obj, root_rank=root, name="hpcdl.broadcast_object")

    def barrier(self):
        if self.size > 1:
            self.hvd.barrier()

    def shutdown(self):
        self.hvd.shutdown()


def make_backend(name: str, *, compression: str = "none") -> Backend:
    if name == "torch":
        return TorchBackend()
    if name == "horovod":
        return HorovodBackend(compression=compression)
    raise ValueError(f"train.backend: unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


def trainable_parameters(model: nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (for eval, checkpoints and MLflow)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _shared_split_type():
    from mpi4py import MPI

    return MPI.COMM_TYPE_SHARED


def _rendezvous_address() -> tuple[str, int]:
    """Rank 0's host and a port free on it, for torch.distributed's TCP store. Found on rank 0's own node and sent
    to the others over MPI; its host name must resolve on every node (true of cluster node names; set
    HPCDL_MASTER_ADDR to an address when it does not, e.g. to pick the fast network's name)."""
    host = os.environ.get("HPCDL_MASTER_ADDR") or socket.gethostname()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return host, sock.getsockname()[1]
