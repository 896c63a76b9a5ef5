"""Triton kernels of the shuffle-rank loss and their launchers (see shuffle_rank.py for the math).

    forward   _shuffle_rank_fwd_kernel: one program per `per_prog` consecutive samples; per sample the
              Gram blocks A A^T, A Ys^T, Ys Ys^T (and A2 A2^T, A2 Ys^T) are accumulated over d in fp32,
              the ranking terms are summed, and each program writes its four partial sums to its own
              column of a (4, n_programs) buffer. The launcher adds the columns in a fixed order (one
              torch sum): the loss is the same bits on every run, with no atomics.
    backward  _shuffle_rank_bwd_kernel: recomputes the Gram blocks, forms dL/dS per block and writes
              every gradient row once as a (2s)-term combination of input rows.

Normalisation of the shuffled rows, exact and safe from overflow:
- Ys = y / m with m = max_k |y_k| (a running maximum over the d chunks; accumulated Gram entries are
  rescaled when it grows), so the squared norms never overflow in fp32 (inputs near 1e30 give the
  float64 answer, not zeros);
- p_j = Ys_j / q_j with q_j = ||Ys_j|| (clamped norm nu_j = m_j q_j >= 1e-12; below it p_j = y_j / 1e-12),
  with the square root and, in the forward, the divisions of the Gram entries correctly rounded
  (tl.sqrt_rn, tl.div_rn): with d = 1 every similarity is then exactly +-1, as on the CPU, so tied
  rankings (and the accuracy) stay tied instead of being broken by an ulp either way.
NaN or inf in a sample's anchor or shuffled rows makes that sample's term NaN (an explicit 0 * (sum of
the Gram diagonals) is added: the GPU's min/max would otherwise drop a NaN).

Every tensor argument is passed with all its strides (no contiguity assumed, no copies); offsets are
int64. Launches run under the tensors' device guard.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._ext import device_guard

MAX_SERIES = 8
MAX_DIM = 512
EPS = 1e-12
MAX_PROGRAMS = 2048
TINY = tl.constexpr(1e-30)  # floor of the row scale m: 1 / m stays finite, and rows below it have norms far below EPS


def triton_config(s: int, d: int, B: int):
    """(SP, BLOCK_D, num_warps, per_prog): block sizes for one call; fails past the kernel's limits."""
    if not 2 <= s <= MAX_SERIES or not 1 <= d <= MAX_DIM:
        raise ValueError(f"shuffle-rank Triton kernel supports 2 <= s <= {MAX_SERIES}, d <= {MAX_DIM}, "
                         f"got s={s}, d={d}")
    SP = triton.next_power_of_2(s)
    # keep the (SP, SP, BLOCK_D) broadcast products at <= 4096 elements per program
    BLOCK_D = max(16, min(triton.next_power_of_2(d), 4096 // (SP * SP)))
    num_warps = max(1, min(8, SP * SP * BLOCK_D // 512))  # <= 16 product elements per thread: no spills
    per_prog = triton.cdiv(B, MAX_PROGRAMS)
    return SP, BLOCK_D, num_warps, per_prog


@triton.jit
def _capped_softplus(x, cap):
    z = tl.minimum(x, cap)
    return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))  # stable: exp argument <= 0


@triton.jit
def _load_rows(ptr, b, stride_b, stride_s, stride_d, rows, cols, row_ok, d):
    offs = b * stride_b + rows[:, None].to(tl.int64) * stride_s + cols[None, :].to(tl.int64) * stride_d
    return tl.load(ptr + offs, mask=row_ok[:, None] & (cols[None, :] < d), other=0.0).to(tl.float32)


@triton.jit
def _gram(u, v):
    # (SP, BLOCK_D) x (SP, BLOCK_D) -> (SP, SP); tiny s: broadcast products, no tensor cores
    return tl.sum(u[:, None, :] * v[None, :, :], axis=2)


@triton.jit
def _mix(E, X):
    # rows of E (SP, SP) combine rows of X (SP, BLOCK_D): (E @ X) without tensor cores
    return tl.sum(E[:, :, None] * X[None, :, :], axis=1)




@triton.jit
def _sample_grams(a_ptr, a2_ptr, y_ptr, b, s_ab, s_as, s_ad, s_a2b, s_a2s, s_a2d, s_yb, s_ys, s_yd,
                  rows, cols0, row_ok, d, TWO: tl.constexpr, SP: tl.constexpr, BLOCK_D: tl.constexpr):
    """Raw Gram blocks of the anchors and Gram blocks against Ys = y / m (m: max(max_k |y_k|, TINY) per row)."""
    Gaa = tl.zeros((SP, SP), dtype=tl.float32)
    Gay = tl.zeros((SP, SP), dtype=tl.float32)
    Gyy = tl.zeros((SP, SP), dtype=tl.float32)
    Gbb = tl.zeros((SP, SP), dtype=tl.float32)
    Gby = tl.zeros((SP, SP), dtype=tl.float32)
    m = tl.full((SP,), TINY, dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + cols0
        A = _load_rows(a_ptr, b, s_ab, s_as, s_ad, rows, cols, row_ok, d)
        Y = _load_rows(y_ptr, b, s_yb, s_ys, s_yd, rows, cols, row_ok, d)
        m_new = tl.maximum(m, tl.max(tl.abs(Y), axis=1))
        alpha = m / m_new  # rescales what was accumulated at the old maximum (exactly 1 when it did not grow)
        Ys = Y * (1.0 / m_new)[:, None]
        Gaa += _gram(A, A)
        Gay = Gay * alpha[None, :] + _gram(A, Ys)
        Gyy = Gyy * (alpha[:, None] * alpha[None, :]) + _gram(Ys, Ys)
        if TWO:
            A2 = _load_rows(a2_ptr, b, s_a2b, s_a2s, s_a2d, rows, cols, row_ok, d)
            Gbb += _gram(A2, A2)
            Gby = Gby * alpha[None, :] + _gram(A2, Ys)
        m = m_new
    return Gaa, Gay, Gyy, Gbb, Gby, m


@triton.jit
def _normalise(Gyy, m, eye, EPS_: tl.constexpr):
    """From Ys Ys^T and m: q (p = Ys / q, by rows and by columns), nu (clamped norms of y), big (norm > eps)
    and the poison 0 * trace (NaN when a row holds NaN or inf)."""
    sq_r = tl.sum(tl.where(eye, Gyy, 0.0), axis=1)
    sq_c = tl.sum(tl.where(eye, Gyy, 0.0), axis=0)
    ns_r = tl.sqrt_rn(sq_r)
    ns_c = tl.sqrt_rn(sq_c)
    n_r = m * ns_r
    n_c = m * ns_c
    big_r = n_r > EPS_
    q_r = tl.where(big_r, ns_r, EPS_ / m)
    q_c = tl.where(n_c > EPS_, ns_c, EPS_ / m)
    nu_r = tl.where(big_r, n_r, EPS_)
    return q_r, q_c, nu_r, big_r, 0.0 * tl.sum(sq_r, axis=0)


@triton.jit
def _div_cols(G, q, SP: tl.constexpr):
    """G[:, j] / q[j], correctly rounded."""
    return tl.div_rn(G, tl.broadcast_to(q[None, :], (SP, SP)))


@triton.jit
def _normalised_blocks(Gay, Gyy, q_r, q_c, SP: tl.constexpr, EXACT: tl.constexpr):
    """S_AP = (A Ys^T) / q_c and S_PP = (Ys Ys^T) / (q_r q_c): correctly rounded in the forward (exact ties),
    plain division in the backward (a tie broken by an ulp moves a gradient by an ulp; and correctly
    rounded division's slow path costs the backward a stack frame on sm_80)."""
    if EXACT:
        return _div_cols(Gay, q_c, SP), tl.div_rn(Gyy, q_r[:, None] * q_c[None, :])
    return Gay / q_c[None, :], Gyy / (q_r[:, None] * q_c[None, :])


@triton.jit
def _rank_parts(Gaa, Sap, Spp, M, eye, valid, inv_theta):
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
    x1, x2, x3, x4, neg_same, neg_cross = _rank_parts(Gaa, Sap, Spp, M, eye, valid, inv_theta)
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
    # poison: NaN when a Gram diagonal is NaN or inf (a non-finite anchor row)
    return loss + 0.0 * tl.sum(tl.sum(tl.where(eye & valid, Gaa, 0.0), axis=1), axis=0), correct


@triton.jit
def _rank_bwd(Gaa, Sap, Spp, M, eye, valid, inv_theta, cap, gscale):
    """dL/dS blocks: (H_AA, H_AP, H_PP), H_AP[i, j] = dL/dS(a_i, p_j) for P rows in stored order."""
    x1, x2, x3, x4, neg_same, neg_cross = _rank_parts(Gaa, Sap, Spp, M, eye, valid, inv_theta)
    g1 = tl.where(neg_same & (x1 <= cap), tl.sigmoid(x1), 0.0) * gscale
    g2 = tl.where(neg_cross & (x2 <= cap), tl.sigmoid(x2), 0.0) * gscale
    g3 = tl.where(neg_same & (x3 <= cap), tl.sigmoid(x3), 0.0) * gscale
    g4 = tl.where(neg_cross & (x4 <= cap), tl.sigmoid(x4), 0.0) * gscale
    neg_a = tl.sum(g1, axis=1) + tl.sum(g2, axis=1)
    neg_p = tl.sum(g3, axis=1) + tl.sum(g4, axis=0)
    Hap = g2 + g4 - tl.where(M, neg_a[:, None], 0.0) - tl.where(M, neg_p[None, :], 0.0)
    return g1, Hap, g3


@triton.jit
def _block_setup(s, SP: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-program index set-up shared by both kernels: rows (SP,), cols0 (BLOCK_D,), row_ok (rows < s),
    eye and valid (SP, SP) masks."""
    rows = tl.arange(0, SP)
    cols0 = tl.arange(0, BLOCK_D)
    row_ok = rows < s
    eye = rows[:, None] == rows[None, :]
    valid = row_ok[:, None] & row_ok[None, :]
    return rows, cols0, row_ok, eye, valid


@triton.jit
def _sample_setup(perm_ptr, b, s_pb, s_ps, rows, row_ok, valid):
    sig = tl.load(perm_ptr + b * s_pb + rows.to(tl.int64) * s_ps, mask=row_ok, other=-1)
    return (sig[None, :] == rows[:, None]) & valid


@triton.jit
def _shuffle_rank_fwd_kernel(a_ptr, a2_ptr, y_ptr, perm_ptr, part_ptr,
                             B, s, d, per_prog, n_prog,
                             s_ab, s_as, s_ad, s_a2b, s_a2s, s_a2d, s_yb, s_ys, s_yd, s_pb, s_ps,
                             inv_theta, cap, coef0, coef2, acc_scale,
                             TWO: tl.constexpr, SP: tl.constexpr, BLOCK_D: tl.constexpr, EPS_: tl.constexpr):
    # One program = `per_prog` consecutive samples; part[k, pid] = its partial sum k of
    # (coef0 * terms(anchor), coef2 * terms(anchor2), acc_scale * correct(anchor), ... (anchor2)).
    pid = tl.program_id(0)
    rows, cols0, row_ok, eye, valid = _block_setup(s, SP, BLOCK_D)
    zero = tl.sum(tl.zeros((SP,), dtype=tl.float32), axis=0)
    loss0 = zero
    loss2 = zero
    hit0 = zero
    hit2 = zero
    for t in range(0, per_prog):
        b_raw = pid * per_prog + t
        live = b_raw < B
        b = tl.minimum(b_raw, B - 1).to(tl.int64)
        Gaa, Gay, Gyy, Gbb, Gby, m = _sample_grams(a_ptr, a2_ptr, y_ptr, b, s_ab, s_as, s_ad, s_a2b, s_a2s, s_a2d,
                                                   s_yb, s_ys, s_yd, rows, cols0, row_ok, d, TWO, SP, BLOCK_D)
        M = _sample_setup(perm_ptr, b, s_pb, s_ps, rows, row_ok, valid)
        q_r, q_c, nu_r, big_r, poison = _normalise(Gyy, m, eye, EPS_)
        Sap, Spp = _normalised_blocks(Gay, Gyy, q_r, q_c, SP, True)
        l, c = _rank_fwd(Gaa, Sap, Spp, M, eye, valid, row_ok, inv_theta, cap)
        loss0 += tl.where(live, l + poison, 0.0)
        hit0 += tl.where(live, c, 0.0)
        if TWO:
            l2, c2 = _rank_fwd(Gbb, _div_cols(Gby, q_c, SP), Spp, M, eye, valid, row_ok, inv_theta, cap)
            loss2 += tl.where(live, l2 + poison, 0.0)
            hit2 += tl.where(live, c2, 0.0)
    tl.store(part_ptr + pid, loss0 * coef0)
    tl.store(part_ptr + n_prog + pid, loss2 * coef2)
    tl.store(part_ptr + 2 * n_prog + pid, hit0 * acc_scale)
    tl.store(part_ptr + 3 * n_prog + pid, hit2 * acc_scale)


@triton.jit
def _shuffle_rank_bwd_kernel(a_ptr, a2_ptr, y_ptr, perm_ptr, g_ptr, g_stride,
                             da_ptr, da2_ptr, dy_ptr,
                             B, s, d, per_prog,
                             s_ab, s_as, s_ad, s_a2b, s_a2s, s_a2d, s_yb, s_ys, s_yd, s_pb, s_ps,
                             inv_theta, cap, gcoef0, gcoef2,
                             TWO: tl.constexpr, SP: tl.constexpr, BLOCK_D: tl.constexpr, EPS_: tl.constexpr):
    # Gradients are written to contiguous (B, s, d) buffers; one program = `per_prog` samples.
    pid = tl.program_id(0)
    rows, cols0, row_ok, eye, valid = _block_setup(s, SP, BLOCK_D)
    gs0 = tl.load(g_ptr).to(tl.float32) * gcoef0
    gs2 = gs0
    if TWO:
        gs2 = tl.load(g_ptr + g_stride).to(tl.float32) * gcoef2
    for t in range(0, per_prog):
        b_raw = pid * per_prog + t
        b = tl.minimum(b_raw, B - 1).to(tl.int64)
        ok = row_ok & (b_raw < B)
        Gaa, Gay, Gyy, Gbb, Gby, m = _sample_grams(a_ptr, a2_ptr, y_ptr, b, s_ab, s_as, s_ad, s_a2b, s_a2s, s_a2d,
                                                   s_yb, s_ys, s_yd, rows, cols0, row_ok, d, TWO, SP, BLOCK_D)
        M = _sample_setup(perm_ptr, b, s_pb, s_ps, rows, row_ok, valid)
        q_r, q_c, nu_r, big_r, poison = _normalise(Gyy, m, eye, EPS_)
        Sap, Spp = _normalised_blocks(Gay, Gyy, q_r, q_c, SP, False)
        Haa, Hap, Hpp = _rank_bwd(Gaa, Sap, Spp, M, eye, valid, inv_theta, cap, gs0)
        Hyy = Hpp + tl.trans(Hpp)
        # r_j = p_j . dL/dp_j from the Gram blocks (for the normalisation backward)
        r = tl.sum(Hyy * Spp, axis=1) + tl.sum(Hap * Sap, axis=0)
        Eaa = Haa + tl.trans(Haa)
        Eay = Hap / q_c[None, :]  # multiplies Ys (p_j = Ys_j / q_j)
        Eya = tl.trans(Hap) / nu_r[:, None]
        Ebb = Eaa
        Eby = Eay
        Eyb = Eya
        if TWO:
            Sbp = Gby / q_c[None, :]
            Hbb, Hbp, Hpp2 = _rank_bwd(Gbb, Sbp, Spp, M, eye, valid, inv_theta, cap, gs2)
            Hyy2 = Hpp2 + tl.trans(Hpp2)
            Hyy += Hyy2
            r += tl.sum(Hyy2 * Spp, axis=1) + tl.sum(Hbp * Sbp, axis=0)
            Ebb = Hbb + tl.trans(Hbb)
            Eby = Hbp / q_c[None, :]
            Eyb = tl.trans(Hbp) / nu_r[:, None]
        # dy_j = (g_j - [||y_j|| > eps] p_j (p_j . g_j)) / nu_j, g_j = sum_k Hyy[j,k] p_k + sum_i H[i,j] a_i;
        # in terms of Ys: p_k = Ys_k / q_k.
        proj = tl.where(big_r, r / q_r, 0.0)
        Eyy = (Hyy / q_c[None, :] - tl.where(eye, proj[:, None], 0.0)) / nu_r[:, None]
        inv_m = 1.0 / m
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + cols0
            A = _load_rows(a_ptr, b, s_ab, s_as, s_ad, rows, cols, row_ok, d)
            Ys = _load_rows(y_ptr, b, s_yb, s_ys, s_yd, rows, cols, row_ok, d) * inv_m[:, None]
            dA = _mix(Eaa, A) + _mix(Eay, Ys)
            dY = _mix(Eyy, Ys) + _mix(Eya, A)
            offs = b * s * d + rows[:, None].to(tl.int64) * d + cols[None, :]
            omask = ok[:, None] & (cols[None, :] < d)
            if TWO:
                A2 = _load_rows(a2_ptr, b, s_a2b, s_a2s, s_a2d, rows, cols, row_ok, d)
                dA2 = _mix(Ebb, A2) + _mix(Eby, Ys)
                dY += _mix(Eyb, A2)
                tl.store(da2_ptr + offs, dA2.to(da2_ptr.dtype.element_ty), mask=omask)
            tl.store(da_ptr + offs, dA.to(da_ptr.dtype.element_ty), mask=omask)
            tl.store(dy_ptr + offs, dY.to(dy_ptr.dtype.element_ty), mask=omask)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def forward(anchor, anchor2, shuffled, perm, inv_theta, cap, coef0, coef2, acc_scale):
    """The schema of torch.ops.dualvar.shuffle_rank_fwd: out (4,) fp32 = [coef0 * sum of terms(anchor),
    coef2 * sum of terms(anchor2) (0 without it), acc_scale * correct rows(anchor), ... (anchor2)]."""
    B, s, d = anchor.shape
    SP, BLOCK_D, num_warps, per_prog = triton_config(s, d, B)
    two = anchor2 is not None
    a2 = anchor2 if two else anchor
    n_prog = triton.cdiv(B, per_prog)
    part = torch.empty((4, n_prog), dtype=torch.float32, device=anchor.device)
    with device_guard(anchor):
        _shuffle_rank_fwd_kernel[(n_prog,)](anchor, a2, shuffled, perm, part, B, s, d, per_prog, n_prog,
                                            *_strides(anchor), *_strides(a2), *_strides(shuffled),
                                            perm.stride(0), perm.stride(1), inv_theta, cap, coef0, coef2, acc_scale,
                                            TWO=two, SP=SP, BLOCK_D=BLOCK_D, EPS_=EPS, num_warps=num_warps)
        return part.sum(dim=1)  # the programs' partial sums in a fixed order: the same bits on every run


def backward(anchor, anchor2, shuffled, perm, grad, inv_theta, cap, gcoef0, gcoef2):
    """The schema of torch.ops.dualvar.shuffle_rank_bwd: (d_anchor, d_anchor2 | None, d_shuffled) in the input
    dtype, contiguous; grad (n,): upstream gradient of the terms, term k scaled by grad[k] * gcoef_k."""
    B, s, d = anchor.shape
    SP, BLOCK_D, num_warps, per_prog = triton_config(s, d, B)
    two = anchor2 is not None
    a2 = anchor2 if two else anchor
    da = torch.empty((B, s, d), dtype=anchor.dtype, device=anchor.device)
    dy = torch.empty_like(da)
    da2 = torch.empty_like(da) if two else da
    grad = grad.to(torch.float32)
    with device_guard(anchor):
        _shuffle_rank_bwd_kernel[(triton.cdiv(B, per_prog),)](
            anchor, a2, shuffled, perm, grad, grad.stride(0), da, da2, dy, B, s, d, per_prog,
            *_strides(anchor), *_strides(a2), *_strides(shuffled), perm.stride(0), perm.stride(1),
            inv_theta, cap, gcoef0, gcoef2, TWO=two, SP=SP, BLOCK_D=BLOCK_D, EPS_=EPS, num_warps=num_warps)
    return da, (da2 if two else None), dy
