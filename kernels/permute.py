"""Frame permutation: uint8 clips + per-sample frame index maps -> normalised (B, C, T', H, W).

    out[b, c, t, h, w] = (video[b, frame_index[b, t], h, w', c] / 255 - mean[c]) / std[c]
    w' = W - 1 - w where hflip[b] else w

evaluated in float32 and cast to `out_dtype`. Segment shuffles, time reversal and identity are all
index maps (helpers below), so every training and evaluation batch goes through this one op.

Layout of this file: reference -> index-map helpers -> torch fallback -> Triton kernel and
launcher -> public function. The C++ CPU and CUDA kernels are in csrc/{cpu,cuda}/permute_frames.*.
All fast paths normalise through a per-channel 256-entry lookup table computed with the same
float32 ops as the reference, so every backend is bit-identical to it in every output dtype.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch

from ._dispatch import select
from ._ext import load_triton

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Stats = Union[Sequence[float], torch.Tensor]


# ----------------------------------------------------------------------------------- reference
def permute_frames_reference(video: torch.Tensor, frame_index: torch.Tensor, mean: Stats, std: Stats, *,
                             out_dtype: torch.dtype = torch.float32,
                             hflip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Naive per-sample transcription of the definition (the oracle for every backend)."""
    C = video.shape[-1]
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=video.device).reshape(C)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=video.device).reshape(C)
    outs = []
    for b in range(video.shape[0]):
        x = video[b, frame_index[b]]  # (T', H, W, C)
        if hflip is not None and bool(hflip[b]):
            x = x.flip(2)
        x = (x.to(torch.float32) / 255 - mean_t) / std_t
        outs.append(x.permute(3, 0, 1, 2).to(out_dtype))
    return torch.stack(outs).contiguous()


# ----------------------------------------------------------------------------- index maps
def identity_index(batch: int, frames: int, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """(batch, frames) int64 map that keeps every frame in place."""
    return torch.arange(frames, device=device).expand(batch, frames).contiguous()


def time_reverse_index(index: torch.Tensor, reverse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reverse each row of an index map; with `reverse` (bool (B,)), only the rows where it is True."""
    flipped = index.flip(1)
    if reverse is None:
        return flipped
    return torch.where(reverse.to(index.device).view(-1, 1), flipped, index)


def random_segment_permutation(batch: int, n_segments: int, *, generator: Optional[torch.Generator] = None,
                               derangement: bool = False,
                               device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """(batch, n_segments) int64: an independent uniform permutation per sample.

    With derangement=True no segment stays in place (rows are redrawn until they have no fixed
    point; needs n_segments >= 2). Draws come from `generator` on `device`, so each rank and step
    gets its own permutations when the generator is seeded per rank.
    """
    if n_segments < 1:
        raise ValueError(f"n_segments must be >= 1, got {n_segments}")
    if derangement and n_segments < 2:
        raise ValueError("a derangement needs at least 2 segments")
    if generator is not None:
        device = generator.device
    perm = torch.rand(batch, n_segments, generator=generator, device=device).argsort(dim=1)
    if derangement:
        slots = torch.arange(n_segments, device=perm.device)
        while True:
            bad = (perm == slots).any(dim=1)
            n_bad = int(bad.sum())
            if n_bad == 0:
                break
            perm[bad] = torch.rand(n_bad, n_segments, generator=generator, device=perm.device).argsort(dim=1)
    return perm


def segment_shuffle_index(index: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Apply a per-sample segment permutation to an index map.

    index (B, T) with T divisible by s = perm.shape[1]; shuffled segment j = original segment
    perm[b, j], i.e. out[b, j*L + k] = index[b, perm[b, j]*L + k] with L = T / s.
    """
    B, T = index.shape
    s = perm.shape[1]
    if perm.shape[0] != B:
        raise ValueError(f"perm has {perm.shape[0]} rows but the index map has {B}")
    if T % s:
        raise ValueError(f"{T} frames cannot be split into {s} equal segments")
    L = T // s
    segs = index.view(B, s, L)
    return segs.gather(1, perm.to(index.device).view(B, s, 1).expand(B, s, L)).reshape(B, T)


# ------------------------------------------------------------------------------ validation
def _check(video, frame_index, mean, std, out_dtype, hflip):
    if not isinstance(video, torch.Tensor) or video.dim() != 5:
        raise ValueError(f"video must be a 5-D uint8 tensor (B, T, H, W, C), got "
                         f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__}")
    if video.dtype != torch.uint8:
        raise TypeError(f"video must be uint8, got {video.dtype}")
    B, T, H, W, C = video.shape
    if C not in (1, 3):
        raise ValueError(f"video must have 1 or 3 channels in its last dim, got {C} (is it (B, T, C, H, W)?)")
    if not isinstance(frame_index, torch.Tensor) or frame_index.dim() != 2 or frame_index.shape[0] != B:
        raise ValueError(f"frame_index must be (B, T') = ({B}, T'), got "
                         f"{tuple(frame_index.shape) if isinstance(frame_index, torch.Tensor) else frame_index!r}")
    if frame_index.dtype != torch.int64:
        raise TypeError(f"frame_index must be int64, got {frame_index.dtype}")
    if frame_index.device != video.device:
        raise ValueError(f"frame_index is on {frame_index.device} but video is on {video.device}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    for name, v in (("mean", mean), ("std", std)):
        n = v.numel() if isinstance(v, torch.Tensor) else len(v)
        if n != C:
            raise ValueError(f"{name} has {n} values but video has {C} channels")
    std_t = torch.as_tensor(std, dtype=torch.float32).cpu()
    if not bool(torch.isfinite(std_t).all()) or bool((std_t == 0).any()):
        raise ValueError(f"std must be finite and non-zero, got {std_t.tolist()}")
    if hflip is not None:
        if not isinstance(hflip, torch.Tensor) or hflip.dtype != torch.bool or hflip.shape != (B,):
            raise ValueError(f"hflip must be a bool tensor of shape ({B},)")
        if hflip.device != video.device:
            raise ValueError(f"hflip is on {hflip.device} but video is on {video.device}")


def _check_range(frame_index, frames):
    """Index range, for the backends whose op does not check it itself (the compiled cpu and cuda
    ops raise the same IndexError; one device sync either way)."""
    if frame_index.numel():
        lo, hi = torch.stack(torch.aminmax(frame_index)).tolist()
        if lo < 0 or hi >= frames:
            raise IndexError(f"permute_frames: frame_index holds values in [{lo}, {hi}], outside [0, {frames}): "
                             f"video has {frames} frames")


@functools.lru_cache(maxsize=64)
def _lut_cached(mean: tuple, std: tuple, out_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(256, dtype=torch.float32, device=device)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1)
    return ((x / 255 - m) / s).to(out_dtype).contiguous()  # (C, 256): the reference's exact float32 ops


def normalization_lut(mean: Stats, std: Stats, out_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(C, 256) table lut[c, x] = ((x / 255 - mean[c]) / std[c]) in float32, cast to out_dtype."""
    as_tuple = lambda v: tuple(float(x) for x in (v.tolist() if isinstance(v, torch.Tensor) else v))
    return _lut_cached(as_tuple(mean), as_tuple(std), out_dtype, torch.device(device))


# --------------------------------------------------------------------------- torch fallback
def _permute_torch(video, frame_index, lut, mean, std, out_dtype, hflip):
    B, T, H, W, C = video.shape
    frames = video[torch.arange(B, device=video.device).view(B, 1), frame_index]  # (B, T', H, W, C) uint8
    if hflip is not None:
        frames = torch.where(hflip.view(B, 1, 1, 1, 1), frames.flip(3), frames)
    out = torch.empty((B, C, frame_index.shape[1], H, W), dtype=torch.float32, device=video.device)
    out.copy_(frames.permute(0, 4, 1, 2, 3))
    m = torch.as_tensor(mean, dtype=torch.float32, device=video.device).view(1, C, 1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=video.device).view(1, C, 1, 1, 1)
    out.div_(255).sub_(m).div_(s)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


# ------------------------------------------------------------------------------ compiled C++/CUDA
def _permute_compiled(video, frame_index, lut, mean, std, out_dtype, hflip):
    return torch.ops.dualvar.permute_frames(video, frame_index, lut, hflip)


# --------------------------------------------------------------------------------- Triton
_triton, _ = load_triton()
if _triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _permute_frames_kernel(video_ptr, index_ptr, flip_ptr, lut_ptr, out_ptr,
                               T_out, H, W,
                               s_vb, s_vt, s_vh, s_vw,
                               C: tl.constexpr, HAS_FLIP: tl.constexpr, BLOCK_W: tl.constexpr):
        # One program = BLOCK_W pixels of one output row (b, t, h), all C channels.
        row = tl.program_id(0).to(tl.int64)
        h = row % H
        bt = row // H
        t = bt % T_out
        b = bt // T_out
        w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        mask = w < W
        src_t = tl.load(index_ptr + b * T_out + t)
        w_src = w
        if HAS_FLIP:
            flip = tl.load(flip_ptr + b)
            w_src = tl.where(flip != 0, W - 1 - w, w)
        src = video_ptr + b * s_vb + src_t * s_vt + h * s_vh + w_src.to(tl.int64) * s_vw
        plane = T_out * H * W
        dst = out_ptr + b * C * plane + (t * H + h) * W + w
        for c in tl.static_range(C):
            x = tl.load(src + c, mask=mask, other=0).to(tl.int32)
            v = tl.load(lut_ptr + c * 256 + x, mask=mask)
            tl.store(dst + c * plane, v, mask=mask)

    def _permute_triton(video, frame_index, lut, mean, std, out_dtype, hflip):
        B, T, H, W, C = video.shape
        if video.stride(4) != 1:
            video = video.contiguous()
        T_out = frame_index.shape[1]
        frame_index = frame_index.contiguous()
        out = torch.empty((B, C, T_out, H, W), dtype=out_dtype, device=video.device)
        if out.numel() == 0:
            return out
        BLOCK_W = max(16, min(256, triton.next_power_of_2(W)))
        flip = hflip.view(torch.uint8) if hflip is not None else frame_index  # dummy pointer when unused
        grid = (B * T_out * H, triton.cdiv(W, BLOCK_W))
        _permute_frames_kernel[grid](video, frame_index, flip, lut, out, T_out, H, W,
                                     video.stride(0), video.stride(1), video.stride(2), video.stride(3),
                                     C=C, HAS_FLIP=hflip is not None, BLOCK_W=BLOCK_W)
        return out


# ------------------------------------------------------------------------------ public function
_IMPLS = {"torch": _permute_torch, "cpu": _permute_compiled, "cuda": _permute_compiled}
if _triton is not None:
    _IMPLS["triton"] = _permute_triton


def permute_frames(video: torch.Tensor, frame_index: torch.Tensor, mean: Stats, std: Stats, *,
                   out_dtype: torch.dtype = torch.float32, hflip: Optional[torch.Tensor] = None,
                   backend: str = "auto") -> torch.Tensor:
    """Gather, flip, normalise and re-layout uint8 clips in one pass.

    Args:
        video: uint8 (B, T, H, W, C), C in {1, 3}.
        frame_index: int64 (B, T'), source frame of each output frame, per sample.
        mean, std: C per-channel statistics on the [0, 1] scale.
        out_dtype: float32, float16 or bfloat16.
        hflip: optional bool (B,), mirror sample b horizontally.
        backend: "auto", "triton", "cuda", "cpu" or "torch".
    Returns:
        (B, C, T', H, W) tensor of out_dtype, contiguous.
    """
    _check(video, frame_index, mean, std, out_dtype, hflip)
    chosen = select("permute_frames", _IMPLS, video.device, backend)
    if chosen not in ("cpu", "cuda"):
        _check_range(frame_index, video.shape[1])
    lut = normalization_lut(mean, std, out_dtype, video.device)
    return _IMPLS[chosen](video, frame_index, lut, mean, std, out_dtype, hflip)
