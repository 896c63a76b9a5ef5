"""Projection heads on the pooled backbone feature (docs/method.md §2.2).

The reference writes them as 1x1x1 Conv3d with bias on the (N, F, 1, 1, 1) pooled map; on the pooled
vector (N, F) that is Linear with bias. Normalisation is L2, x / max(||x||, 1e-12) (F.normalize).
Under autocast the last Linear gives 16-bit values; the heads return them as float32 (normalised in
float32), so every embedding the objective sees has one dtype and the loss statistics are float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


def _float32_if_half(y: torch.Tensor) -> torch.Tensor:
    return y.float() if y.dtype in (torch.float16, torch.bfloat16) else y


def _check_dims(**dims: int) -> None:
    for name, v in dims.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


class ClipHead(nn.Module):
    """Clip embedding: Linear(F, F) -> ReLU -> Linear(F, dim) -> L2 normalise.

    forward(h: (N, F)) -> (N, dim), unit rows (float32 when the Linear ran in 16 bits).
    """

    def __init__(self, feature_dim: int, dim: int = 128):
        super().__init__()
        _check_dims(feature_dim=feature_dim, dim=dim)
        self.mlp = _mlp(feature_dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(_float32_if_half(self.mlp(h)), dim=-1)


class SeriesHead(nn.Module):
    """Dual (series) representation: Linear(F, F) -> ReLU -> Linear(F, n_series * dim), reshaped to
    (n_series, dim), each chunk L2-normalised separately.

    forward(h: (N, F), normalize=True) -> (N, n_series, dim). With normalize=False the raw chunks are
    returned: the shuffled view's series, which the shuffle-rank kernel normalises itself after the
    calibration (docs/method.md §9.3).
    """

    def __init__(self, feature_dim: int, n_series: int = 2, dim: int = 64):
        super().__init__()
        _check_dims(feature_dim=feature_dim, n_series=n_series, dim=dim)
        self.n_series, self.dim = n_series, dim
        self.mlp = _mlp(feature_dim, n_series * dim)

    def forward(self, h: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        y = _float32_if_half(self.mlp(h)).view(h.shape[0], self.n_series, self.dim)
        return F.normalize(y, dim=-1) if normalize else y
