"""Shuffle-rank loss (METHOD.md 3.3, 9.3): each series vector must be closer to its counterpart in the
other set than to any other series of the sample.

For one sample, X = [a_0..a_{s-1}; p_0..p_{s-1}] (2s rows, unit vectors), S = X X^T, c(i) the
counterpart of row i (i +- s), and for every j not in {i, c(i)}:

    x_ij = (S_ij - S_{i,c(i)}) / theta,     term_ij = softplus(min(x_ij, cap))

R = weight * mean over (b, i, j) of term_ij. P is the calibrated shuffled series: the shuffled
clip's chunk j describes original segment perm[b, j], so P[b, perm[b, j]] = normalize(shuffled[b, j]),
i.e. P[b, k] = normalize(shuffled[b, argsort(perm[b])[k]]).

How the fused kernels compute it (one launch forward, one backward, any backend):
- The loss is a sum over all (row, negative) pairs, so the order of the P rows inside a sample does
  not matter, only which row is whose counterpart. The kernels keep the shuffled rows y_j in their
  stored order and fold the calibration into the counterpart relation: anchor row i and shuffled
  row j are counterparts iff perm[b, j] == i. No inverse permutation, scatter or copy is needed, and
  the gradient of y_j lands on row j directly.
- Per sample the raw Gram blocks A A^T, A Y^T, Y Y^T (and A2 A2^T, A2 Y^T for the second anchor)
  are accumulated over d; the norms of y_j are the diagonal of Y Y^T, so normalising the shuffled
  rows is a rescaling of Gram entries: S_AP = (A Y^T) / nu_j, S_PP = (Y Y^T) / (nu_j nu_k),
  nu = max(||y||, 1e-12).
- Backward (recomputes the Grams): H = dL/dS per block (H_ij = w sigma(x_ij)[x_ij <= cap] / (theta n)
  for negatives, H_{i,c(i)} = -sum of row i's negatives), dX = (H + H^T) X, and the normalisation
  backward dL/dy = (g - p (p.g)) / nu, with p.g read off the Gram blocks, so every gradient row is a
  (2s)-term linear combination of input rows, written once.

Two anchors (the SimCLR and MoCo objectives: R(u0, P) and R(u2, P)) share P's loads, norms and
P P^T in one call. Outputs: per-anchor weighted terms (differentiable) and ranking accuracy (the
fraction of the B*2s rows whose counterpart similarity is >= every negative's; no gradient).

Layout of this file: references -> validation -> torch backend -> compiled (cpu/cuda) launchers ->
Triton kernels and launchers -> autograd function -> public function. The C++ kernels are
csrc/cpu/shuffle_rank.{h,cpp} and csrc/cuda/shuffle_rank.{h,cu}, bound in csrc/shuffle_rank.cpp.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._dispatch import select
from ._ext import load_ext, load_triton

MAX_SERIES = 8
MAX_DIM = 512
EPS = 1e-12
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
    """Naive transcription: Gram matrix per sample, explicit negative mask, capped softplus, mean."""
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


# ------------------------------------------------------------------------------ validation
def _check(anchor, anchor2, shuffled, perm, theta, cap, check_perm):
    for name, t in (("anchor", anchor), ("shuffled", shuffled), ("anchor2", anchor2)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if anchor.dim() != 3 or shuffled.shape != anchor.shape:
        raise ValueError(f"anchor and shuffled must both be (B, s, d), got {tuple(anchor.shape)} and "
                         f"{tuple(shuffled.shape)}")
    if anchor2 is not None and anchor2.shape != anchor.shape:
        raise ValueError(f"anchor2 must have anchor's shape {tuple(anchor.shape)}, got {tuple(anchor2.shape)}")
    B, s, d = anchor.shape
    if not 2 <= s <= MAX_SERIES:
        raise ValueError(f"shuffle-rank needs 2 to {MAX_SERIES} series per clip, got s={s}")
    if not 1 <= d <= MAX_DIM:
        raise ValueError(f"series dim d must be in 1..{MAX_DIM}, got d={d}")
    if B < 1:
        raise ValueError("shuffle-rank needs a batch of at least one clip")
    for name, t in (("anchor", anchor), ("shuffled", shuffled), ("anchor2", anchor2)):
        if t is None:
            continue
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        if t.dtype != anchor.dtype:
            raise TypeError(f"{name} is {t.dtype} but anchor is {anchor.dtype}; use one dtype")
        if t.device != anchor.device:
            raise ValueError(f"{name} is on {t.device} but anchor is on {anchor.device}")
    if not isinstance(perm, torch.Tensor) or perm.shape != (B, s) or perm.dtype != torch.int64:
        raise ValueError(f"perm must be int64 (B, s) = ({B}, {s}), got "
                         f"{(perm.dtype, tuple(perm.shape)) if isinstance(perm, torch.Tensor) else perm!r}")
    if perm.device != anchor.device:
        raise ValueError(f"perm is on {perm.device} but anchor is on {anchor.device}")
    if check_perm and not bool((perm.sort(dim=1).values == torch.arange(s, device=perm.device)).all()):
        raise ValueError("every row of perm must be a permutation of 0..s-1")
    if not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"theta must be a positive finite number, got {theta!r}")
    if math.isnan(cap):
        raise ValueError("cap must be a number or +inf, got NaN")


# ------------------------------------------------------------------------------ torch backend
def _shuffle_rank_torch(anchors, shuffled, perm, theta, cap, weights):
    """Pure torch (autograd): terms (n,) and accuracy (n,), accumulated in float32 (float64 for float64)."""
    acc = torch.float64 if anchors[0].dtype == torch.float64 else torch.float32
    p = _calibrate(shuffled.to(acc), perm)
    terms, accs = [], []
    for a, w in zip(anchors, weights):
        S, pos, neg_mask = _rank_scores(a.to(acc), p)
        diff = (S - pos.unsqueeze(-1)) / theta
        x = diff[:, neg_mask]  # (B, 2s * (2s-2))
        terms.append(w * F.softplus(x.clamp(max=cap)).mean())
        B, n = pos.shape
        accs.append((x.detach().view(B, n, n - 2) <= 0).all(dim=-1).to(acc).mean())
    return torch.stack(terms), torch.stack(accs)


# ------------------------------------------------------------------------ compiled (cpu, cuda)
def _scales(B, s, theta, weights):
    n_terms = B * 2 * s * (2 * s - 2)
    w = list(weights) + [0.0] * (2 - len(weights))
    return [wi / n_terms for wi in w], 1.0 / (B * 2 * s)


def _fwd_compiled(anchor, anchor2, shuffled, perm, theta, cap, weights):
    B, s, _ = anchor.shape
    coef, acc_scale = _scales(B, s, theta, weights)
    return torch.ops.dualvar.shuffle_rank_fwd(anchor, anchor2, shuffled, perm, 1.0 / theta, cap,
                                              coef[0], coef[1], acc_scale)


def _bwd_compiled(anchor, anchor2, shuffled, perm, grad, theta, cap, weights):
    B, s, _ = anchor.shape
    coef, _ = _scales(B, s, theta, weights)
    da, da2, dy = torch.ops.dualvar.shuffle_rank_bwd(anchor, anchor2, shuffled, perm, grad, 1.0 / theta, cap,
                                                     coef[0] / theta, coef[1] / theta)
    return da, (da2 if anchor2 is not None else None), dy


# --------------------------------------------------------------------------------- Triton
_triton, _ = load_triton()
if _triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _capped_softplus(x, cap):
        z = tl.minimum(x, cap)
        return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))  # stable: exp argument <= 0

    @triton.jit
    def _load_rows(ptr, b, stride_b, stride_s, rows, cols, row_ok, d):
        offs = b * stride_b + rows[:, None].to(tl.int64) * stride_s + cols[None, :]
        return tl.load(ptr + offs, mask=row_ok[:, None] & (cols[None, :] < d), other=0.0).to(tl.float32)

    @triton.jit
    def _gram(u, v):
        # (SP, BLOCK_D) x (SP, BLOCK_D) -> (SP, SP); tiny s: broadcast products, no tensor cores
        return tl.sum(u[:, None, :] * v[None, :, :], axis=2)

    @triton.jit
    def _rank_parts(Gaa, Sap, Spp, M, eye, valid, row_ok, inv_theta, cap):
        """Scaled differences of the four blocks of one sample's Gram matrix and their masks.
        M[i, j]: anchor row i and shuffled row j are counterparts (perm[j] == i)."""
        pos_a = tl.sum(tl.where(M, Sap, 0.0), axis=1)  # anchor row i: a_i . (its counterpart)
        pos_p = tl.sum(tl.where(M, Sap, 0.0), axis=0)  # shuffled row j: p_j . (its counterpart)
        neg_same = valid & (eye == 0)  # other series of the same set
        neg_cross = valid & (M == 0)   # other series of the other set
        x1 = (Gaa - pos_a[:, None]) * inv_theta  # anchor rows vs anchors
        x2 = (Sap - pos_a[:, None]) * inv_theta  # anchor rows vs shuffled
        x3 = (Spp - pos_p[:, None]) * inv_theta  # shuffled rows vs shuffled
        x4 = (Sap - pos_p[None, :]) * inv_theta  # shuffled rows (columns) vs anchors
        return x1, x2, x3, x4, neg_same, neg_cross

    @triton.jit
    def _rank_fwd(Gaa, Sap, Spp, M, eye, valid, row_ok, inv_theta, cap):
        x1, x2, x3, x4, neg_same, neg_cross = _rank_parts(Gaa, Sap, Spp, M, eye, valid, row_ok, inv_theta, cap)
        loss = (tl.sum(tl.sum(tl.where(neg_same, _capped_softplus(x1, cap), 0.0), axis=1), axis=0)
                + tl.sum(tl.sum(tl.where(neg_cross, _capped_softplus(x2, cap), 0.0), axis=1), axis=0)
                + tl.sum(tl.sum(tl.where(neg_same, _capped_softplus(x3, cap), 0.0), axis=1), axis=0)
                + tl.sum(tl.sum(tl.where(neg_cross, _capped_softplus(x4, cap), 0.0), axis=1), axis=0))
        bad_a = (tl.sum(tl.where(neg_same & (x1 > 0), 1.0, 0.0), axis=1)
                 + tl.sum(tl.where(neg_cross & (x2 > 0), 1.0, 0.0), axis=1))
        bad_p = (tl.sum(tl.where(neg_same & (x3 > 0), 1.0, 0.0), axis=1)
                 + tl.sum(tl.where(neg_cross & (x4 > 0), 1.0, 0.0), axis=0))
        correct = (tl.sum(tl.where(row_ok & (bad_a == 0), 1.0, 0.0), axis=0)
                   + tl.sum(tl.where(row_ok & (bad_p == 0), 1.0, 0.0), axis=0))
        return loss, correct

    @triton.jit
    def _rank_bwd(Gaa, Sap, Spp, M, eye, valid, row_ok, inv_theta, cap, gscale):
        """dL/dS blocks: (H_AA, H_AP, H_PP), H_AP[i, j] = dL/dS(a_i, p_j) for P rows in stored order."""
        x1, x2, x3, x4, neg_same, neg_cross = _rank_parts(Gaa, Sap, Spp, M, eye, valid, row_ok, inv_theta, cap)
        g1 = tl.where(neg_same & (x1 <= cap), tl.sigmoid(x1), 0.0) * gscale
        g2 = tl.where(neg_cross & (x2 <= cap), tl.sigmoid(x2), 0.0) * gscale
        g3 = tl.where(neg_same & (x3 <= cap), tl.sigmoid(x3), 0.0) * gscale
        g4 = tl.where(neg_cross & (x4 <= cap), tl.sigmoid(x4), 0.0) * gscale
        neg_a = tl.sum(g1, axis=1) + tl.sum(g2, axis=1)
        neg_p = tl.sum(g3, axis=1) + tl.sum(g4, axis=0)
        Hap = g2 + g4 - tl.where(M, neg_a[:, None], 0.0) - tl.where(M, neg_p[None, :], 0.0)
        return g1, Hap, g3

    @triton.jit
    def _sample_grams(a_ptr, a2_ptr, y_ptr, b, s_ab, s_as, s_a2b, s_a2s, s_yb, s_ys, rows, cols0, row_ok, d,
                      TWO: tl.constexpr, SP: tl.constexpr, BLOCK_D: tl.constexpr):
        Gaa = tl.zeros((SP, SP), dtype=tl.float32)
        Gay = tl.zeros((SP, SP), dtype=tl.float32)
        Gyy = tl.zeros((SP, SP), dtype=tl.float32)
        Gbb = tl.zeros((SP, SP), dtype=tl.float32)
        Gby = tl.zeros((SP, SP), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + cols0
            A = _load_rows(a_ptr, b, s_ab, s_as, rows, cols, row_ok, d)
            Y = _load_rows(y_ptr, b, s_yb, s_ys, rows, cols, row_ok, d)
            Gaa += _gram(A, A)
            Gay += _gram(A, Y)
            Gyy += _gram(Y, Y)
            if TWO:
                A2 = _load_rows(a2_ptr, b, s_a2b, s_a2s, rows, cols, row_ok, d)
                Gbb += _gram(A2, A2)
                Gby += _gram(A2, Y)
        return Gaa, Gay, Gyy, Gbb, Gby

    @triton.jit
    def _shuffle_rank_fwd_kernel(a_ptr, a2_ptr, y_ptr, perm_ptr, out_ptr,
                                 B, s, d, per_prog,
                                 s_ab, s_as, s_a2b, s_a2s, s_yb, s_ys,
                                 inv_theta, cap, coef0, coef2, acc_scale,
                                 TWO: tl.constexpr, SP: tl.constexpr, BLOCK_D: tl.constexpr, EPS_: tl.constexpr):
        # One program = `per_prog` consecutive samples; its partial sums go to out[0:4] by 4 atomics.
        pid = tl.program_id(0)
        rows = tl.arange(0, SP)
        cols0 = tl.arange(0, BLOCK_D)
        row_ok = rows < s
        eye = rows[:, None] == rows[None, :]
        valid = row_ok[:, None] & row_ok[None, :]
        zero = tl.sum(tl.zeros((SP,), dtype=tl.float32), axis=0)
        loss0 = zero
        loss2 = zero
        hit0 = zero
        hit2 = zero
        for t in range(0, per_prog):
            b_raw = pid * per_prog + t
            live = b_raw < B
            b = tl.minimum(b_raw, B - 1).to(tl.int64)
            Gaa, Gay, Gyy, Gbb, Gby = _sample_grams(a_ptr, a2_ptr, y_ptr, b, s_ab, s_as, s_a2b, s_a2s, s_yb, s_ys,
                                                    rows, cols0, row_ok, d, TWO, SP, BLOCK_D)
            sig = tl.load(perm_ptr + b * s + rows, mask=row_ok, other=-1)
            M = (sig[None, :] == rows[:, None]) & valid
            sq = tl.where(eye, Gyy, 0.0)
            nu_r = tl.maximum(tl.sqrt(tl.sum(sq, axis=1)), EPS_)
            nu_c = tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), EPS_)
            Spp = Gyy / (nu_r[:, None] * nu_c[None, :])
            l, c = _rank_fwd(Gaa, Gay / nu_c[None, :], Spp, M, eye, valid, row_ok, inv_theta, cap)
            w = tl.where(live, 1.0, 0.0)
            loss0 += w * l
            hit0 += w * c
            if TWO:
                l2, c2 = _rank_fwd(Gbb, Gby / nu_c[None, :], Spp, M, eye, valid, row_ok, inv_theta, cap)
                loss2 += w * l2
                hit2 += w * c2
        tl.atomic_add(out_ptr + 0, loss0 * coef0)
        tl.atomic_add(out_ptr + 2, hit0 * acc_scale)
        if TWO:
            tl.atomic_add(out_ptr + 1, loss2 * coef2)
            tl.atomic_add(out_ptr + 3, hit2 * acc_scale)

    @triton.jit
    def _mix(E, X):
        # rows of E (SP, SP) combine rows of X (SP, BLOCK_D): (E @ X) without tensor cores
        return tl.sum(E[:, :, None] * X[None, :, :], axis=1)

    @triton.jit
    def _shuffle_rank_bwd_kernel(a_ptr, a2_ptr, y_ptr, perm_ptr, g_ptr, g_stride,
                                 da_ptr, da2_ptr, dy_ptr,
                                 B, s, d, per_prog,
                                 s_ab, s_as, s_a2b, s_a2s, s_yb, s_ys,
                                 inv_theta, cap, gcoef0, gcoef2,
                                 TWO: tl.constexpr, SP: tl.constexpr, BLOCK_D: tl.constexpr, EPS_: tl.constexpr):
        # Gradients are written to contiguous (B, s, d) buffers; one program = `per_prog` samples.
        pid = tl.program_id(0)
        rows = tl.arange(0, SP)
        cols0 = tl.arange(0, BLOCK_D)
        row_ok = rows < s
        eye = rows[:, None] == rows[None, :]
        valid = row_ok[:, None] & row_ok[None, :]
        gs0 = tl.load(g_ptr).to(tl.float32) * gcoef0
        gs2 = gs0
        if TWO:
            gs2 = tl.load(g_ptr + g_stride).to(tl.float32) * gcoef2
        for t in range(0, per_prog):
            b_raw = pid * per_prog + t
            b = tl.minimum(b_raw, B - 1).to(tl.int64)
            ok = row_ok & (b_raw < B)
            Gaa, Gay, Gyy, Gbb, Gby = _sample_grams(a_ptr, a2_ptr, y_ptr, b, s_ab, s_as, s_a2b, s_a2s, s_yb, s_ys,
                                                    rows, cols0, row_ok, d, TWO, SP, BLOCK_D)
            sig = tl.load(perm_ptr + b * s + rows, mask=row_ok, other=-1)
            M = (sig[None, :] == rows[:, None]) & valid
            sq = tl.where(eye, Gyy, 0.0)
            n_r = tl.sqrt(tl.sum(sq, axis=1))
            nu_r = tl.maximum(n_r, EPS_)
            nu_c = tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), EPS_)
            Spp = Gyy / (nu_r[:, None] * nu_c[None, :])
            Sap = Gay / nu_c[None, :]
            Haa, Hap, Hpp = _rank_bwd(Gaa, Sap, Spp, M, eye, valid, row_ok, inv_theta, cap, gs0)
            Hyy = Hpp + tl.trans(Hpp)
            # p_j . dL/dp_j from the Gram blocks (for the normalisation backward)
            r = tl.sum(Hyy * Spp, axis=1) + tl.sum(Hap * Sap, axis=0)
            Eaa = Haa + tl.trans(Haa)
            Eay = Hap / nu_c[None, :]
            Eya = tl.trans(Hap) / nu_r[:, None]
            Ebb = Eaa
            Eby = Eay
            Eyb = Eya
            if TWO:
                Sbp = Gby / nu_c[None, :]
                Hbb, Hbp, Hpp2 = _rank_bwd(Gbb, Sbp, Spp, M, eye, valid, row_ok, inv_theta, cap, gs2)
                Hyy2 = Hpp2 + tl.trans(Hpp2)
                Hyy += Hyy2
                r += tl.sum(Hyy2 * Spp, axis=1) + tl.sum(Hbp * Sbp, axis=0)
                Ebb = Hbb + tl.trans(Hbb)
                Eby = Hbp / nu_c[None, :]
                Eyb = tl.trans(Hbp) / nu_r[:, None]
            # dy_j = sum_k Hyy[j,k] y_k / (nu_j nu_k) + sum_i H[i,j] a_i / nu_j - [||y_j|| > eps] r_j y_j / nu_j^2
            proj = tl.where(n_r > EPS_, r / (nu_r * nu_r), 0.0)
            Eyy = Hyy / (nu_r[:, None] * nu_c[None, :]) - tl.where(eye, proj[:, None], 0.0)
            for d0 in range(0, d, BLOCK_D):
                cols = d0 + cols0
                A = _load_rows(a_ptr, b, s_ab, s_as, rows, cols, row_ok, d)
                Y = _load_rows(y_ptr, b, s_yb, s_ys, rows, cols, row_ok, d)
                dA = _mix(Eaa, A) + _mix(Eay, Y)
                dY = _mix(Eyy, Y) + _mix(Eya, A)
                offs = b * s * d + rows[:, None].to(tl.int64) * d + cols[None, :]
                omask = ok[:, None] & (cols[None, :] < d)
                if TWO:
                    A2 = _load_rows(a2_ptr, b, s_a2b, s_a2s, rows, cols, row_ok, d)
                    dA2 = _mix(Ebb, A2) + _mix(Eby, Y)
                    dY += _mix(Eyb, A2)
                    tl.store(da2_ptr + offs, dA2.to(da2_ptr.dtype.element_ty), mask=omask)
                tl.store(da_ptr + offs, dA.to(da_ptr.dtype.element_ty), mask=omask)
                tl.store(dy_ptr + offs, dY.to(dy_ptr.dtype.element_ty), mask=omask)

    def triton_config(s: int, d: int, B: int):
        """(SP, BLOCK_D, num_warps, per_prog): block sizes for one call; fails past the kernel's limits."""
        if not 2 <= s <= MAX_SERIES or not 1 <= d <= MAX_DIM:
            raise ValueError(f"shuffle-rank Triton kernel supports 2 <= s <= {MAX_SERIES}, d <= {MAX_DIM}")
        SP = triton.next_power_of_2(s)
        # keep the (SP, SP, BLOCK_D) broadcast products at <= 4096 elements per program
        BLOCK_D = max(16, min(triton.next_power_of_2(d), 4096 // (SP * SP)))
        num_warps = max(1, min(8, SP * SP * BLOCK_D // 512))  # <= 16 product elements per thread: no spills
        per_prog = triton.cdiv(B, 2048)  # at most 2048 programs (and forward atomics)
        return SP, BLOCK_D, num_warps, per_prog

    def _strides(t):
        return t.stride(0), t.stride(1)

    def _last_contig(t):
        return t if t is None or t.stride(-1) == 1 else t.contiguous()

    def _fwd_triton(anchor, anchor2, shuffled, perm, theta, cap, weights):
        B, s, d = anchor.shape
        anchor, anchor2, shuffled, perm = map(_last_contig, (anchor, anchor2, shuffled, perm.contiguous()))
        coef, acc_scale = _scales(B, s, theta, weights)
        SP, BLOCK_D, num_warps, per_prog = triton_config(s, d, B)
        two = anchor2 is not None
        a2 = anchor2 if two else anchor
        out = torch.zeros(4, dtype=torch.float32, device=anchor.device)
        grid = (triton.cdiv(B, per_prog),)
        _shuffle_rank_fwd_kernel[grid](anchor, a2, shuffled, perm, out, B, s, d, per_prog,
                                       *_strides(anchor), *_strides(a2), *_strides(shuffled),
                                       1.0 / theta, cap, coef[0], coef[1], acc_scale,
                                       TWO=two, SP=SP, BLOCK_D=BLOCK_D, EPS_=EPS, num_warps=num_warps)
        return out

    def _bwd_triton(anchor, anchor2, shuffled, perm, grad, theta, cap, weights):
        B, s, d = anchor.shape
        anchor, anchor2, shuffled, perm = map(_last_contig, (anchor, anchor2, shuffled, perm.contiguous()))
        coef, _ = _scales(B, s, theta, weights)
        SP, BLOCK_D, num_warps, per_prog = triton_config(s, d, B)
        two = anchor2 is not None
        a2 = anchor2 if two else anchor
        da = torch.empty((B, s, d), dtype=anchor.dtype, device=anchor.device)
        dy = torch.empty_like(da)
        da2 = torch.empty_like(da) if two else da
        grid = (triton.cdiv(B, per_prog),)
        _shuffle_rank_bwd_kernel[grid](anchor, a2, shuffled, perm, grad, grad.stride(0) if grad.dim() else 0,
                                       da, da2, dy, B, s, d, per_prog,
                                       *_strides(anchor), *_strides(a2), *_strides(shuffled),
                                       1.0 / theta, cap, coef[0] / theta, coef[1] / theta,
                                       TWO=two, SP=SP, BLOCK_D=BLOCK_D, EPS_=EPS, num_warps=num_warps)
        return da, (da2 if two else None), dy


# ------------------------------------------------------------------------------ autograd
_FUSED = {"cpu": (_fwd_compiled, _bwd_compiled), "cuda": (_fwd_compiled, _bwd_compiled)}
if _triton is not None:
    _FUSED["triton"] = (_fwd_triton, _bwd_triton)


class _ShuffleRankFused(torch.autograd.Function):
    """Thin wrapper: one forward launch -> out (4,) = [term0, term2, acc0, acc2]; one backward launch."""

    @staticmethod
    def forward(ctx, anchor, anchor2, shuffled, perm, theta, cap, weights, backend):
        out = _FUSED[backend][0](anchor, anchor2, shuffled, perm, theta, cap, weights)
        ctx.save_for_backward(anchor, anchor2, shuffled, perm)
        ctx.args = (theta, cap, weights, backend)
        n = len(weights)
        acc = out[2:2 + n]
        ctx.mark_non_differentiable(acc)
        return out[:n], acc

    @staticmethod
    def backward(ctx, grad_terms, _grad_acc):
        anchor, anchor2, shuffled, perm = ctx.saved_tensors
        theta, cap, weights, backend = ctx.args
        if grad_terms is None:
            return (None,) * 8
        da, da2, dy = _FUSED[backend][1](anchor, anchor2, shuffled, perm, grad_terms, theta, cap, weights)
        return da, da2, dy, None, None, None, None, None


def _run_fused(backend, anchors, shuffled, perm, theta, cap, weights):
    anchor2 = anchors[1] if len(anchors) > 1 else None
    return _ShuffleRankFused.apply(anchors[0], anchor2, shuffled, perm, theta, cap, tuple(weights), backend)


_IMPLS = {b: (lambda *a, _b=b: _run_fused(_b, *a)) for b in _FUSED}
_IMPLS["torch"] = _shuffle_rank_torch


_FAKES_REGISTERED = False


def _register_fakes() -> None:
    """Shape functions of the compiled ops (torch.compile / FakeTensor tracing; checked by opcheck)."""
    global _FAKES_REGISTERED
    register = getattr(torch.library, "register_fake", None)
    if _FAKES_REGISTERED or register is None:
        return
    _FAKES_REGISTERED = True

    def fwd(anchor, anchor2, shuffled, perm, inv_theta, cap, coef0, coef2, acc_scale):
        return anchor.new_empty((4,), dtype=torch.float64 if anchor.dtype == torch.float64 else torch.float32)

    def bwd(anchor, anchor2, shuffled, perm, grad, inv_theta, cap, gcoef0, gcoef2):
        da2 = anchor.new_empty(anchor.shape) if anchor2 is not None else anchor.new_empty((0,))
        return anchor.new_empty(anchor.shape), da2, anchor.new_empty(anchor.shape)

    for name, fn in (("shuffle_rank_fwd", fwd), ("shuffle_rank_bwd", bwd)):
        try:
            register(f"dualvar::{name}", fn)
        except RuntimeError:  # already registered (module reloaded)
            pass


def _compiled_op_missing() -> bool:
    if load_ext()[0] is None:
        return True
    try:
        torch.ops.dualvar.shuffle_rank_fwd
    except (AttributeError, RuntimeError):
        return True
    _register_fakes()
    return False


def _op_reason(dtype):
    def reason(backend):
        if dtype == torch.float64 and backend in ("triton", "cuda"):
            return "float64 runs on the cpu and torch backends only"
        if backend in ("cpu", "cuda") and _compiled_op_missing():
            return "the compiled extension predates the shuffle_rank ops; rebuild it with `pip install -e .`"
        return None
    return reason


# ------------------------------------------------------------------------------ public function
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
        theta: ranking temperature > 0.
        cap: clamp of the scaled difference before the softplus (5 in SimCLR; float("inf") = MoCo).
        weight: w multiplying the mean for `anchor`.
        anchor2: optional second (B, s, d) anchor set ranked against the same P in the same launch.
        weight2: its weight (default: `weight`).
        return_parts: return a ShuffleRankResult (loss, per-anchor terms, per-anchor accuracy)
            instead of the scalar loss.
        check_perm: verify that every row of perm is a permutation (one device sync on CUDA).
        backend: "auto", "triton", "cuda", "cpu" or "torch".
    Returns:
        scalar loss (float32; float64 for float64 inputs), or a ShuffleRankResult.
    dtypes: float32, float16, bfloat16 everywhere; float64 on cpu and torch. Accumulation is fp32
    (fp64 for float64); gradients come back in the input dtype.
    """
    _check(anchor, anchor2, shuffled, perm, theta, cap, check_perm)
    anchors = (anchor,) if anchor2 is None else (anchor, anchor2)
    weights = (float(weight),) if anchor2 is None else (float(weight), float(weight if weight2 is None else weight2))
    chosen = select("shuffle_rank", _IMPLS, anchor.device, backend, _op_reason(anchor.dtype))
    terms, acc = _IMPLS[chosen](anchors, shuffled, perm, float(theta), float(cap), weights)
    if not return_parts:
        return terms.sum() if len(weights) > 1 else terms[0]
    return ShuffleRankResult(terms.sum(), terms, acc)
