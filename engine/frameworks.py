"""SimCLR and MoCo for DualVar: views -> backbone -> heads -> one `Embeddings` record (docs/method.md §2).

    views, perm = make_views(batch, device, n_series=2, generator=g)   # (B, 4, C, T, H, W), (B, s)
    emb = framework(views, perm)                                      # Embeddings
    out = objective(emb)                                              # dualvar.engine.objectives
    out.total.backward(); optimizer.step(); objective.update(emb)

Views: 0 = clip c, 1 = another clip c+ of the same video, 2 = c's frames augmented independently,
3 = the shuffled copy of view 2 (its s segments permuted per sample: shuffled segment j = original
segment perm[b, j]), with view 2's augmentation.

BatchNorm batches follow the reference (docs/method.md §8.8):
- SimCLR: views 0, 1, 2 in one backbone batch of 3B; the shuffled view alone (B). Baseline mode: views
  0 and 1 only (2B), as the reference's two-view SimCLR.
- MoCo: view 0 alone (B, query encoder); view 1 through the key encoder (B, no gradient); views 2 and
  3 together (2B, query encoder).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .data import augment
from .models import ClipHead, SeriesHead
from .objectives import MODES
from .objectives.dualvar_loss import MODE_ALIASES

FRAMEWORKS = ("simclr", "moco")


@dataclasses.dataclass
class Embeddings:
    """What a framework hands the objective (B = clips on this process).

    z0, z1: (B, D) unit clip embeddings of view 0 (MoCo: the query) and view 1 (MoCo: the key, no grad).
    u0, u1, u2: (B, s, d) unit series (each chunk normalised) of views 0, 1 (MoCo: key, no grad) and 2.
    y_shuf: (B, s, d) raw series of the shuffled view, in shuffled order (normalised by the loss after
        the calibration).
    perm: int64 (B, s), shuffled segment j = original segment perm[b, j].
    Series fields and perm are None in baseline mode.
    """
    z0: torch.Tensor
    z1: torch.Tensor
    u0: Optional[torch.Tensor] = None
    u1: Optional[torch.Tensor] = None
    u2: Optional[torch.Tensor] = None
    y_shuf: Optional[torch.Tensor] = None
    perm: Optional[torch.Tensor] = None


def _mode(mode: str) -> str:
    m = MODE_ALIASES.get(mode, mode)
    if m not in MODES:
        raise ValueError(f"mode must be one of {MODES} (or {tuple(MODE_ALIASES)}), got {mode!r}")
    return m


# --------------------------------------------------------------------------------------------- views
def make_views(batch: dict, device: Union[str, torch.device], *, n_series: int, generator: Optional[torch.Generator],
               out_dtype: torch.dtype = torch.float32, backend: str = "auto", derangement: bool = False,
               mean: Sequence[float] = augment.IMAGENET_MEAN, std: Sequence[float] = augment.IMAGENET_STD,
               perm: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loader's uint8 pretraining batch -> the four normalised views and the segment permutations.

    One `permute_frames` call reads every output frame: the sample's three clips are one sequence of 3T
    frames, and the frame index map lists views 0, 1, 2 in order followed by view 2's frames with its
    segments permuted (`segment_shuffle_index`), so no gather runs in torch. Then each view's colour
    jitter and blur (the batch's per-view parameters; the shuffled view takes view 2's, so it differs
    from view 2 only in its frame order) and the mean/std normalisation, as `to_views` does.

    Args:
        batch: the loader's batch: "video" uint8 (B, 3, T, H, W, C) and, optionally, the colour
            parameters "jitter" (B, 3, 4), "jitter_order" (B, 3, 4), "jitter_apply" (B, 3),
            "blur_sigma" (B, 3), "blur_apply" (B, 3). A horizontal flip is not part of pretraining:
            a batch whose "hflip" is set is refused.
        device: where the views are built.
        n_series: s, the number of segments (T must be divisible by s).
        generator: torch generator of the permutations (its device is where they are drawn); seed it
            per rank. None uses torch's default generator.
        out_dtype: float32, float16 or bfloat16.
        backend: permute_frames backend ("auto", "triton", "cuda", "cpu", "torch").
        derangement: only permutations without a fixed point (the reference draws any permutation,
            so for s = 2 half the shuffled views equal view 2; docs/method.md §8.4).
        mean, std: normalisation statistics (ImageNet's by default).
        perm: int64 (B, n_series) permutations to use instead of drawing them (then `generator` and
            `derangement` are unused): gradient caching draws the whole batch's permutations once and
            builds the views chunk by chunk, twice.
    Returns:
        views: (B, 4, C, T, H, W) of out_dtype: views 0, 1, 2 and the shuffled view 2. The memory is
            view-major (a transposed (4, B, ...) tensor), so any run of consecutive views
            (`views[:, a:b].transpose(0, 1)`) is contiguous: the frameworks batch them without a copy.
        perm: int64 (B, s) on `device`.
    """
    from dualvar.kernels import permute_frames, random_segment_permutation, segment_shuffle_index
    video = batch.get("video") if isinstance(batch, dict) else None
    if not isinstance(video, torch.Tensor) or video.dim() != 6 or video.shape[1] != 3 or video.dtype != torch.uint8:
        raise ValueError("batch['video'] must be a uint8 tensor (B, 3, T, H, W, C) of three pretraining views, got "
                         f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__}"
                         f"{' ' + str(video.dtype) if isinstance(video, torch.Tensor) else ''}")
    B, V, T, H, W, C = video.shape
    if not isinstance(n_series, int) or n_series < 1 or T % n_series:
        raise ValueError(f"n_series must be a positive integer dividing the {T} frames of a clip, got {n_series!r}")
    hflip = batch.get("hflip")
    if hflip is not None and bool(hflip.any()):
        raise ValueError("batch['hflip'] is set, but pretraining views are never flipped (make_views builds "
                         "all views in one call per sample; use to_views for fine-tuning batches)")
    device = torch.device(device)
    if perm is None:
        perm = random_segment_permutation(B, n_series, generator=generator, derangement=derangement)
    elif not isinstance(perm, torch.Tensor) or perm.shape != (B, n_series) or perm.dtype != torch.int64:
        raise ValueError(f"perm must be int64 ({B}, {n_series}) segment permutations, got "
                         f"{(tuple(perm.shape), perm.dtype) if isinstance(perm, torch.Tensor) else perm!r}")
    perm = perm.to(device)
    seq = video.to(device, non_blocking=True).reshape(B, V * T, H, W, C)  # a sample's 3 clips as 3T frames
    frames = torch.arange(T, device=device).expand(B, T)
    index = torch.cat([torch.arange(V * T, device=device).expand(B, V * T),
                       segment_shuffle_index(frames, perm) + 2 * T], dim=1)  # (B, 4T)
    x = permute_frames(seq, index, (0.0,) * C, (1.0,) * C, out_dtype=torch.float32, backend=backend)
    # (B, C, 4T, H, W) -> view-major (4B, C, T, H, W): one copy, which the colour ops need per view anyway
    x = x.view(B, C, 4, T, H, W).permute(2, 0, 1, 3, 4, 5).reshape(4 * B, C, T, H, W)
    if "jitter" in batch:
        src = torch.tensor([0, 1, 2, 2])  # the shuffled view takes view 2's parameters

        def per_view(name: str) -> torch.Tensor:
            p = batch[name]
            return p[:, src].transpose(0, 1).reshape(4 * B, *p.shape[2:])

        x = augment.apply_colour(x, per_view("jitter"), per_view("jitter_order"), per_view("jitter_apply"),
                                 per_view("blur_sigma"), per_view("blur_apply"))
    augment.normalise_(x, mean, std)
    return x.to(out_dtype).view(4, B, C, T, H, W).transpose(0, 1), perm


def _views_batch(views: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Views start..stop-1 of every sample as one view-major batch ((stop - start) * B, C, T, H, W)."""
    return views[:, start:stop].transpose(0, 1).reshape(-1, *views.shape[2:])


def _check_inputs(views: torch.Tensor, perm: Optional[torch.Tensor], n_series: Optional[int]) -> None:
    if not isinstance(views, torch.Tensor) or views.dim() != 6 or views.shape[1] != 4:
        raise ValueError(f"views must be (B, 4, C, T, H, W) (views 0, 1, 2 and the shuffled view), got "
                         f"{tuple(views.shape) if isinstance(views, torch.Tensor) else type(views).__name__}")
    if n_series is None:
        return
    B = views.shape[0]
    if not isinstance(perm, torch.Tensor) or perm.shape != (B, n_series) or perm.dtype != torch.int64:
        raise ValueError(f"perm must be int64 ({B}, {n_series}) segment permutations, got "
                         f"{(tuple(perm.shape), perm.dtype) if isinstance(perm, torch.Tensor) else perm!r}")


# ------------------------------------------------------------------------------------------ SimCLR
class SimCLR(nn.Module):
    """SimCLR with DualVar's series head (docs/method.md §2.2).

    forward(views (B, 4, C, T, H, W), perm int64 (B, s)) -> Embeddings.
    Views 0, 1, 2 go through the backbone as one batch of 3B (baseline: views 0 and 1, 2B); the shuffled
    view as its own batch of B (its own BatchNorm statistics, as the reference). The clip head runs on
    views 0 and 1 only (the reference also projects view 2 and never uses it, §8.9).
    """

    def __init__(self, backbone: nn.Module, *, mode: str, clip_dim: int = 128, n_series: int = 2,
                 series_dim: int = 64):
        super().__init__()
        self.mode = _mode(mode)
        self.backbone = backbone
        F = backbone.feature_dim
        self.clip_head = ClipHead(F, clip_dim)
        self.series_head = SeriesHead(F, n_series, series_dim) if self.mode != "baseline" else None

    @property
    def n_series(self) -> Optional[int]:
        return None if self.series_head is None else self.series_head.n_series

    def forward(self, views: torch.Tensor, perm: Optional[torch.Tensor] = None) -> Embeddings:
        _check_inputs(views, perm, self.n_series)
        B = views.shape[0]
        if self.series_head is None:
            z = self.clip_head(self.backbone(_views_batch(views, 0, 2)))
            return Embeddings(z0=z[:B], z1=z[B:])
        h = self.backbone(_views_batch(views, 0, 3))  # (3B, F): views 0, 1, 2
        z = self.clip_head(h[:2 * B])
        u = self.series_head(h)
        y_shuf = self.series_head(self.backbone(views[:, 3]), normalize=False)
        return Embeddings(z0=z[:B], z1=z[B:], u0=u[:B], u1=u[B:2 * B], u2=u[2 * B:], y_shuf=y_shuf, perm=perm)


# -------------------------------------------------------------------------------------------- MoCo
class MoCo(nn.Module):
    """MoCo with DualVar's series head (docs/method.md §2.3).

    forward(views (B, 4, C, T, H, W), perm int64 (B, s)) -> Embeddings with z0/u0 = query (view 0),
    z1/u1 = key (view 1, key encoder, no gradient), u2 and y_shuf from views 2 and 3 as one query batch
    of 2B. In training mode the key encoder (a copy of backbone + heads, never trained by gradient) is
    first moved by EMA, key = m * key + (1 - m) * query, then the keys are computed. The queues live in
    the objective (`build_objective(...).update(emb)` enqueues the keys after the step).

    `key_shuffle`: None, or a callable x -> (x_shuffled, restore) applied around the key encoder, with
    restore(y) putting the key rows back in order: the batch-shuffle BatchNorm of multi-process MoCo
    (the trainer sets `dualvar.engine.distributed.BatchShuffle` when model.key_bn is "shuffle" and there
    is more than one process; a single process does not shuffle: a whole batch's statistics do not depend
    on its order). restore may be None (no shuffle).
    """

    def __init__(self, backbone: nn.Module, *, mode: str, clip_dim: int = 128, n_series: int = 2,
                 series_dim: int = 64, momentum: float = 0.999):
        super().__init__()
        if not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
        self.mode = _mode(mode)
        self.momentum = float(momentum)
        self.backbone = backbone
        F = backbone.feature_dim
        self.clip_head = ClipHead(F, clip_dim)
        self.series_head = SeriesHead(F, n_series, series_dim) if self.mode != "baseline" else None
        self.key_backbone = copy.deepcopy(backbone)
        self.key_clip_head = copy.deepcopy(self.clip_head)
        self.key_series_head = copy.deepcopy(self.series_head)
        for p in self._key_params():
            p.requires_grad_(False)
        self.key_shuffle: Optional[Callable] = None

    @property
    def n_series(self) -> Optional[int]:
        return None if self.series_head is None else self.series_head.n_series

    def _query_params(self) -> list:
        mods = [self.backbone, self.clip_head] + ([self.series_head] if self.series_head is not None else [])
        return [p for m in mods for p in m.parameters()]

    def _key_params(self) -> list:
        mods = [self.key_backbone, self.key_clip_head]
        mods += [self.key_series_head] if self.key_series_head is not None else []
        return [p for m in mods for p in m.parameters()]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """key = m * key + (1 - m) * query for every parameter (BatchNorm statistics are the key
        encoder's own, from its forward passes, as in MoCo)."""
        torch._foreach_lerp_(self._key_params(), self._query_params(), 1.0 - self.momentum)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        restore = None
        if self.key_shuffle is not None:
            x, restore = self.key_shuffle(x)
        h = self.key_backbone(x)
        if restore is not None:
            h = restore(h)
        z = self.key_clip_head(h)
        u = self.key_series_head(h) if self.key_series_head is not None else None
        return z, u

    def forward(self, views: torch.Tensor, perm: Optional[torch.Tensor] = None) -> Embeddings:
        _check_inputs(views, perm, self.n_series)
        B = views.shape[0]
        if self.training:
            self.momentum_update()
        h0 = self.backbone(views[:, 0])
        z0 = self.clip_head(h0)
        z1, u1 = self._keys(views[:, 1])
        if self.series_head is None:
            return Embeddings(z0=z0, z1=z1)
        u0 = self.series_head(h0)
        h23 = self.backbone(_views_batch(views, 2, 4))  # (2B, F): view 2, then the shuffled view
        u2 = self.series_head(h23[:B])
        y_shuf = self.series_head(h23[B:], normalize=False)
        return Embeddings(z0=z0, z1=z1, u0=u0, u1=u1, u2=u2, y_shuf=y_shuf, perm=perm)


def build_framework(name: str, backbone: nn.Module, *, mode: str, clip_dim: int = 128, n_series: int = 2,
                    series_dim: int = 64, momentum: float = 0.999) -> nn.Module:
    """SimCLR or MoCo around `backbone` (anything with `feature_dim` mapping (N, 3, T, H, W) -> (N, F)).
    `momentum` is MoCo's and ignored by SimCLR."""
    if name == "simclr":
        return SimCLR(backbone, mode=mode, clip_dim=clip_dim, n_series=n_series, series_dim=series_dim)
    if name == "moco":
        return MoCo(backbone, mode=mode, clip_dim=clip_dim, n_series=n_series, series_dim=series_dim,
                    momentum=momentum)
    raise ValueError(f"framework name must be one of {FRAMEWORKS}, got {name!r}")
