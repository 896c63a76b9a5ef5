"""Shuffle-rank loss (METHOD.md 3.3): each series vector must be closer to its counterpart in the
other set than to any other series of the sample.

For one sample, X = [a_0..a_{s-1}; p_0..p_{s-1}] (2s rows, unit vectors), S = X X^T, c(i) the
counterpart of row i (i +- s), and for every j not in {i, c(i)}:

    x_ij = (S_ij - S_{i,c(i)}) / theta,     term_ij = softplus(min(x_ij, cap))

R = weight * mean over (b, i, j) of term_ij. P is the calibrated shuffled series: the shuffled
clip's chunk j describes original segment perm[b, j], so P[b, perm[b, j]] = normalize(shuffled[b, j]),
i.e. P[b, k] = normalize(shuffled[b, argsort(perm[b])[k]]).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import select


def _calibrate(shuffled: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Normalise each chunk and undo the segment permutation (a gather with the inverse perm)."""
    p = F.normalize(shuffled, dim=-1, eps=1e-12)
    inv = perm.argsort(dim=1)
    return p.gather(1, inv.unsqueeze(-1).expand_as(p))


def shuffle_rank_loss_reference(anchor: torch.Tensor, shuffled: torch.Tensor, perm: torch.Tensor,
                                theta: float = 0.05, *, cap: float = 5.0, weight: float = 1.0) -> torch.Tensor:
    """Naive transcription: Gram matrix per sample, explicit negative mask, capped softplus, mean."""
    B, s, _ = anchor.shape
    x = torch.cat([anchor, _calibrate(shuffled, perm)], dim=1)  # (B, 2s, d)
    S = x @ x.transpose(1, 2)  # (B, 2s, 2s)
    idx = torch.arange(2 * s, device=x.device)
    counterpart = (idx + s) % (2 * s)
    pos = S[:, idx, counterpart]  # (B, 2s)
    neg_mask = (idx.view(-1, 1) != idx.view(1, -1)) & (counterpart.view(-1, 1) != idx.view(1, -1))
    diff = (S - pos.unsqueeze(-1)) / theta
    terms = F.softplus(diff.clamp(max=cap))
    return weight * terms[:, neg_mask].mean()


def _check(anchor, shuffled, perm, theta, cap):
    if anchor.dim() != 3 or shuffled.shape != anchor.shape:
        raise ValueError(f"anchor and shuffled must both be (B, s, d), got {tuple(anchor.shape)} and "
                         f"{tuple(shuffled.shape)}")
    B, s, _ = anchor.shape
    if s < 2:
        raise ValueError(f"shuffle-rank needs at least 2 series per clip, got s={s}")
    if perm.shape != (B, s) or perm.dtype != torch.int64:
        raise ValueError(f"perm must be int64 (B, s) = ({B}, {s}), got {perm.dtype} {tuple(perm.shape)}")
    if perm.device != anchor.device or shuffled.device != anchor.device:
        raise ValueError("anchor, shuffled and perm must be on one device")
    if not bool((perm.sort(dim=1).values == torch.arange(s, device=perm.device)).all()):
        raise ValueError("every row of perm must be a permutation of 0..s-1")
    if not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"theta must be a positive finite number, got {theta!r}")
    if math.isnan(cap):
        raise ValueError("cap must be a number or +inf, got NaN")


def _shuffle_rank_torch(anchor, shuffled, perm, theta, cap, weight):
    return shuffle_rank_loss_reference(anchor, shuffled, perm, theta, cap=cap, weight=weight)


_IMPLS = {"torch": _shuffle_rank_torch}


def shuffle_rank_loss(anchor: torch.Tensor, shuffled: torch.Tensor, perm: torch.Tensor, theta: float = 0.05, *,
                      cap: float = 5.0, weight: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Shuffle-rank loss R(anchor, calibrated(shuffled)).

    Args:
        anchor: (B, s, d) unit series vectors of the unshuffled clip.
        shuffled: (B, s, d) series vectors of the shuffled clip, in shuffled order (normalised here).
        perm: int64 (B, s); shuffled segment j is original segment perm[b, j].
        theta: ranking temperature. cap: clamp of the scaled difference (float("inf") = MoCo variant).
        weight: w multiplying the mean.
    Returns:
        scalar loss.
    """
    _check(anchor, shuffled, perm, theta, cap)
    chosen = select("shuffle_rank", _IMPLS, anchor.device, backend)
    return _IMPLS[chosen](anchor, shuffled, perm, float(theta), float(cap), float(weight))
