"""Contrastive losses: SimCLR's NT-Xent and MoCo's InfoNCE, never materialising rows x columns.

Both losses reduce to one fused primitive, the masked row log-sum-exp of temperature-scaled
similarities (docs/method.md §9),

    lse[a] = log sum_{b != a + offset} exp(q[a] . k[b] / tau)        (fp32 per row)

plus a positive logit that is a single dot product per row (computed in torch, autograd-aware).
The primitive's backward recomputes the similarity tiles from the saved lse:

    P[a, b] = exp(q[a] . k[b] / tau - lse[a])   (0 where masked)
    dq = (g * P) k / tau,    dk = (g * P)^T q / tau,       g = dL/dlse (per row)

Layout of this file: references -> input checks -> torch backend (chunked) -> compiled launchers
(csrc/: contrastive_fwd, contrastive_bwd, contrastive_bwd_sym) -> autograd function -> public
losses. The Triton kernels and their launchers are in contrastive_triton.py. The op's name, for
`last_backend` and the dispatcher, is "contrastive".
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from . import distributed as dist_utils
from ._dispatch import OpImpl, impl_table, once_differentiable, select, triton_impl
from ._ext import compiled_op_reason, register_fakes

OP = "contrastive"
COMPILED_OPS = ("contrastive_fwd", "contrastive_bwd", "contrastive_bwd_sym")
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------- references
def nt_xent_loss_reference(z: torch.Tensor, temperature: float = 0.07, *, n_views: int = 2) -> torch.Tensor:
    """Naive NT-Xent on the full similarity matrix (docs/method.md §3.1; multi-view: mean over positives).

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


# ---------------------------------------------------------------------------------- input checks
def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_features(name: str, x, check_finite: bool, like: Optional[torch.Tensor] = None,
                    like_name: str = "") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (rows, dim), got {_shape(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if like is not None:
        if x.dtype != like.dtype:
            raise TypeError(f"{name} is {x.dtype} but {like_name} is {like.dtype}: they must share a dtype")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}")
        if x.shape[1] != like.shape[1]:
            raise ValueError(f"{name} has dim {x.shape[1]} but {like_name} has dim {like.shape[1]} "
                             f"({name} must be (rows, {like.shape[1]}))")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or Inf values (pass check_finite=False to let them propagate)")


def _temperature(t) -> float:
    """temperature as a Python float; a tensor that requires grad is refused (its gradient would be lost)."""
    if isinstance(t, torch.Tensor):
        if t.requires_grad:
            raise ValueError("temperature is a tensor that requires grad: a learnable temperature is not supported "
                             "(it would get no gradient); pass a number or temperature.detach()")
        if t.numel() != 1 or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"temperature must be a positive finite number, got a {t.dtype} tensor of shape "
                            f"{tuple(t.shape)}")
        t = t.item()
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"temperature must be a positive finite number, got {type(t).__name__} {t!r}")
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive finite number, got {t!r}")
    return float(t)


def _check_flag(name: str, v) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {type(v).__name__} {v!r}")


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (for gradcheck), everything else runs in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------- torch backend (chunked)
def _chunk_rows(n_cols: int, budget: int = 1 << 24) -> int:
    """Rows per chunk so that a chunk x n_cols fp32 tile stays near `budget` elements."""
    return max(1, min(4096, budget // max(1, n_cols)))


def _exclude(s: torch.Tensor, r0: int, r1: int, offset: Optional[int], n_cols: int, value: float) -> None:
    """Set s[a - r0, a + offset] = value for the rows a in [r0, r1) whose excluded column exists."""
    if offset is None:
        return
    rows = torch.arange(r0, r1, device=s.device)
    cols = rows + offset
    ok = (cols >= 0) & (cols < n_cols)
    s[(rows - r0)[ok], cols[ok]] = value


def _torch_forward(q, k, tau, offset):
    R, C = q.shape[0], k.shape[0]
    acc = _acc_dtype(q)
    lse = torch.empty(R, dtype=acc, device=q.device)
    kf = k.to(acc)
    step = _chunk_rows(C)
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        s = (q[r0:r1].to(acc) @ kf.t()).mul_(1.0 / tau)
        _exclude(s, r0, r1, offset, C, float("-inf"))
        lse[r0:r1] = s.logsumexp(dim=1)
    return lse


def _torch_backward(q, k, tau, offset, lse, grad, need_q, need_k):
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
        _exclude(p, r0, r1, offset, C, 0.0)
        p.mul_(grad[r0:r1, None] / tau)
        if need_q:
            dq[r0:r1] = p @ kf
        if need_k:
            dk.addmm_(p.t(), qf)
    return dq, dk


# --------------------------------------------------------------------- compiled launchers (C++/CUDA)
def _compiled_forward(q, k, tau, offset):
    return torch.ops.dualvar.contrastive_fwd(q, k, tau, offset)


def _compiled_backward(q, k, tau, offset, lse, grad, need_q, need_k):
    if q is k and offset == 0 and need_q and need_k:
        # q and k are one tensor: one pass over the upper-triangle tiles gives its whole gradient.
        return torch.ops.dualvar.contrastive_bwd_sym(q, lse, grad, tau), None
    dq, dk = torch.ops.dualvar.contrastive_bwd(q, k, lse, grad, tau, offset, need_q, need_k)
    return (dq if need_q else None), (dk if need_k else None)


def _fake_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


register_fakes({
    "contrastive_fwd": lambda q, k, temperature, exclude_offset: q.new_empty((q.shape[0],), dtype=_fake_dtype(q)),
    "contrastive_bwd": lambda q, k, lse, grad, temperature, exclude_offset, need_q, need_k: (
        q.new_empty(q.shape, dtype=_fake_dtype(q)), k.new_empty(k.shape, dtype=_fake_dtype(k))),
    "contrastive_bwd_sym": lambda z, lse, grad, temperature: z.new_empty(z.shape, dtype=_fake_dtype(z)),
})

# Every backend: forward(q, k, tau, offset) -> lse (R,) in the accumulation dtype;
# backward(q, k, tau, offset, lse, grad, need_q, need_k) -> (dq | None, dk | None). When q is k (one
# tensor, offset 0) a backend may return that tensor's whole gradient as dq and None as dk.
_IMPLS: dict[str, OpImpl] = impl_table(OpImpl(_torch_forward, _torch_backward),
                                        OpImpl(_compiled_forward, _compiled_backward),
                                        triton_impl("contrastive_triton"))


# ---------------------------------------------------------------------------- autograd function
class _MaskedLSE(torch.autograd.Function):
    """lse[a] = logsumexp_{b != a + offset}(q[a] . k[b] / tau); q is k allowed (self similarity).
    Differentiable once: the backward is a fused kernel (a second-order gradient raises)."""

    @staticmethod
    def forward(ctx, q, k, tau, offset, backend):
        lse = _IMPLS[backend].forward(q, k, tau, offset)
        ctx.same = q is k
        ctx.save_for_backward(q, lse) if ctx.same else ctx.save_for_backward(q, k, lse)
        ctx.tau, ctx.offset, ctx.backend = tau, offset, backend
        return lse

    @staticmethod
    @once_differentiable("contrastive (nt_xent_loss, info_nce_loss)")
    def backward(ctx, grad):
        if ctx.same:
            q, lse = ctx.saved_tensors
            k = q
        else:
            q, k, lse = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad.to(lse.dtype).contiguous()
        dq, dk = _IMPLS[ctx.backend].backward(q, k, ctx.tau, ctx.offset, lse, grad, need_q, need_k)
        dq = dq.to(q.dtype) if dq is not None else None
        dk = dk.to(k.dtype) if dk is not None else None
        return dq, dk, None, None, None


def _veto(q: torch.Tensor):
    def veto(b: str) -> Optional[str]:
        if b in ("cpu", "cuda"):
            why = compiled_op_reason(*COMPILED_OPS)
            if why:
                return why
        if b in ("triton", "cuda") and q.dtype not in GPU_DTYPES:
            return f"the {b} kernels take float32/float16/bfloat16, got {q.dtype}"
        if b == "triton" and q.shape[1] > 1024:
            return f"the triton kernels support embedding dims up to 1024, got {q.shape[1]}"
        return None
    return veto


def _masked_lse(q, k, tau, offset, backend):
    chosen = select(OP, _IMPLS, q.device, backend, _veto(q))
    return _MaskedLSE.apply(q, k, tau, offset, chosen)


# ------------------------------------------------------------------------------- public functions
def masked_lse(q: torch.Tensor, k: torch.Tensor, temperature: float, exclude_offset: Optional[int] = None, *,
               backend: str = "auto") -> torch.Tensor:
    """Row log-sum-exp of q k^T / temperature, column a + exclude_offset left out of row a.

    q: (R, D), k: (C, D), same dtype and device. Returns (R,) in float32 (float64 for float64 input).
    Differentiable (once) in q and k.
    """
    _check_features("q", q, False)
    _check_features("k", k, False, like=q, like_name="q")
    tau = _temperature(temperature)
    if exclude_offset is not None and (isinstance(exclude_offset, bool) or not isinstance(exclude_offset, int)):
        raise TypeError(f"exclude_offset must be an int or None, got {type(exclude_offset).__name__}")
    return _masked_lse(q, k, tau, exclude_offset, backend)


def nt_xent_loss(z: torch.Tensor, temperature: float = 0.07, *, n_views: int = 2, distributed: bool = False,
                 reference_ddp: bool = False, check_finite: bool = True, backend: str = "auto") -> torch.Tensor:
    """SimCLR NT-Xent over view-major embeddings, fused (no rows x columns matrix is kept).

    Args:
        z: (n_views * N, D), row v*N + i is view v of clip i. Not re-normalised here.
        temperature: tau > 0, a number (or a tensor that does not require grad).
        n_views: views per clip (an int >= 2); with more than 2 the positive term is the mean over the
            other views.
        distributed: z holds this rank's clips; rows are local, columns are every rank's rows
            (all-gathered). Returns the mean over local rows; with DDP's gradient averaging the
            parameter gradient equals the single-process gradient of the global batch.
        reference_ddp: with distributed, drop gradients that other ranks send to this rank's rows
            as columns (the reference GatherLayer; docs/method.md §4(b)).
        check_finite: raise on NaN/Inf input (one device sync); False lets them propagate.
        backend: "auto", "triton", "cuda", "cpu" or "torch".
    Returns:
        scalar loss (float32, or z's dtype if float64). Differentiable once (no double backward).
    """
    _check_features("z", z, check_finite)
    tau = _temperature(temperature)
    if isinstance(n_views, bool) or not isinstance(n_views, int):
        raise TypeError(f"n_views must be an int >= 2, got {type(n_views).__name__} {n_views!r}")
    if n_views < 2 or z.shape[0] % n_views:
        raise ValueError(f"z has {z.shape[0]} rows, which is not n_views={n_views} (>= 2) views of N clips")
    for name, flag in (("distributed", distributed), ("reference_ddp", reference_ddp), ("check_finite", check_finite)):
        _check_flag(name, flag)
    if distributed and not dist_utils.is_distributed():
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
    N = z.shape[0] // n_views
    # The positive logit in the accumulation dtype, like the kernels' lse: in 16 bits the two would not
    # cancel where they should (a row whose only other column is its positive has loss exactly 0).
    zv = z.to(_acc_dtype(z)).view(n_views, N, -1)
    others = (zv.sum(0, keepdim=True) - zv) / (n_views - 1)
    pos = (zv * others).sum(-1).reshape(-1) / tau
    if distributed and dist_utils.world_size() > 1:
        cols = dist_utils.gather_rows(z, local_grad_only=reference_ddp)
        lse = _masked_lse(z, cols, tau, dist_utils.rank() * z.shape[0], backend)
    else:
        lse = _masked_lse(z, z, tau, 0, backend)
    loss = (lse - pos).mean()
    return loss.to(z.dtype) if z.dtype == torch.float64 else loss


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: Optional[torch.Tensor] = None,
                  temperature: float = 0.07, *, check_finite: bool = True, backend: str = "auto") -> torch.Tensor:
    """MoCo InfoNCE, fused. Row i's positive is k[i]; negatives are `queue` (K, D) when given
    (no gradient ever flows to it), else the other rows of k.

    q, k: (B, D), same dtype and device; queue: (K, D) of the same dtype and device. Gradient flows to
    q, and to k when it requires grad. Returns the mean over rows (float32, or float64 for float64
    input). Differentiable once (no double backward).
    """
    _check_features("q", q, check_finite)
    _check_features("k", k, check_finite, like=q, like_name="q")
    tau = _temperature(temperature)
    _check_flag("check_finite", check_finite)
    if k.shape != q.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    acc = _acc_dtype(q)
    pos = (q.to(acc) * k.to(acc)).sum(-1) / tau
    if queue is not None:
        _check_features("queue", queue, check_finite, like=q, like_name="q")
        lse_neg = _masked_lse(q, queue.detach(), tau, None, backend)
        lse = torch.logaddexp(lse_neg, pos)
    else:
        lse = _masked_lse(q, k, tau, None, backend)
    loss = (lse - pos).mean()
    return loss.to(q.dtype) if q.dtype == torch.float64 else loss
