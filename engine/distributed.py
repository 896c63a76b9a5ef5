"""Multi-process training through PyTorch's own stack: torchrun sets the environment, this module joins the
process group (NCCL on GPU, gloo on CPU), and everything else in dualvar.engine asks it (never
torch.distributed directly) for its rank, for a barrier, or for a collective.

    ctx = init_from_env("auto")         # torchrun: joins the group; plain `python`: a single process
    ctx.rank, ctx.world_size, ctx.is_main, ctx.device
    print0("only rank 0 prints this")
    model = wrap_ddp(framework, ctx.device)
    ...
    teardown()

Launch (docs/architecture.md, README "Multi-GPU and multi-node"):

    torchrun --nproc_per_node=8 -m dualvar.engine.cli pretrain --config ucf101_r21d_simclr_dualvar
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id RUN \
        -m dualvar.engine.cli pretrain --config ...

A process started without torchrun (no WORLD_SIZE/RANK in its environment) is a single process: no group is
created and every helper here acts as the identity (rank 0 of 1), so the single-process run is unchanged.

The row gathers of the losses live in dualvar.kernels.distributed and are re-exported here
(`gather_rows`: gradient-exact, docs/method.md §4(a), or with local_grad_only=True the reference's
GatherLayer, §4(b); `all_gather_no_grad`). `BatchShuffle` is MoCo's batch-shuffle BatchNorm for the key
encoder (the framework's `key_shuffle` hook).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from dualvar.kernels.distributed import all_gather_no_grad, gather_rows, is_distributed, rank, world_size

__all__ = ["DistContext", "init_from_env", "launched_by_torchrun", "is_distributed", "rank", "world_size",
           "local_rank", "is_main", "print0", "barrier", "teardown", "all_reduce", "all_gather_object",
           "broadcast_object", "record", "wrap_ddp", "unwrap", "no_sync", "convert_sync_batchnorm", "BatchShuffle",
           "gather_rows", "all_gather_no_grad", "TIMEOUT_ENV"]

TIMEOUT_ENV = "DUALVAR_DIST_TIMEOUT_S"  # collective timeout in seconds (default 1800)


@dataclasses.dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank, world size, local rank (the GPU index on its node), the
    device it trains on and the process-group backend ("nccl", "gloo"; None for a single process)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the environment names a rank and a world size (torchrun, or any env:// launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank() -> int:
    """LOCAL_RANK from the environment (0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer (set by torchrun), got {raw!r}") from None


def init_from_env(device: str = "auto", *, timeout_s: Optional[float] = None) -> DistContext:
    """Join the process group that torchrun describes in the environment, or stay a single process.

    Args:
        device: the config's train.device: "auto" (a GPU when there is one, else the CPU), "cpu", "cuda"
            or "cuda:N". Under torchrun each process takes GPU LOCAL_RANK ("cuda:N" is refused there: the
            launcher, not the config, places processes on devices).
        timeout_s: how long a collective may wait for the other ranks before the job fails (default:
            $DUALVAR_DIST_TIMEOUT_S or 1800 s). torchrun ends the whole job as soon as one rank exits with
            an error, so the timeout only matters for a rank that hangs without exiting.
    Returns:
        the DistContext; with WORLD_SIZE > 1 the default process group is initialised (NCCL for CUDA
        devices, gloo for the CPU), with WORLD_SIZE = 1 or without torchrun none is.
    """
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not launched_by_torchrun():
        return DistContext(device=_single_device(device))
    world, rk, local = _env_int("WORLD_SIZE"), _env_int("RANK"), local_rank()
    if not (world >= 1 and 0 <= rk < world):
        raise ValueError(f"RANK={rk} and WORLD_SIZE={world} from the environment are inconsistent")
    if device.startswith("cuda:") and world > 1:
        raise ValueError(f"train.device is {device!r}, but under torchrun every process uses GPU LOCAL_RANK: "
                         "set train.device to auto or cuda")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"train.device is {device!r} but torch sees no CUDA device")
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible: "
                             "--nproc_per_node must not exceed the GPUs of a node")
        dev = torch.device("cuda", local if world > 1 else (torch.cuda.current_device() if device == "auto"
                                                             else torch.device(device).index or 0))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world == 1:
        return DistContext(rank=0, world_size=1, local_rank=local, device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, "1800"))
    if not is_distributed():
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=dev,
                       backend=backend)


def _single_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {device!r} but torch sees no CUDA device")
    return dev


def record(fn: Callable) -> Callable:
    """torch.distributed.elastic's @record: an uncaught error of a process started by torchrun is written
    where torchrun reads it, so the job's failure summary names the rank and shows its error."""
    from torch.distributed.elastic.multiprocessing.errors import record as _record
    return _record(fn)


def is_main() -> bool:
    """Rank 0 (also the single process)."""
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only (flushed)."""
    if is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def barrier() -> None:
    """Wait for every rank (a no-op for a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def teardown() -> None:
    """Leave the process group (a no-op when there is none)."""
    if is_distributed():
        dist.destroy_process_group()


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Out-of-place all_reduce ("sum", "mean", "max", "min") of a tensor on any device (NCCL: moved to this
    rank's GPU and back); x itself without a process group."""
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be one of {tuple(ops)}, got {op!r}")
    if world_size() == 1:
        return x
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    y = x.detach().to(comm, copy=True)
    dist.all_reduce(y, ops[op])
    y = y.to(x.device)
    return y / world_size() if op == "mean" else y


def all_gather_object(obj: Any) -> list:
    """Every rank's picklable `obj`, in rank order ([obj] for a single process)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------- models
def wrap_ddp(module: nn.Module, device: torch.device, **kwargs) -> nn.Module:
    """DistributedDataParallel around `module` (gradients averaged over ranks on backward; parameters and
    buffers broadcast from rank 0 when it is built), or `module` itself for a single process."""
    if world_size() == 1:
        return module
    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, **kwargs)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the module itself otherwise)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def no_sync(module: nn.Module):
    """DDP's no_sync() (backward accumulates locally, no all-reduce), or a null context."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm of `module` as SyncBatchNorm (statistics over every rank's batch). PyTorch implements
    SyncBatchNorm for GPUs only: on a CPU run this raises, naming the option."""
    if world_size() > 1:
        dev = next((p.device for p in module.parameters()), torch.device("cpu"))
        if dev.type == "cpu":
            raise ValueError("SyncBatchNorm needs GPUs (PyTorch has no CPU implementation); turn train.sync_bn "
                             "off (and use model.key_bn=shuffle for MoCo) on a CPU run")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


class BatchShuffle:
    """MoCo's batch-shuffle BatchNorm for the key encoder (docs/method.md §4, §8.8), as a `key_shuffle` hook.

    shuffled, restore = BatchShuffle(generator)(x): x (n, ...) is this rank's key-view batch; every rank's
    batch is gathered (rank order), a random permutation of the W*n rows is drawn (the same on every rank:
    `generator` must be seeded identically on every rank and is advanced identically), this rank keeps its
    n rows of the permuted batch, so each rank's key BatchNorm sees a random mix of every rank's clips
    rather than the clips its queries come from. restore(h) gathers the key features and returns this
    rank's original rows, in order. A single process returns (x, None): the batch statistics of a whole
    batch do not depend on its order.
    """

    def __init__(self, generator: torch.Generator):
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[Callable[[torch.Tensor], torch.Tensor]]]:
        W = world_size()
        if W == 1:
            return x, None
        n, r = x.shape[0], rank()  # every rank has n rows (the trainer's per-rank batches are equal)
        x_all = all_gather_no_grad(x)
        order = torch.randperm(W * n, generator=self.generator, device=self.generator.device).to(x.device)
        inverse = torch.argsort(order)
        mine = order.view(W, n)[r]

        def restore(h: torch.Tensor) -> torch.Tensor:
            return all_gather_no_grad(h)[inverse.view(W, n)[r]]

        return x_all[mine], restore

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

