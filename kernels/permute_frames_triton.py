"""Triton kernel of permute_frames and its launcher (see permute_frames.py for the definition).

One program writes BLOCK_W pixels of one output row (b, t, h) for all C channels: it reads the
source frame from the index map, mirrors w when the sample's hflip flag is set, and normalises
through the (C, 256) lookup table. Every input is addressed through its strides; every offset that
can pass 2^31 (batch, frame, plane) is computed in int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._ext import device_guard


@triton.jit
def _permute_frames_kernel(video_ptr, index_ptr, flip_ptr, lut_ptr, out_ptr,
                           T_out, H, W,
                           s_vb, s_vt, s_vh, s_vw, s_vc, s_ib, s_it, s_flip,
                           C: tl.constexpr, HAS_FLIP: tl.constexpr, BLOCK_W: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (b, t, h) flattened: B * T_out * H can pass 2^31
    h = row % H
    bt = row // H
    t = bt % T_out
    b = bt // T_out
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = w < W
    src_t = tl.load(index_ptr + b * s_ib + t * s_it)
    w_src = w
    if HAS_FLIP:
        flip = tl.load(flip_ptr + b * s_flip)
        w_src = tl.where(flip != 0, W - 1 - w, w)
    src = video_ptr + b * s_vb + src_t * s_vt + h * s_vh + w_src.to(tl.int64) * s_vw
    plane = tl.cast(T_out, tl.int64) * H * W  # one channel of one sample: T_out*H*W can pass 2^31
    dst = out_ptr + b * C * plane + (t * H + h) * W + w
    for c in tl.static_range(C):
        x = tl.load(src + c * s_vc, mask=mask, other=0).to(tl.int32)
        v = tl.load(lut_ptr + c * 256 + x, mask=mask)
        tl.store(dst + c * plane, v, mask=mask)


def block_w(W: int) -> int:
    """Pixels per program along a row."""
    return max(16, min(256, triton.next_power_of_2(W)))


def forward(video, frame_index, lut, mean, std, out_dtype, hflip):
    """video uint8 (B, T, H, W, C) any strides, frame_index int64 (B, T') any strides, lut (C, 256) of
    out_dtype (it holds mean and std), hflip bool (B,) any stride (0 included) or None."""
    B, T, H, W, C = video.shape
    T_out = frame_index.shape[1]
    out = torch.empty((B, C, T_out, H, W), dtype=lut.dtype, device=video.device)
    if out.numel() == 0:
        return out
    lut = lut.contiguous()
    # bool and uint8 share a byte; with no hflip the index map stands in as a pointer never read
    flip = hflip.view(torch.uint8) if hflip is not None else frame_index
    s_flip = hflip.stride(0) if hflip is not None else 0
    grid = (B * T_out * H, triton.cdiv(W, block_w(W)))
    with device_guard(video):
        _permute_frames_kernel[grid](video, frame_index, flip, lut, out, T_out, H, W,
                                     *video.stride()[:4], video.stride(4), *frame_index.stride(), s_flip,
                                     C=C, HAS_FLIP=hflip is not None, BLOCK_W=block_w(W))
    return out
