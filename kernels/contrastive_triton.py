"""Triton kernels of the fused contrastive primitive and their launchers (see contrastive.py for the math).

    forward   _contrastive_fwd_kernel: one program per BLOCK_M rows, online max/sum over column tiles in
              base 2 (exp2 with log2(e)/tau folded into one scale); stores fp32 lse per row.
    backward  _contrastive_bwd_kernel: out[r] = sum_c H[r, c] y[c] with
                  H = scale * (ROW_TERM: g_r exp(s/tau - lse_r) + COL_TERM: g_c exp(s/tau - lse_c)),
              one recompute of each tile. dq: rows = q, cols = k, ROW_TERM. dk: rows = k, cols = q,
              COL_TERM. SimCLR (q = k = z, self excluded): both terms in one pass, dz = (G + G^T) z,
              with no atomics and no second kernel.
The rows x columns matrix never exists; extra memory is the fp32 lse (R,) and fp32 gradient
buffers. Inputs fp32/fp16/bf16; fp32 uses three-pass TF32 products (INPUT_PRECISION).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._ext import device_guard

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_DIM = 1024


def block_config(kind: str, D: int, dtype: torch.dtype) -> dict:
    """Tile sizes for the "fwd" or "bwd" kernel at embedding dim D; raises past what is supported.

    Chosen by ahead-of-time compilation for sm_90 and sm_80 (tests/test_contrastive.py asserts the
    shared memory limits, and no register spills for D <= 128): 16-bit inputs use tensor cores
    directly; float32 inputs use three-pass TF32 ("tf32x3", close to float32 accuracy) at smaller tiles.
    """
    if D < 1 or D > MAX_DIM:
        raise ValueError(f"the triton contrastive kernels support embedding dims 1..{MAX_DIM}, got {D}")
    if dtype == torch.float32:
        bm, bn, bd, warps = 64, 32, 64, 4
    elif kind == "fwd":
        bm, bn, bd, warps = (128, 64, 128, 8) if D <= 256 else (64, 64, 128, 4)
    else:
        bm, bn, bd, warps = 128, 64, 64, 8
    bd = max(16, min(bd, triton.next_power_of_2(D)))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, D_CHUNKS=triton.cdiv(D, bd), num_warps=warps, num_stages=2)


@triton.jit
def _contrastive_fwd_kernel(Q, K, LSE, R, C, D, stride_q, stride_k, scale_log2, offset,
                    HAS_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    dd = tl.arange(0, BLOCK_D)
    q_ptrs = Q + rows.to(tl.int64)[:, None] * stride_q + dd[None, :]
    q0 = tl.load(q_ptrs, mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, C, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < C
        k_ptrs = K + cols.to(tl.int64)[None, :] * stride_k + dd[:, None]
        kt = tl.load(k_ptrs, mask=cmask[None, :] & (dd[:, None] < D), other=0.0)
        s = tl.dot(q0, kt, input_precision=INPUT_PRECISION)
        for dc in range(1, D_CHUNKS):
            d = dc * BLOCK_D + dd
            qc = tl.load(q_ptrs + dc * BLOCK_D, mask=rmask[:, None] & (d[None, :] < D), other=0.0)
            kc = tl.load(k_ptrs + dc * BLOCK_D, mask=cmask[None, :] & (d[:, None] < D), other=0.0)
            s += tl.dot(qc, kc, input_precision=INPUT_PRECISION)
        valid = cmask[None, :]
        if HAS_OFFSET:
            valid = valid & (cols[None, :] != rows[:, None] + offset)
        s = tl.where(valid, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m = m_new
    lse = (m + tl.log2(l)) * 0.6931471805599453
    tl.store(LSE + rows, lse, mask=rmask)


@triton.jit
def _contrastive_bwd_kernel(X, Y, LSE_R, G_R, LSE_C, G_C, OUT, R, C, D, stride_x, stride_y, stride_o,
                    scale, scale_log2, offset,
                    HAS_OFFSET: tl.constexpr, ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    D_CHUNKS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # Program (pid_m, pid_d) writes out[rows, d-chunk pid_d]; each tile's logits are recomputed once
    # (over all D chunks) and used for that output chunk only.
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    dd = tl.arange(0, BLOCK_D)
    x_ptrs = X + rows.to(tl.int64)[:, None] * stride_x + dd[None, :]
    x0 = tl.load(x_ptrs, mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
    if ROW_TERM:
        lse_r = tl.load(LSE_R + rows, mask=rmask, other=0.0) * 1.4426950408889634
        g_r = tl.load(G_R + rows, mask=rmask, other=0.0) * scale
    d_out = pid_d * BLOCK_D + dd
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < C
        y_ptrs = Y + cols.to(tl.int64)[None, :] * stride_y + dd[:, None]
        yt = tl.load(y_ptrs, mask=cmask[None, :] & (dd[:, None] < D), other=0.0)
        s = tl.dot(x0, yt, input_precision=INPUT_PRECISION)
        for dc in range(1, D_CHUNKS):
            d = dc * BLOCK_D + dd
            xc = tl.load(x_ptrs + dc * BLOCK_D, mask=rmask[:, None] & (d[None, :] < D), other=0.0)
            yc = tl.load(y_ptrs + dc * BLOCK_D, mask=cmask[None, :] & (d[:, None] < D), other=0.0)
            s += tl.dot(xc, yc, input_precision=INPUT_PRECISION)
        s = s * scale_log2
        h = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if ROW_TERM:
            h += g_r[:, None] * tl.exp2(s - lse_r[:, None])
        if COL_TERM:
            lse_c = tl.load(LSE_C + cols, mask=cmask, other=0.0) * 1.4426950408889634
            g_c = tl.load(G_C + cols, mask=cmask, other=0.0) * scale
            h += g_c[None, :] * tl.exp2(s - lse_c[None, :])
        valid = cmask[None, :] & rmask[:, None]
        if HAS_OFFSET:
            valid = valid & (cols[None, :] != rows[:, None] + offset)
        h = tl.where(valid, h, 0.0)
        y_out = tl.load(Y + cols.to(tl.int64)[:, None] * stride_y + d_out[None, :],
                        mask=cmask[:, None] & (d_out[None, :] < D), other=0.0)
        acc += tl.dot(h.to(y_out.dtype), y_out, input_precision=INPUT_PRECISION)
    tl.store(OUT + rows.to(tl.int64)[:, None] * stride_o + d_out[None, :], acc,
             mask=rmask[:, None] & (d_out[None, :] < D))


def _precision(x: torch.Tensor) -> str:
    return "tf32x3" if x.dtype == torch.float32 else "tf32"  # ignored for 16-bit operands


def _prep(x: torch.Tensor) -> torch.Tensor:
    """Feature matrices: the kernels take a row stride (any, 0 included) and need unit column stride."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton contrastive kernels take float32/float16/bfloat16, got {x.dtype}")
    return x if x.stride(1) == 1 else x.contiguous()


def _vec(x):
    """Per-row vectors (lse, g) are read at unit stride."""
    return x if x is None or x.stride(0) == 1 else x.contiguous()


def forward(q, k, tau, offset):
    q, k = _prep(q), _prep(k)
    R, D = q.shape
    C = k.shape[0]
    cfg = block_config("fwd", D, q.dtype)
    lse = torch.empty(R, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(R, cfg["BLOCK_M"]),)
    with device_guard(q):
        _contrastive_fwd_kernel[grid](q, k, lse, R, C, D, q.stride(0), k.stride(0), LOG2E / tau,
                              0 if offset is None else offset, HAS_OFFSET=offset is not None,
                              BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                              D_CHUNKS=cfg["D_CHUNKS"], INPUT_PRECISION=_precision(q),
                              num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return lse


def _half_scale(g_r, g_c, tau):
    """A power of two that moves the largest possible |H| = 2 max|g| / tau to 2^14 (no sync).

    For float16 inputs the kernel casts H = g exp(s/tau - lse) / tau to float16 for the H @ y product:
    unscaled, H ~ g / (tau M) sinks into subnormals (< 6.1e-5) at large M or a small loss weight, and a
    loss-scaled g (AMP's GradScaler) overflows 65504 at small M. Scaling g by a power of two is exact
    and is undone on the float32 output."""
    gs = [g for g in ((g_r,) if g_c is g_r else (g_r, g_c)) if g is not None]
    gmax = torch.stack([g.abs().amax() for g in gs]).amax()
    return torch.exp2(torch.floor(torch.log2(2.0 ** 14 * tau / (2 * gmax)))).clamp(2.0 ** -60, 2.0 ** 60)


def _bwd(x, y, lse_r, g_r, lse_c, g_c, tau, offset):
    same = g_c is g_r  # SimCLR passes one g as both terms
    lse_r, g_r, lse_c = _vec(lse_r), _vec(g_r), _vec(lse_c)
    g_c = g_r if same else _vec(g_c)
    R, D = x.shape
    C = y.shape[0]
    cfg = block_config("bwd", D, x.dtype)
    out = torch.empty((R, D), dtype=torch.float32, device=x.device)
    hs = _half_scale(g_r, g_c, tau) if x.dtype == torch.float16 else None
    if hs is not None:  # scale a shared g once
        g_r = None if g_r is None else g_r * hs
        g_c = g_r if same else (None if g_c is None else g_c * hs)
    dummy = lse_r if lse_r is not None else lse_c
    grid = (triton.cdiv(R, cfg["BLOCK_M"]), cfg["D_CHUNKS"])
    with device_guard(x):
        _contrastive_bwd_kernel[grid](x, y, lse_r if lse_r is not None else dummy, g_r if g_r is not None else dummy,
                              lse_c if lse_c is not None else dummy, g_c if g_c is not None else dummy, out,
                              R, C, D, x.stride(0), y.stride(0), out.stride(0), 1.0 / tau, LOG2E / tau,
                              0 if offset is None else offset, HAS_OFFSET=offset is not None,
                              ROW_TERM=lse_r is not None, COL_TERM=lse_c is not None,
                              BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                              D_CHUNKS=cfg["D_CHUNKS"], INPUT_PRECISION=_precision(x),
                              num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out if hs is None else out.div_(hs)


def backward(q, k, tau, offset, lse, grad, need_q, need_k):
    """(dq | None, dk | None). q is k (SimCLR, self excluded): the whole gradient as dq, dk None."""
    if q is k and offset == 0 and need_q and need_k:
        return backward_sym(q, tau, lse, grad), None
    q, k = _prep(q), _prep(k)
    dq = _bwd(q, k, lse, grad, None, None, tau, offset) if need_q else None
    # dk: rows are k, columns are q; row b of k is excluded from column b - offset of q.
    dk = _bwd(k, q, None, None, lse, grad, tau, None if offset is None else -offset) if need_k else None
    return dq, dk


def backward_sym(z, tau, lse, grad):
    """dz = (G + G^T) z in one pass: both terms per tile, no atomics, no second kernel."""
    z = _prep(z)
    return _bwd(z, z, lse, grad, lse, grad, tau, 0)
