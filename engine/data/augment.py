"""Spatial and colour augmentation (docs/method.md §1.3, §5.2, §6.2).

Split in two halves:
- In DataLoader workers, on uint8 (T, H, W, C) clips: the resize happens at decode (see `resize_hw`),
  then a crop whose offset is shared by every frame of the clip (`random_crop`, `centre_crop`), and
  the per-clip colour/blur parameters are drawn (`sample_pretrain_view_params`, `sample_finetune_params`).
- On the training device, batched: `apply_colour_and_normalise(x01, params, mean, std)` takes float
  clips in [0, 1] of shape (B, C, T, H, W) and applies each sample's own jitter (brightness,
  contrast, saturation, hue in that sample's order) and Gaussian blur, then normalises.

Why jitter runs on [0, 1] floats and normalisation comes last: colour jitter is defined on [0, 1]
images (clamping to [0, 1] after each op, as torchvision and PIL do), so `permute_frames` is called
with mean = (0, 0, 0), std = (1, 1, 1) to do the gather, flip and (B, C, T, H, W) layout, and the
ImageNet normalisation is one fused multiply-add at the end. `to_views` in dataset.py does both.

Jitter parameter layout per view: float (4,) = (brightness, contrast, saturation, hue) factors, int64
(4,) = order of the ops (0 = brightness, 1 = contrast, 2 = saturation, 3 = hue), bool apply flag;
blur: float sigma and a bool apply flag.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BLUR_SIGMA = (0.1, 2.0)

# (view) -> probability of the "null" pipeline (no colour, no blur); the rest is "base"/"extra".
PRETRAIN_NULL_PROB = (0.2, 0.0, 0.0)


def resize_hw(size: int = 128, long: int = 171, reference_resize: bool = False) -> tuple[int, int]:
    """(height, width) frames are resized to at decode.

    Default: conventional height 128 x width 171. reference_resize=True gives the reference's
    PIL `resize((128, 171))` quirk: width 128 x height 171 (docs/method.md §8.3).
    """
    return (long, size) if reference_resize else (size, long)


def crop_offset(rng: np.random.Generator, height: int, width: int, crop: int) -> tuple[int, int]:
    """Uniform crop offset (y0, x0), y0 in {0..H-crop}, x0 in {0..W-crop}."""
    if height < crop or width < crop:
        raise ValueError(f"frames of {height}x{width} are smaller than the {crop} crop")
    return int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))


def random_crop(clip: np.ndarray, rng: np.random.Generator, crop: int = 112) -> np.ndarray:
    """uint8 (T, H, W, C) -> (T, crop, crop, C), one offset for every frame of the clip."""
    y0, x0 = crop_offset(rng, clip.shape[1], clip.shape[2], crop)
    return np.ascontiguousarray(clip[:, y0:y0 + crop, x0:x0 + crop])


def centre_crop(clip: np.ndarray, crop: int = 112) -> np.ndarray:
    """uint8 (T, H, W, C) -> (T, crop, crop, C) at offset (round((H-crop)/2), round((W-crop)/2)).

    Python's round (half to even), as torchvision's CenterCrop: for 171 x 128 frames and a 112 crop
    the offsets are y 30 (not 29), x 8, as in the reference's test protocol (docs/method.md §6.2).
    """
    H, W = clip.shape[1:3]
    if H < crop or W < crop:
        raise ValueError(f"frames of {H}x{W} are smaller than the {crop} crop")
    y0, x0 = int(round((H - crop) / 2)), int(round((W - crop) / 2))
    return np.ascontiguousarray(clip[:, y0:y0 + crop, x0:x0 + crop])


def sample_jitter(rng: np.random.Generator, brightness: float = 0.8, contrast: float = 0.8,
                  saturation: float = 0.8, hue: float = 0.2, p: float = 0.64) -> dict:
    """One clip's colour jitter: factors uniform in [1-b, 1+b] etc., hue in [-h, h], a random op order."""
    factors = np.array([rng.uniform(1 - brightness, 1 + brightness), rng.uniform(1 - contrast, 1 + contrast),
                        rng.uniform(1 - saturation, 1 + saturation), rng.uniform(-hue, hue)], np.float32)
    order = rng.permutation(4).astype(np.int64)
    return {"jitter": factors, "jitter_order": order, "jitter_apply": bool(rng.random() < p)}


def sample_blur(rng: np.random.Generator, p: float = 0.5, sigma: tuple[float, float] = BLUR_SIGMA) -> dict:
    return {"blur_sigma": np.float32(rng.uniform(*sigma)), "blur_apply": bool(rng.random() < p)}


def sample_pretrain_view_params(rng: np.random.Generator, view: int) -> dict:
    """Per-view pipeline of docs/method.md §1.3: view 0 null (p=0.2) or base, view 1 base, view 2 extra (=base).

    base/extra: jitter (b, c, s in [0.2, 1.8], hue in [-0.2, 0.2], random order) with effective
    p = 0.8 * 0.8 = 0.64, blur with p = 0.5 and sigma in [0.1, 2.0]; null: neither.
    """
    null = bool(rng.random() < PRETRAIN_NULL_PROB[view])
    params = {**sample_jitter(rng, p=0.64), **sample_blur(rng)}
    if null:
        params["jitter_apply"] = False
        params["blur_apply"] = False
    params["pipeline_null"] = null
    return params


def sample_finetune_params(rng: np.random.Generator) -> dict:
    """Fine-tuning (docs/method.md §5.2): hflip p=0.5, jitter (0.8, 0.8, 0.8, 0.2) with p=0.8, no blur."""
    params = {"hflip": bool(rng.random() < 0.5), **sample_jitter(rng, p=0.8)}
    params["blur_sigma"], params["blur_apply"] = np.float32(1.0), False
    return params


# ----------------------------------------------------------------------------- device side, batched
def _bshape(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of (N, 3, T, H, W) -> (N, 1, T, H, W), the weights torchvision uses."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """x (N, 3, T, H, W) in [0, 1], f (N,): clamp(x * f). Returns a new tensor."""
    return (x * _bshape(f, x)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend each frame with its own mean grey level (torchvision/PIL: per image, hence per frame)."""
    mean = _gray(x).mean(dim=(-2, -1), keepdim=True)
    return torch.lerp(mean.expand_as(x), x, _bshape(f, x)).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend each pixel with its grey level: clamp(gray + f * (x - gray))."""
    return torch.lerp(_gray(x).expand_as(x), x, _bshape(f, x)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Rotate hue by h (N,) turns through HSV, as torchvision's adjust_hue (same sector rules).

    Shortcuts that keep the result: v * s = max - min (= cr), and HSV -> RGB in closed form,
    c = v - cr * clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6, n = 5, 3, 1 for R, G, B,
    which equals torchvision's six-sector table without its (N, 6, ...) masks.
    """
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    cr = maxc - minc
    inv = cr.clamp_min(1e-12).reciprocal_()  # grey pixels (cr = 0) get hue 0, as in torchvision
    # torchvision's sector choice: red if max == r, else green if max == g, else blue
    h6 = torch.where(maxc == g, (b - r).add_(cr, alpha=2.0), (r - g).add_(cr, alpha=4.0))
    h6 = torch.where(maxc == r, g - b, h6).mul_(inv)
    h6 = torch.remainder(h6.add_(_bshape(h, h6) * 6.0), 6.0)
    out = torch.empty_like(x)
    for c, n in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(h6 + n, 6.0)
        k = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.sub(maxc, k.mul_(cr), out=out[:, c])
    return out.clamp_(0.0, 1.0)


_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_kernel_size(sigma_max: float) -> int:
    """Odd kernel size covering +-3 sigma (PIL's GaussianBlur radius is sigma)."""
    return 2 * math.ceil(3 * sigma_max) + 1


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: Optional[int] = None) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma, reflect padding (as torchvision).

    x: (N, C, T, H, W) float; sigma: (N,). Every sample uses the kernel size that the largest
    allowed sigma needs (BLUR_SIGMA[1] = 2.0 -> 13 taps) unless given, so a sample's result does not
    depend on the rest of the batch and no device sync is needed; a smaller sigma's kernel is just
    more concentrated (its taps beyond 3 sigma are ~0).
    """
    N, C, T, H, W = x.shape
    K = kernel_size or gaussian_kernel_size(BLUR_SIGMA[1])
    half = (K - 1) / 2
    t = torch.linspace(-half, half, K, device=x.device, dtype=torch.float32)
    k1 = torch.exp(-0.5 * (t[None, :] / sigma.to(x.device, torch.float32)[:, None]) ** 2)
    k1 = (k1 / k1.sum(dim=1, keepdim=True)).to(x.dtype)  # (N, K)
    weights = k1.repeat_interleave(C * T, dim=0)  # (N*C*T, K)
    y = x.reshape(1, N * C * T, H, W)
    pad = K // 2
    y = F.pad(y, (pad, pad, 0, 0), mode="reflect")
    y = F.conv2d(y, weights.view(-1, 1, 1, K), groups=N * C * T)
    y = F.pad(y, (0, 0, pad, pad), mode="reflect")
    y = F.conv2d(y, weights.view(-1, 1, K, 1), groups=N * C * T)
    return y.view(N, C, T, H, W)


def apply_colour(x: torch.Tensor, jitter: torch.Tensor, jitter_order: torch.Tensor, jitter_apply: torch.Tensor,
                 blur_sigma: torch.Tensor, blur_apply: torch.Tensor, masked: Optional[bool] = None) -> torch.Tensor:
    """Per-sample colour jitter then blur on float clips in [0, 1].

    Args:
        x: (N, 3, T, H, W) float in [0, 1] (N = clips: batch x views flattened).
        jitter: float (N, 4) brightness, contrast, saturation, hue factors.
        jitter_order: int64 (N, 4) order of the ops (0..3 as above) per sample.
        jitter_apply, blur_apply: bool (N,); blur_sigma: float (N,).
        masked: how samples are selected. False: gather the samples that take an op, apply it, scatter
            back (least arithmetic; needs the selection's size, a device sync). True: apply every op to
            the whole batch and keep it per sample with torch.where (no syncs; better on GPUs).
            None: True on CUDA, False elsewhere. Both give the same result.
    Returns:
        (N, 3, T, H, W), a new tensor. Samples without jitter/blur pass unchanged.
    """
    dev = x.device
    jitter, jitter_order = jitter.to(dev), jitter_order.to(dev)
    jitter_apply, blur_apply, blur_sigma = jitter_apply.to(dev), blur_apply.to(dev), blur_sigma.to(dev)
    if masked is None:
        masked = x.is_cuda
    if masked:
        for step in range(4):
            for op in range(4):
                keep = (jitter_apply & (jitter_order[:, step] == op)).view(-1, 1, 1, 1, 1)
                x = torch.where(keep, _OPS[op](x, jitter[:, op]), x)
        keep = blur_apply.view(-1, 1, 1, 1, 1)
        return torch.where(keep, gaussian_blur(x, blur_sigma.clamp_min(BLUR_SIGMA[0])), x)
    x = x.clone()
    for step in range(4):
        for op in range(4):
            sel = torch.nonzero(jitter_apply & (jitter_order[:, step] == op)).view(-1)
            if sel.numel():
                x[sel] = _OPS[op](x[sel], jitter[sel, op])
    sel = torch.nonzero(blur_apply).view(-1)
    if sel.numel():
        x[sel] = gaussian_blur(x[sel], blur_sigma[sel])
    return x


def normalise_(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
               ) -> torch.Tensor:
    """In place (x - mean) / std over channel dim 1 of (N, C, T, H, W)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1, 1)
    return x.sub_(m).div_(s)
