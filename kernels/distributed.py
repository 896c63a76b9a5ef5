"""The one place dualvar talks to torch.distributed: rank/world queries and the row gathers.

Everything else (the kernels, the objectives, the trainer) calls these, so a single process without a
process group and a DDP run go through the same code (see docs/method.md §4).

    gather_rows(x)                        differentiable all_gather of (B, ...) rows in rank order;
                                          backward sums every rank's gradient of this rank's rows
                                          (gradient-exact, §4(a))
    gather_rows(x, local_grad_only=True)  backward keeps only this rank's own slice (the reference
                                          code's GatherLayer, §4(b))
    all_gather_no_grad(x)                 the same gather without autograd (MoCo queue keys, metrics)
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def _gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherRows(torch.autograd.Function):
    """all_gather along rows (rank order). Backward: all_reduce of the gathered gradient, then this
    rank's slice (each rank's gradient of our rows summed); with local_grad_only, no all_reduce."""

    @staticmethod
    def forward(ctx, x, local_grad_only):
        ctx.rank, ctx.rows, ctx.local_only = rank(), x.shape[0], local_grad_only
        return _gather(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if not ctx.local_only:
            dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def _check_rows(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor with a row dimension, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def gather_rows(x: torch.Tensor, *, local_grad_only: bool = False) -> torch.Tensor:
    """Differentiable all_gather of (B, ...) tensors from every rank, concatenated in rank order.

    Every rank must pass the same shape. Without a process group (or with one process) returns x itself.
    Backward: each rank's gradient of this rank's rows, summed (exact), or with local_grad_only=True
    only this rank's own (the reference's GatherLayer).
    """
    _check_rows(x)
    if world_size() == 1:
        return x
    return _GatherRows.apply(x, local_grad_only)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """all_gather of (B, ...) tensors from every rank in rank order, detached (x.detach() alone without
    a process group)."""
    _check_rows(x)
    if world_size() == 1:
        return x.detach()
    return _gather(x.detach())
