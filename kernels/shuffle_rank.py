"""Shuffle-rank loss (docs/method.md §3.3; fused kernels §9.3): each series vector must be closer to its
counterpart in the other set than to any other series of the sample.

For one sample, X = [a_0..a_{s-1}; p_0..p_{s-1}] (2s rows, unit vectors), S = X X^T, c(i) the
counterpart of row i (i +- s), and for every j not in {i, c(i)}:

    x_ij = (S_ij - S_{i,c(i)}) / theta,     term_ij = softplus(min(x_ij, cap))

R = weight * mean over (b, i, j) of term_ij. P is the calibrated shuffled series: the shuffled
clip's chunk j describes original segment perm[b, j], so P[b, perm[b, j]] = normalize(shuffled[b, j]),
i.e. P[b, k] = normalize(shuffled[b, argsort(perm[b])[k]]).

How the fused backends compute it (one launch forward, one backward):
- The loss is a sum over all (row, negative) pairs, so the order of the P rows inside a sample does
  not matter, only which row is whose counterpart. The kernels keep the shuffled rows y_j in their
  stored order and fold the calibration into the counterpart relation: anchor row i and shuffled
  row j are counterparts iff perm[b, j] == i. No inverse permutation, scatter or copy is needed, and
  the gradient of y_j lands on row j directly.
- Per sample the raw Gram blocks A A^T, A Y^T, Y Y^T (and A2 A2^T, A2 Y^T for the second anchor)
  are accumulated over d; normalising the shuffled rows is a rescaling of Gram entries:
  S_AP = (A Y^T) / nu_j, S_PP = (Y Y^T) / (nu_j nu_k), nu = max(||y||, 1e-12).
- Backward (recomputes the Grams): H = dL/dS per block (H_ij = w sigma(x_ij)[x_ij <= cap] / (theta n)
  for negatives, H_{i,c(i)} = -sum of row i's negatives), dX = (H + H^T) X, and the normalisation
  backward dL/dy = (g - p (p.g)) / nu, so every gradient row is a (2s)-term linear combination of
  input rows, written once.
- The norms of the shuffled rows are scaled (y / max|y| first), so inputs whose squares overflow
  (fp32 near 1e30) give the float64 answer. NaN or inf in a sample's anchor or shuffled rows gives a
  NaN loss.

Two anchors (the SimCLR and MoCo objectives: R(u0, P) and R(u2, P)) share P's loads, norms and
P P^T in one call. Outputs: per-anchor weighted terms (differentiable, once) and ranking accuracy (the
fraction of the B*2s rows whose counterpart similarity is >= every negative's; no gradient).

Layout of this file: references -> input checks -> torch backend -> compiled launchers (csrc/:
shuffle_rank_fwd, shuffle_rank_bwd) -> autograd function -> public function. The Triton kernels and
their launchers are in shuffle_rank_triton.py. The op's name, for `last_backend` and the dispatcher,
is "shuffle_rank".
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._dispatch import OpImpl, impl_table, select, triton_impl
from ._ext import compiled_op_reason, register_fakes

OP = "shuffle_rank"
COMPILED_OPS = ("shuffle_rank_fwd", "shuffle_rank_bwd")
MAX_SERIES = 8
MAX_DIM = 512
EPS = 1e-12
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------- references
def _calibrate(shuffled: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Normalise each chunk and undo the segment permutation (a gather with the inverse perm)."""
    p = F.normalize(shuffled, dim=-1, eps=EPS)
    inv = perm.argsort(dim=1)
    return p.gather(1, inv.unsqueeze(-1).expand_as(p))


def _rank_scores(anchor: torch.Tensor, p: torch.Tensor):
    """(S (B, 2s, 2s), positives (B, 2s), negative mask (2s, 2s)) of X = [anchor; p]."""
    s = anchor.shape[1]
    x = torch.cat([anchor, p], dim=1)  # (B, 2s, d)
    S = x @ x.transpose(1, 2)
    idx = torch.arange(2 * s, device=x.device)
    counterpart = (idx + s) % (2 * s)
    pos = S[:, idx, counterpart]
    neg_mask = (idx.view(-1, 1) != idx.view(1, -1)) & (counterpart.view(-1, 1) != idx.view(1, -1))
    return S, pos, neg_mask


def shuffle_rank_loss_reference(anchor: torch.Tensor, shuffled: torch.Tensor, perm: torch.Tensor,
                                theta: float = 0.05, *, cap: float = 5.0, weight: float = 1.0) -> torch.Tensor:
    """Naive R: Gram matrix per sample, explicit negative mask, capped softplus, mean (differentiable).

    anchor, shuffled: (B, s, d); perm: int64 (B, s). The oracle every backend is tested against.
    """
    S, pos, neg_mask = _rank_scores(anchor, _calibrate(shuffled, perm))
    diff = (S - pos.unsqueeze(-1)) / theta
    terms = F.softplus(diff.clamp(max=cap))
    return weight * terms[:, neg_mask].mean()


def shuffle_rank_accuracy_reference(anchor: torch.Tensor, shuffled: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose counterpart is the top-1 of [counterpart, negatives] (argmax; ties go
    to the counterpart, as the reference's argmax picks the first entry)."""
    S, pos, neg_mask = _rank_scores(anchor, _calibrate(shuffled, perm))
    B, n = pos.shape
    negs = S[:, neg_mask].view(B, n, n - 2)
    logits = torch.cat([pos.unsqueeze(-1), negs], dim=-1)
    return (logits.argmax(dim=-1) == 0).to(anchor.dtype).mean()


# ---------------------------------------------------------------------------------- input checks
def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"


def _number(name: str, v, what: str) -> float:
    """v as a Python float. A tensor that requires grad is refused: it would get no gradient."""
    if isinstance(v, torch.Tensor):
        if v.requires_grad:
            raise ValueError(f"{name} is a tensor that requires grad: a learnable {name} is not supported (it "
                             f"would get no gradient); pass a number or {name}.detach()")
        if v.numel() != 1 or v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{name} must be {what}, got {_describe(v)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {_describe(v)}")
    return float(v)


def _check_series(name: str, t, like: Optional[torch.Tensor]) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        raise ValueError(f"{name} must be a 3-D tensor (B, s, d), got {_describe(t)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if like is None:
        return
    if t.shape != like.shape:
        raise ValueError(f"{name} must have anchor's shape (B, s, d) = {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} is {t.dtype} but anchor is {like.dtype}; use one dtype")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but anchor is on {like.device}")


def _check(anchor, anchor2, shuffled, perm, check_perm) -> None:
    _check_series("anchor", anchor, None)
    _check_series("shuffled", shuffled, anchor)
    if anchor2 is not None:
        _check_series("anchor2", anchor2, anchor)
    B, s, d = anchor.shape
    if not 2 <= s <= MAX_SERIES:
        raise ValueError(f"anchor: shuffle-rank needs 2 to {MAX_SERIES} series per clip, got s={s}")
    if not 1 <= d <= MAX_DIM:
        raise ValueError(f"anchor: series dim d must be in 1..{MAX_DIM}, got d={d}")
    if B < 1:
        raise ValueError("anchor: shuffle-rank needs a batch of at least one clip, got B=0")
    if not isinstance(perm, torch.Tensor) or perm.shape != (B, s) or perm.dtype != torch.int64:
        raise ValueError(f"perm must be an int64 tensor (B, s) = ({B}, {s}), got {_describe(perm)}")
    if perm.device != anchor.device:
        raise ValueError(f"perm is on {perm.device} but anchor is on {anchor.device}")
    if not isinstance(check_perm, bool):
        raise TypeError(f"check_perm must be True or False, got {_describe(check_perm)}")
    if check_perm and not bool((perm.sort(dim=1).values == torch.arange(s, device=perm.device)).all()):
        raise ValueError("perm: every row must be a permutation of 0..s-1")


def _scalars(theta, cap, weight, anchor2, weight2):
    """(theta, cap, weights) as Python floats, each checked by name."""
    theta = _number("theta", theta, "a positive finite number")
    if not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"theta must be a positive finite number, got {theta!r}")
    cap = _number("cap", cap, "a number or float('inf')")
    if math.isnan(cap):
        raise ValueError("cap must be a number or float('inf'), got NaN")
    w = _number("weight", weight, "a finite number")
    weights = (w,)
    if anchor2 is not None:
        weights = (w, w if weight2 is None else _number("weight2", weight2, "a finite number"))
    elif weight2 is not None:
        raise ValueError("weight2 is given but anchor2 is None")
    for name, v in zip(("weight", "weight2"), weights):
        if not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    return theta, cap, weights


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (for gradcheck), everything else runs in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------- torch backend
# Same schema as the compiled ops (one signature for every backend):
#   forward(anchor, anchor2 | None, shuffled, perm, inv_theta, cap, coef0, coef2, acc_scale) -> out (4,)
#       out = [coef0 * sum of terms(anchor), coef2 * sum of terms(anchor2), acc_scale * correct rows(anchor),
#              acc_scale * correct rows(anchor2)] (the anchor2 slots are 0 without it)
#   backward(anchor, anchor2 | None, shuffled, perm, grad (n,), inv_theta, cap, gcoef0, gcoef2)
#       -> (d_anchor, d_anchor2 | None, d_shuffled), term k's gradient scaled by grad[k] * gcoef_k
# The torch version computes in the accumulation dtype with batched matrix products, never a
# boolean-mask index (no host sync on CUDA), and recomputes the Gram matrices in the backward.
def _pairs(s: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """counterpart (2s, 1) and negatives (2s, 2s - 2) column indices of X = [A; P]."""
    idx = torch.arange(2 * s, device=device)
    cp = (idx + s) % (2 * s)
    lo, hi = torch.minimum(idx, cp).unsqueeze(1), torch.maximum(idx, cp).unsqueeze(1)
    k = torch.arange(2 * s - 2, device=device)
    return cp.view(-1, 1), k + (k >= lo) + (k >= hi - 1)  # the k-th column skipping i and c(i)


def _torch_normalise(y: torch.Tensor, perm: torch.Tensor):
    """(p (B, s, d) stored order, nu (B, s, 1) clamped norms, big (norm > eps), inv = argsort(perm)).
    The norm is scaled by max |y| per row, so squares cannot overflow (fp32 inputs near 1e30)."""
    m = y.abs().amax(dim=-1, keepdim=True)
    n = m * (y / torch.where(m > 0, m, torch.ones_like(m))).norm(dim=-1, keepdim=True)
    nu = n.clamp(min=EPS)
    return y / nu, nu, n > EPS, perm.argsort(dim=1)


def _torch_scores(a, P, inv_theta, cp, neg):
    """X = [a; P] (B, 2s, d), S = X X^T, x (B, 2s, 2s-2) scaled differences, poison (0, or NaN when
    a Gram diagonal is not finite)."""
    X = torch.cat([a, P], dim=1)
    S = torch.bmm(X, X.transpose(1, 2))
    B, n, _ = S.shape
    pos = S.gather(2, cp.expand(B, n, 1))
    x = (S.gather(2, neg.expand(B, n, n - 2)) - pos) * inv_theta
    return X, x, 0.0 * S.diagonal(dim1=1, dim2=2).sum()


def _torch_prologue(anchor, shuffled, perm):
    """What the forward and backward both start from: (acc dtype, s, cp, neg, p, nu, big, inv, P), where
    cp/neg come from _pairs, p/nu/big/inv from _torch_normalise and P = p in calibrated (perm) order."""
    acc = _acc_dtype(anchor)
    s = anchor.shape[1]
    cp, neg = _pairs(s, anchor.device)
    p, nu, big, inv = _torch_normalise(shuffled.to(acc), perm)
    P = p.gather(1, inv.unsqueeze(-1).expand_as(p))
    return acc, s, cp, neg, p, nu, big, inv, P


def _torch_forward(anchor, anchor2, shuffled, perm, inv_theta, cap, coef0, coef2, acc_scale):
    acc, _, cp, neg, _, _, _, _, P = _torch_prologue(anchor, shuffled, perm)
    out = torch.zeros(4, dtype=acc, device=anchor.device)
    for k, (a, coef) in enumerate(((anchor, coef0), (anchor2, coef2))):
        if a is None:
            continue
        _, x, poison = _torch_scores(a.to(acc), P, inv_theta, cp, neg)
        out[k] = coef * (F.softplus(x.clamp(max=cap)).sum() + poison)
        out[2 + k] = acc_scale * (x <= 0).all(dim=-1).to(acc).sum()
    return out


def _torch_backward(anchor, anchor2, shuffled, perm, grad, inv_theta, cap, gcoef0, gcoef2):
    acc, s, cp, neg, p, nu, big, inv, P = _torch_prologue(anchor, shuffled, perm)
    grad = grad.to(acc)
    dP = torch.zeros_like(P)
    d_anchors = []
    for k, (a, gcoef) in enumerate(((anchor, gcoef0), (anchor2, gcoef2))):
        if a is None:
            d_anchors.append(None)
            continue
        X, x, _ = _torch_scores(a.to(acc), P, inv_theta, cp, neg)
        B, n, _ = x.shape
        g = torch.sigmoid(x) * (x <= cap) * (grad[k] * gcoef)
        H = torch.zeros(B, n, n, dtype=acc, device=a.device)
        H.scatter_(2, neg.expand(B, n, n - 2), g)
        H.scatter_(2, cp.expand(B, n, 1), -g.sum(dim=-1, keepdim=True))
        dX = torch.bmm(H + H.transpose(1, 2), X)
        d_anchors.append(dX[:, :s].to(a.dtype))
        dP += dX[:, s:]
    dp = torch.empty_like(dP).scatter_(1, inv.unsqueeze(-1).expand_as(dP), dP)  # back to stored order
    dy = (dp - big * p * (p * dp).sum(dim=-1, keepdim=True)) / nu
    return d_anchors[0], d_anchors[1], dy.to(shuffled.dtype)


# ------------------------------------------------------------------- compiled launchers (C++/CUDA)
def _compiled_forward(anchor, anchor2, shuffled, perm, inv_theta, cap, coef0, coef2, acc_scale):
    return torch.ops.dualvar.shuffle_rank_fwd(anchor, anchor2, shuffled, perm, inv_theta, cap, coef0, coef2,
                                              acc_scale)


def _compiled_backward(anchor, anchor2, shuffled, perm, grad, inv_theta, cap, gcoef0, gcoef2):
    da, da2, dy = torch.ops.dualvar.shuffle_rank_bwd(anchor, anchor2, shuffled, perm, grad, inv_theta, cap,
                                                     gcoef0, gcoef2)
    return da, (da2 if anchor2 is not None else None), dy


def _fake_forward(anchor, anchor2, shuffled, perm, inv_theta, cap, coef0, coef2, acc_scale):
    return anchor.new_empty((4,), dtype=_acc_dtype(anchor))


def _fake_backward(anchor, anchor2, shuffled, perm, grad, inv_theta, cap, gcoef0, gcoef2):
    da2 = anchor.new_empty(anchor.shape) if anchor2 is not None else anchor.new_empty((0,))
    return anchor.new_empty(anchor.shape), da2, anchor.new_empty(anchor.shape)


register_fakes({"shuffle_rank_fwd": _fake_forward, "shuffle_rank_bwd": _fake_backward})

_IMPLS: dict[str, OpImpl] = impl_table(OpImpl(_torch_forward, _torch_backward),
                                        OpImpl(_compiled_forward, _compiled_backward),
                                        triton_impl("shuffle_rank_triton"))


# ---------------------------------------------------------------------------- autograd function
class _ShuffleRank(torch.autograd.Function):
    """One forward launch -> (terms (n,), accuracy (n,)); one backward launch. Differentiable once:
    a backward with create_graph=True raises (its result would silently lack the second-order part)."""

    @staticmethod
    def forward(ctx, anchor, anchor2, shuffled, perm, theta, cap, weights, backend):
        B, s, _ = anchor.shape
        n_terms = B * 2 * s * (2 * s - 2)
        coef = [w / n_terms for w in weights] + [0.0] * (2 - len(weights))
        out = _IMPLS[backend].forward(anchor, anchor2, shuffled, perm, 1.0 / theta, cap, coef[0], coef[1],
                                      1.0 / (B * 2 * s))
        ctx.save_for_backward(anchor, anchor2, shuffled, perm)
        ctx.args = (1.0 / theta, cap, coef[0] / theta, coef[1] / theta, backend)
        n = len(weights)
        acc = out[2:2 + n]
        ctx.mark_non_differentiable(acc)
        return out[:n], acc

    @staticmethod
    def backward(ctx, grad_terms, _grad_acc):
        if torch.is_grad_enabled():
            raise RuntimeError("shuffle_rank_loss is differentiable once: its backward is a fused kernel, so a "
                               "double backward (backward or autograd.grad with create_graph=True) is not supported")
        anchor, anchor2, shuffled, perm = ctx.saved_tensors
        inv_theta, cap, gcoef0, gcoef2, backend = ctx.args
        da, da2, dy = _IMPLS[backend].backward(anchor, anchor2, shuffled, perm, grad_terms.contiguous(), inv_theta,
                                               cap, gcoef0, gcoef2)
        return da, da2, dy, None, None, None, None, None


def _veto(dtype: torch.dtype):
    def veto(backend: str) -> Optional[str]:
        if backend in ("triton", "cuda") and dtype not in GPU_DTYPES:
            return f"the {backend} kernels take float32/float16/bfloat16, got {dtype}"
        if backend in ("cpu", "cuda"):
            return compiled_op_reason(*COMPILED_OPS)
        return None
    return veto


# ---------------------------------------------------------------------------------- public function
class ShuffleRankResult(NamedTuple):
    """loss: scalar sum of the terms; terms: (n_anchors,) weighted R per anchor (differentiable);
    accuracy: (n_anchors,) ranking accuracy per anchor (no gradient)."""
    loss: torch.Tensor
    terms: torch.Tensor
    accuracy: torch.Tensor


def shuffle_rank_loss(anchor: torch.Tensor, shuffled: torch.Tensor, perm: torch.Tensor, theta: float = 0.05, *,
                      cap: float = 5.0, weight: float = 1.0, anchor2: Optional[torch.Tensor] = None,
                      weight2: Optional[float] = None, return_parts: bool = False, check_perm: bool = True,
                      backend: str = "auto"):
    """Shuffle-rank loss weight * R(anchor, P) [+ weight2 * R(anchor2, P)], P = calibrated(shuffled).

    Args:
        anchor: (B, s, d) unit series vectors of an unshuffled clip (2 <= s <= 8, 1 <= d <= 512).
        shuffled: (B, s, d) raw series vectors of the shuffled clip, in shuffled order (each chunk is
            L2-normalised here, eps 1e-12).
        perm: int64 (B, s); shuffled segment j is original segment perm[b, j].
        theta: ranking temperature > 0 (a number, or a one-element tensor that does not require grad).
        cap: clamp of the scaled difference before the softplus (5 in SimCLR; float("inf") = MoCo).
        weight: w multiplying the mean for `anchor`.
        anchor2: optional second (B, s, d) anchor set ranked against the same P in the same launch.
        weight2: its weight (default: `weight`).
        return_parts: return a ShuffleRankResult (loss, per-anchor terms, per-anchor accuracy)
            instead of the scalar loss.
        check_perm: verify that every row of perm is a permutation (one device sync on CUDA).
        backend: "auto", "triton", "cuda", "cpu" or "torch".
    Returns:
        scalar loss (float32; float64 for float64 inputs), or a ShuffleRankResult. Differentiable once
        in anchor, anchor2 and shuffled (a double backward raises). NaN or inf in the inputs gives NaN.
    dtypes: float32, float16, bfloat16 everywhere; float64 on cpu and torch. Accumulation is fp32
    (fp64 for float64); gradients come back in the input dtype.
    """
    _check(anchor, anchor2, shuffled, perm, check_perm)
    theta, cap, weights = _scalars(theta, cap, weight, anchor2, weight2)
    if not isinstance(return_parts, bool):
        raise TypeError(f"return_parts must be True or False, got {_describe(return_parts)}")
    chosen = select(OP, _IMPLS, anchor.device, backend, _veto(anchor.dtype))
    terms, acc = _ShuffleRank.apply(anchor, anchor2, shuffled, perm, theta, cap, weights, chosen)
    if not return_parts:
        return terms.sum() if len(weights) > 1 else terms[0]
    return ShuffleRankResult(terms.sum(), terms, acc)
