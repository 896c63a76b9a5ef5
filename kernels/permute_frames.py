"""Frame permutation: uint8 clips + per-sample frame index maps -> normalised (B, C, T', H, W).

    out[b, c, t, h, w] = (video[b, frame_index[b, t], h, w', c] / 255 - mean[c]) / std[c]
    w' = W - 1 - w where hflip[b] else w

evaluated in float32 and cast to `out_dtype`. Segment shuffles, time reversal and identity are all
index maps (helpers below), so every training and evaluation batch goes through this one op.

Layout of this file: reference -> input checks -> torch backend -> compiled launcher (csrc/:
permute_frames) -> public function (no autograd function: the op has no gradient) -> the index-map
helpers that build frame_index. The
Triton kernel and its launcher are in permute_frames_triton.py. All fast paths normalise through a
per-channel 256-entry lookup table computed with the same float32 ops as the reference, so every
backend is bit-identical to it in every output dtype.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional, Sequence, Union

import torch

from ._dispatch import OpImpl, impl_table, select, triton_impl
from ._ext import compiled_op_reason, register_fakes

OP = "permute_frames"
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Stats = Union[float, Sequence[float], torch.Tensor]


# ----------------------------------------------------------------------------------- reference
def permute_frames_reference(video: torch.Tensor, frame_index: torch.Tensor, mean: Stats, std: Stats, *,
                             out_dtype: torch.dtype = torch.float32,
                             hflip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Naive per-sample transcription of the definition (the oracle for every backend).

    mean, std: C values (or one value for every channel)."""
    C = video.shape[-1]
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1).expand(C).to(video.device)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1).expand(C).to(video.device)
    outs = []
    for b in range(video.shape[0]):
        x = video[b, frame_index[b]]  # (T', H, W, C)
        if hflip is not None and bool(hflip[b]):
            x = x.flip(2)
        x = (x.to(torch.float32) / 255 - mean_t) / std_t
        outs.append(x.permute(3, 0, 1, 2).to(out_dtype))
    return torch.stack(outs).contiguous()


# ---------------------------------------------------------------------------------- input checks
def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


STATS_FORMS = "a number, a sequence of C numbers, or a tensor of C (or 1) values"


def _stats(name: str, v, C: int) -> tuple:
    """mean/std as C Python floats. Accepted: one number (every channel), a sequence of C numbers, a
    tensor holding C values or one value (any shape: (C,), (1, C), (C, 1, 1), 0-d)."""
    if isinstance(v, torch.Tensor):
        if v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{name} must be {STATS_FORMS}, got a {v.dtype} tensor")
        if v.requires_grad:
            raise ValueError(f"{name} is a tensor that requires grad; permute_frames has no gradient (detach it)")
        values = v.detach().reshape(-1).tolist()
    elif isinstance(v, numbers.Real) and not isinstance(v, bool):
        values = [v]
    elif hasattr(v, "__len__") and hasattr(v, "__getitem__") and not isinstance(v, str):  # list, tuple, array
        values = list(v)
        if not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in values):
            raise TypeError(f"{name} must be {STATS_FORMS}, got a sequence holding "
                            f"{sorted({type(x).__name__ for x in values})}")
    else:
        raise TypeError(f"{name} must be {STATS_FORMS}, got {type(v).__name__}")
    if len(values) == 1:
        values = values * C
    if len(values) != C:
        raise ValueError(f"{name} has {len(values)} values but video has {C} channels "
                         f"({name} must be {STATS_FORMS})")
    return tuple(float(x) for x in values)


def _check(video, frame_index, mean, std, out_dtype, hflip):
    """Every argument, before any kernel runs. Returns mean and std as C-tuples of floats."""
    if not isinstance(video, torch.Tensor) or video.dim() != 5:
        raise ValueError(f"video must be a 5-D uint8 tensor (B, T, H, W, C), got {_shape(video)}")
    if video.dtype != torch.uint8:
        raise TypeError(f"video must be uint8, got {video.dtype}")
    B, T, H, W, C = video.shape
    if C not in (1, 3):
        raise ValueError(f"video must have 1 or 3 channels in its last dim, got {C} (is it (B, T, C, H, W)?)")
    if not isinstance(frame_index, torch.Tensor) or frame_index.dim() != 2 or frame_index.shape[0] != B:
        raise ValueError(f"frame_index must be (B, T') = ({B}, T'), got "
                         f"{_shape(frame_index) if isinstance(frame_index, torch.Tensor) else repr(frame_index)}")
    if frame_index.dtype != torch.int64:
        raise TypeError(f"frame_index must be int64, got {frame_index.dtype}")
    if frame_index.device != video.device:
        raise ValueError(f"frame_index is on {frame_index.device} but video is on {video.device}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")
    mean, std = _stats("mean", mean, C), _stats("std", std, C)
    if not all(math.isfinite(s) and s != 0 for s in std):
        raise ValueError(f"std must be finite and non-zero, got {list(std)}")
    if hflip is not None:
        if not isinstance(hflip, torch.Tensor) or hflip.dtype != torch.bool or hflip.shape != (B,):
            got = f"{hflip.dtype} {_shape(hflip)}" if isinstance(hflip, torch.Tensor) else _shape(hflip)
            raise ValueError(f"hflip must be a bool tensor of shape ({B},), got {got}")
        if hflip.device != video.device:
            raise ValueError(f"hflip is on {hflip.device} but video is on {video.device}")
    return mean, std


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
    """(C, 256) table lut[c, x] = ((x / 255 - mean[c]) / std[c]) in float32, cast to out_dtype.
    mean, std: as permute_frames takes them; C is the larger of their lengths."""
    count = lambda v: v.numel() if isinstance(v, torch.Tensor) else (len(v) if hasattr(v, "__len__") else 1)
    C = max(count(mean), count(std))
    return _lut_cached(_stats("mean", mean, C), _stats("std", std, C), out_dtype, torch.device(device))


# --------------------------------------------------------------------------------- torch backend
def _permute_torch(video, frame_index, lut, mean, std, out_dtype, hflip):
    B, T, H, W, C = video.shape
    frames = video[torch.arange(B, device=video.device).view(B, 1), frame_index]  # (B, T', H, W, C) uint8
    if hflip is not None:
        frames = torch.where(hflip.view(B, 1, 1, 1, 1), frames.flip(3), frames)
    out = torch.empty((B, C, frame_index.shape[1], H, W), dtype=torch.float32, device=video.device)
    out.copy_(frames.permute(0, 4, 1, 2, 3))
    m = torch.tensor(mean, dtype=torch.float32, device=video.device).view(1, C, 1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=video.device).view(1, C, 1, 1, 1)
    out.div_(255).sub_(m).div_(s)  # the reference's float32 ops, in place
    return out if out_dtype == torch.float32 else out.to(out_dtype)


# ------------------------------------------------------------------------- compiled launcher (C++/CUDA)
def _permute_compiled(video, frame_index, lut, mean, std, out_dtype, hflip):
    return torch.ops.dualvar.permute_frames(video, frame_index, lut, hflip)


register_fakes({"permute_frames": lambda video, frame_index, lut, hflip: video.new_empty(
    (video.shape[0], video.shape[4], frame_index.shape[1], video.shape[2], video.shape[3]), dtype=lut.dtype)})

# Every backend: forward(video, frame_index, lut, mean, std, out_dtype, hflip) -> (B, C, T', H, W) contiguous
# (lut: normalization_lut(mean, std, out_dtype); mean, std: C-tuples of floats); no backward.
_IMPLS: dict[str, OpImpl] = impl_table(OpImpl(_permute_torch), OpImpl(_permute_compiled),
                                        triton_impl("permute_frames_triton"))


def _veto(b: str) -> Optional[str]:
    return compiled_op_reason(OP) if b in ("cpu", "cuda") else None


# ------------------------------------------------------------------------------ public function
def permute_frames(video: torch.Tensor, frame_index: torch.Tensor, mean: Stats, std: Stats, *,
                   out_dtype: torch.dtype = torch.float32, hflip: Optional[torch.Tensor] = None,
                   backend: str = "auto") -> torch.Tensor:
    """Gather, flip, normalise and re-layout uint8 clips in one pass.

    Args:
        video: uint8 (B, T, H, W, C), C in {1, 3}.
        frame_index: int64 (B, T'), source frame of each output frame, per sample.
        mean, std: per-channel statistics on the [0, 1] scale: a sequence of C numbers, a tensor of C
            values (any shape, e.g. (C,) or (1, C)), or one number for every channel.
        out_dtype: float32, float16 or bfloat16.
        hflip: optional bool (B,), mirror sample b horizontally (any stride, e.g. a column of a mask).
        backend: "auto", "triton", "cuda", "cpu" or "torch".
    Returns:
        (B, C, T', H, W) tensor of out_dtype, contiguous. Any input strides (sliced, expanded,
        channels-last) give the same values as contiguous inputs.
    """
    mean, std = _check(video, frame_index, mean, std, out_dtype, hflip)
    chosen = select(OP, _IMPLS, video.device, backend, _veto)
    if chosen not in ("cpu", "cuda"):
        _check_range(frame_index, video.shape[1])
    lut = _lut_cached(mean, std, out_dtype, video.device)
    return _IMPLS[chosen].forward(video, frame_index, lut, mean, std, out_dtype, hflip)


# ------------------------------------------------------------------ index maps (public helpers)
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
