"""Contrastive losses: SimCLR's NT-Xent and MoCo's InfoNCE, never materialising rows x columns.

Both losses reduce to one fused primitive, the masked row log-sum-exp of temperature-scaled
similarities,

    lse[a] = log sum_{b != a + offset} exp(q[a] . k[b] / tau)        (fp32 per row)

plus a positive logit that is a single dot product per row (computed in torch, autograd-aware).
The primitive's backward recomputes the similarity tiles from the saved lse:

    P[a, b] = exp(q[a] . k[b] / tau - lse[a])   (0 where masked)
    dq = (g * P) k / tau,    dk = (g * P)^T q / tau,       g = dL/dlse (per row)

Layout of this file: references -> chunked torch primitive -> autograd functions -> distributed
gather -> public losses. Compiled (cpu, cuda) and Triton primitives plug into `_LSE_IMPLS`.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._dispatch import select
from ._ext import load_triton


# ----------------------------------------------------------------------------------- references
def nt_xent_loss_reference(z: torch.Tensor, temperature: float = 0.07, *, n_views: int = 2) -> torch.Tensor:
    """Naive NT-Xent on the full similarity matrix (METHOD.md 3.1; multi-view: mean over positives).

    z: (n_views * N, D), view-major (row v*N + i is view v of clip i). Returns the mean over rows of
    lse_{b != a}(z_a . z_b / tau) - mean_{p in pos(a)} z_a . z_p / tau.
    """
    M = z.shape[0]
    N = M // n_views
    sim = z @ z.t() / temperature
    eye = torch.eye(M, dtype=torch.bool, device=z.device)
    lse = sim.masked_fill(eye, float("-inf")).logsumexp(dim=1)
    clip = torch.arange(M, device=z.device) % N
    pos_mask = (clip.view(-1, 1) == clip.view(1, -1)) & ~eye
    pos = (sim * pos_mask).sum(dim=1) / (n_views - 1)
    return (lse - pos).mean()


def info_nce_loss_reference(q: torch.Tensor, k: torch.Tensor, queue: Optional[torch.Tensor] = None,
                            temperature: float = 0.07) -> torch.Tensor:
    """Naive MoCo InfoNCE: logits [q_i . k_i, q_i . negatives] / tau, cross-entropy with target 0.

    Negatives are the queue (K, D) when given (no gradient), else the other rows of k.
    """
    if queue is not None:
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.detach().t()], dim=1) / temperature
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    else:
        logits = q @ k.t() / temperature
        target = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, target)


# ------------------------------------------------------------------- the primitive: torch backend
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (for gradcheck), everything else runs in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_rows(n_cols: int, budget: int = 1 << 24) -> int:
    """Rows per chunk so that a chunk x n_cols fp32 tile stays near `budget` elements."""
    return max(1, min(4096, budget // max(1, n_cols)))


def _lse_torch_forward(q, k, tau, offset):
    R, C = q.shape[0], k.shape[0]
    acc = _acc_dtype(q)
    lse = torch.empty(R, dtype=acc, device=q.device)
    kf = k.to(acc)
    step = _chunk_rows(C)
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        s = q[r0:r1].to(acc) @ kf.t()
        s.mul_(1.0 / tau)
        if offset is not None:
            rows = torch.arange(r0, r1, device=q.device)
            cols = rows + offset
            ok = (cols >= 0) & (cols < C)
            s[(rows - r0)[ok], cols[ok]] = float("-inf")
        lse[r0:r1] = s.logsumexp(dim=1)
    return lse


def _lse_torch_backward(q, k, tau, offset, lse, grad, need_q, need_k):
    R, C = q.shape[0], k.shape[0]
    acc = lse.dtype
    kf = k.to(acc)
    dq = torch.empty(q.shape, dtype=acc, device=q.device) if need_q else None
    dk = torch.zeros(k.shape, dtype=acc, device=k.device) if need_k else None
    step = _chunk_rows(C)
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        qf = q[r0:r1].to(acc)
        p = (qf @ kf.t()).mul_(1.0 / tau).sub_(lse[r0:r1, None]).exp_()
        if offset is not None:
            rows = torch.arange(r0, r1, device=q.device)
            cols = rows + offset
            ok = (cols >= 0) & (cols < C)
            p[(rows - r0)[ok], cols[ok]] = 0.0
        p.mul_(grad[r0:r1, None] / tau)
        if need_q:
            dq[r0:r1] = p @ kf
        if need_k:
            dk.addmm_(p.t(), qf)
    return dq, dk


def _lse_compiled_forward(q, k, tau, offset):
    return torch.ops.dualvar.lse_fwd(q, k, tau, offset)


def _lse_compiled_backward(q, k, tau, offset, lse, grad, need_q, need_k):
    dq, dk = torch.ops.dualvar.lse_bwd(q, k, lse, grad, tau, offset, need_q, need_k)
    return (dq if need_q else None), (dk if need_k else None)


def _lse_compiled_backward_sym(z, tau, lse, grad):
    return torch.ops.dualvar.lse_bwd_sym(z, lse, grad, tau)


class _LseImpl(NamedTuple):
    forward: Callable        # (q, k, tau, offset) -> lse
    backward: Callable       # (q, k, tau, offset, lse, grad, need_q, need_k) -> (dq | None, dk | None)
    backward_sym: Optional[Callable] = None  # (z, tau, lse, grad) -> dz, for q = k = z with self excluded


_LSE_IMPLS: dict[str, _LseImpl] = {
    "torch": _LseImpl(_lse_torch_forward, _lse_torch_backward),
    "cpu": _LseImpl(_lse_compiled_forward, _lse_compiled_backward, _lse_compiled_backward_sym),
    "cuda": _LseImpl(_lse_compiled_forward, _lse_compiled_backward, _lse_compiled_backward_sym),
}
if load_triton()[0] is not None:
    from . import contrastive_triton as _tri

    _LSE_IMPLS["triton"] = _LseImpl(_tri.lse_forward, _tri.lse_backward, _tri.lse_backward_sym)


class _MaskedLSE(torch.autograd.Function):
    """lse[a] = logsumexp_{b != a + offset}(q[a] . k[b] / tau); q is k allowed (self similarity)."""

    @staticmethod
    def forward(ctx, q, k, tau, offset, backend):
        lse = _LSE_IMPLS[backend].forward(q, k, tau, offset)
        ctx.save_for_backward(q, k, lse)
        ctx.tau, ctx.offset, ctx.backend, ctx.same = tau, offset, backend, q is k
        return lse

    @staticmethod
    def backward(ctx, grad):
        q, k, lse = ctx.saved_tensors
        impl = _LSE_IMPLS[ctx.backend]
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad.to(lse.dtype).contiguous()
        if ctx.same and ctx.offset == 0 and need_q and need_k and impl.backward_sym is not None:
            # q and k are one tensor: one pass over the upper-triangle tiles gives the whole gradient.
            return impl.backward_sym(q, ctx.tau, lse, grad).to(q.dtype), None, None, None, None
        dq, dk = impl.backward(q, k, ctx.tau, ctx.offset, lse, grad, need_q, need_k)
        dq = dq.to(q.dtype) if dq is not None else None
        dk = dk.to(k.dtype) if dk is not None else None
        return dq, dk, None, None, None


def masked_lse(q: torch.Tensor, k: torch.Tensor, temperature: float, exclude_offset: Optional[int] = None, *,
               backend: str = "auto") -> torch.Tensor:
    """Row log-sum-exp of q k^T / temperature, column a + exclude_offset left out of row a.

    q: (R, D), k: (C, D), same dtype and device. Returns fp32 (R,). Differentiable in q and k.
    """
    def veto(b: str) -> Optional[str]:
        if b in ("triton", "cuda") and q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the {b} kernels take float32/float16/bfloat16, got {q.dtype}"
        if b == "triton" and q.shape[1] > 1024:
            return f"the triton kernels support embedding dims up to 1024, got {q.shape[1]}"
        return None

    if k.dtype != q.dtype or k.device != q.device or k.shape[1] != q.shape[1]:
        raise ValueError(f"rows {tuple(q.shape)} {q.dtype} {q.device} and columns {tuple(k.shape)} {k.dtype} "
                         f"{k.device} must share dim, dtype and device")
    chosen = select("contrastive", _LSE_IMPLS, q.device, backend, veto)
    return _MaskedLSE.apply(q, k, float(temperature), exclude_offset, chosen)


# ---------------------------------------------------------------------------------- validation
def _check_features(name: str, x: torch.Tensor, check_finite: bool) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (rows, dim), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or Inf values (pass check_finite=False to let them propagate)")


def _check_temperature(t: float) -> None:
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive finite number, got {t!r}")


# ------------------------------------------------------------------------- distributed gather
class _GatherRows(torch.autograd.Function):
    """all_gather along rows (rank order). Backward sums every rank's gradient for this rank's rows
    (exact global-batch gradient, METHOD.md 4(a)); with local_grad_only, keeps only this rank's own
    slice (the reference's GatherLayer, 4(b))."""

    @staticmethod
    def forward(ctx, x, local_grad_only):
        import torch.distributed as dist
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows, ctx.local_only = dist.get_rank(), x.shape[0], local_grad_only
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous()
        if not ctx.local_only:
            dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def gather_rows(x: torch.Tensor, *, local_grad_only: bool = False) -> torch.Tensor:
    """Differentiable all_gather of (B, ...) tensors from every rank (all ranks must pass equal B)."""
    return _GatherRows.apply(x, local_grad_only)


def _rank_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
    return dist.get_rank(), dist.get_world_size()


# ------------------------------------------------------------------------------- public losses
def nt_xent_loss(z: torch.Tensor, temperature: float = 0.07, *, n_views: int = 2, distributed: bool = False,
                 reference_ddp: bool = False, check_finite: bool = True, backend: str = "auto") -> torch.Tensor:
    """SimCLR NT-Xent over view-major embeddings, fused (no rows x columns matrix is kept).

    Args:
        z: (n_views * N, D), row v*N + i is view v of clip i. Not re-normalised here.
        temperature: tau > 0.
        n_views: views per clip (>= 2); with more than 2 the positive term is the mean over the
            other views.
        distributed: z holds this rank's clips; rows are local, columns are every rank's rows
            (all-gathered). Returns the mean over local rows; with DDP's gradient averaging the
            parameter gradient equals the single-process gradient of the global batch.
        reference_ddp: with distributed, drop gradients that other ranks send to this rank's rows
            as columns (the reference GatherLayer; METHOD.md 4(b)).
        check_finite: raise on NaN/Inf input (one device sync); False lets them propagate.
        backend: "auto", "triton", "cuda", "cpu" or "torch".
    Returns:
        scalar loss (float32, or z's dtype if float64).
    """
    _check_features("z", z, check_finite)
    _check_temperature(temperature)
    if n_views < 2 or z.shape[0] % n_views:
        raise ValueError(f"z has {z.shape[0]} rows, which is not n_views={n_views} (>= 2) views of N clips")
    N = z.shape[0] // n_views
    # The positive logit in the accumulation dtype, like the kernels' lse: in 16 bits the two would not
    # cancel where they should (a row whose only other column is its positive has loss exactly 0).
    zv = z.to(_acc_dtype(z)).view(n_views, N, -1)
    others = (zv.sum(0, keepdim=True) - zv) / (n_views - 1)
    pos = (zv * others).sum(-1).reshape(-1) / temperature
    rank, world = _rank_world(distributed)
    if world > 1:
        cols = gather_rows(z, local_grad_only=reference_ddp)
        lse = masked_lse(z, cols, temperature, rank * z.shape[0], backend=backend)
    else:
        lse = masked_lse(z, z, temperature, 0, backend=backend)
    loss = (lse - pos).mean()
    return loss.to(z.dtype) if z.dtype == torch.float64 else loss


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: Optional[torch.Tensor] = None,
                  temperature: float = 0.07, *, check_finite: bool = True, backend: str = "auto") -> torch.Tensor:
    """MoCo InfoNCE, fused. Row i's positive is k[i]; negatives are `queue` (K, D) when given
    (no gradient ever flows to it), else the other rows of k.

    q, k: (B, D). Gradient flows to q, and to k when it requires grad. Returns the mean over rows.
    """
    _check_features("q", q, check_finite)
    _check_features("k", k, check_finite)
    _check_temperature(temperature)
    if k.shape != q.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    pos = (q.to(_acc_dtype(q)) * k.to(_acc_dtype(q))).sum(-1) / temperature
    if queue is not None:
        _check_features("queue", queue, check_finite)
        if queue.shape[1] != q.shape[1]:
            raise ValueError(f"queue has dim {queue.shape[1]} but q has dim {q.shape[1]} (queue must be (K, D))")
        lse_neg = masked_lse(q, queue.detach(), temperature, None, backend=backend)
        lse = torch.logaddexp(lse_neg, pos)
    else:
        lse = masked_lse(q, k, temperature, None, backend=backend)
    loss = (lse - pos).mean()
    return loss.to(q.dtype) if q.dtype == torch.float64 else loss
