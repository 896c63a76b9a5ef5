"""Temporal sampling: pure functions of (L, rng) -> frame index arrays (docs/method.md §1.2, §5.2, §6.2).

All functions take the video length L (frames, >= 1) and, where random, a `numpy.random.Generator`,
and return int64 indices in [0, L - 1].
"""
from __future__ import annotations

import numpy as np


def _check_length(L: int) -> int:
    L = int(L)
    if L < 1:
        raise ValueError(f"video length must be >= 1 frame, got {L}")
    return L


def clip_indices(centre: int, L: int, frames: int = 16, stride: int = 4) -> np.ndarray:
    """int64 (frames,): idx_k = clamp(centre + (k - frames // 2) * stride, 0, L - 1)."""
    L = _check_length(L)
    k = np.arange(frames, dtype=np.int64)
    return np.clip(int(centre) + (k - frames // 2) * int(stride), 0, L - 1)


def pretrain_indices(L: int, rng: np.random.Generator, frames: int = 16, stride: int = 4,
                     reverse_prob: float = 0.5) -> tuple[np.ndarray, bool]:
    """Three-view pretraining indices (docs/method.md §1.2).

    Two centres c1, c2 drawn independently and uniformly from {0..L-1}; clip i takes
    clamp(c_i + (k - T/2) * ds, 0, L-1). With probability `reverse_prob` both index lists are
    reversed (time reversal, one decision per video). View 2 reuses view 1's (= clip 1's) frames.

    Returns (int64 (3, frames) indices for views 0, 1, 2; time_reverse flag).
    """
    L = _check_length(L)
    c1, c2 = rng.integers(0, L, size=2)
    reverse = bool(rng.random() < reverse_prob)
    a, b = clip_indices(c1, L, frames, stride), clip_indices(c2, L, frames, stride)
    if reverse:
        a, b = a[::-1], b[::-1]
    return np.stack([a, b, a]).astype(np.int64), reverse


def finetune_indices(L: int, rng: np.random.Generator, frames: int = 16, stride: int = 2) -> np.ndarray:
    """One fine-tuning clip (docs/method.md §5.2): start uniform in [0, L - 1 - (T-1)*ds], frames start + ds*k.

    A video shorter than the clip span ((T-1)*ds + 1 frames) takes every ds-th frame from 0 and is
    padded to T frames by repeating its first or its last frame (side chosen with p = 0.5).
    Returns int64 (frames,).
    """
    L = _check_length(L)
    span = (frames - 1) * stride + 1
    if L >= span:
        start = int(rng.integers(0, L - span + 1))
        return start + stride * np.arange(frames, dtype=np.int64)
    own = np.arange(0, L, stride, dtype=np.int64)[:frames]
    pad = frames - own.size
    if rng.random() < 0.5:
        return np.concatenate([np.full(pad, own[0], np.int64), own])
    return np.concatenate([own, np.full(pad, own[-1], np.int64)])


def eval_indices(L: int, frames: int = 16, stride: int = 2, clips: int = 10) -> np.ndarray:
    """Temporal ten-clip test indices (docs/method.md §6.2), deterministic.

    Centres linspace(lo, hi, clips) with lo = min(T, L), hi = max(lo, L - T); start =
    max(0, floor(centre - T)); frames start + ds*k clamped to L - 1, with T = `frames`. Returns int64
    (clips, frames). The reference hard-codes 16 in place of T (its clips are 16 frames): the same numbers
    for the paper's clips; for shorter clips the ten centres then spread over the whole video instead of
    crowding its first 2·16 frames.
    """
    L = _check_length(L)
    lo = min(frames, L)
    hi = max(lo, L - frames)
    centres = np.linspace(lo, hi, clips)
    starts = np.maximum(0, np.floor(centres - frames)).astype(np.int64)
    idx = starts[:, None] + stride * np.arange(frames, dtype=np.int64)[None, :]
    return np.minimum(idx, L - 1)
