"""Video backbones: torchvision's video networks and the paper's 10-layer ResNets, all returning the
globally average-pooled feature (N, F).

    name          architecture                                                        F     params (no head)
    tiny          R3D layout, one block per stage, widths 8/16/32/64 (CPU tests)       64    0.23 M
    r3d_10        R3D-10: torchvision VideoResNet, BasicStem, Conv3DSimple, [1,1,1,1]  512   14.36 M
    r2plus1d_10   R(2+1)D-10 of the reference code (docs/method.md §2.1), see below    512   14.37 M
    r3d_18, mc3_18, r2plus1d_18   torchvision.models.video, unchanged                  512
    s3d           torchvision.models.video.s3d                                          1024

Every backbone is the torchvision module itself with its classifier replaced by `nn.Identity` (VideoResNet:
`fc`; S3D: `classifier`, and its fixed (2, 7, 7) average pool by a global one), so its `state_dict` holds
exactly torchvision's keys minus the classifier's: it loads strictly into the torchvision model whose
classifier is set to `nn.Identity()`, and torchvision's Kinetics files load into it once their classifier
keys are dropped (`load_backbone_weights` does that). The output is the pooled feature, never logits.

R(2+1)D-10 as the reference codes it (docs/method.md §2.1), from torchvision's parts:
- stem: (2+1)D 3x7x7 conv, stride (1, 2, 2), 64 channels, inner width 83 = floor(3*7*7*3*64 / (7*7*3 + 3*64))
  (the rule below for a 3x7x7 kernel); torchvision's R2Plus1dStem has this layout at inner width 45;
- each (2+1)D 3x3x3 conv has inner width floor(27*in*out / (9*in + 3*out)) from its own in/out channels
  (torchvision's BasicBlock uses the first conv's width for both convs of a block, which gives 12.5 M);
- the projection shortcut of stages 2-4 is a (2+1)D 1x1x1 conv (spatial 1x1x1 stride (1, 2, 2), BN,
  ReLU, temporal 1x1x1 stride (2, 1, 1); inner width floor(in*out / (in + out))) followed by BN, where
  torchvision has one 1x1x1 conv. Its keys are VideoResNet's, except that `layerN.0.downsample.0` is that
  four-module Sequential (not torchvision's architecture, so no torchvision model takes its weights).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.video import mc3_18, r2plus1d_18, r3d_18, s3d
from torchvision.models.video.resnet import BasicBlock, BasicStem, Conv2Plus1D, Conv3DSimple, VideoResNet

BACKBONES = ("tiny", "r3d_10", "r2plus1d_10", "r3d_18", "mc3_18", "r2plus1d_18", "s3d")
TINY_WIDTHS = (8, 16, 32, 64)


def conv2plus1d_width(in_planes: int, out_planes: int, kernel: tuple = (3, 3, 3)) -> int:
    """Inner width of a (2+1)D conv with the parameters of the full t x h x w conv it replaces:
    floor(t*h*w*in*out / (h*w*in + t*out)) (R(2+1)D paper §3.5, as the reference computes it)."""
    t, h, w = kernel
    return (t * h * w * in_planes * out_planes) // (h * w * in_planes + t * out_planes)


class ReferenceConv2Plus1D(Conv2Plus1D):
    """torchvision's Conv2Plus1D whose inner width is computed from its own in/out channels (the
    reference's rule), ignoring the `midplanes` BasicBlock passes (BasicBlock shares one width between
    its two convs). Same modules and keys as Conv2Plus1D."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: Optional[int] = None, stride: int = 1,
                 padding: int = 1) -> None:
        super().__init__(in_planes, out_planes, conv2plus1d_width(in_planes, out_planes), stride, padding)


class R2Plus1dStemWide(nn.Sequential):
    """torchvision's R2Plus1dStem layout ((1, 7, 7) conv, BN, ReLU, (3, 1, 1) conv, BN, ReLU; same keys)
    with the reference's inner width 83 instead of 45."""

    def __init__(self, out_planes: int = 64) -> None:
        mid = conv2plus1d_width(3, out_planes, (3, 7, 7))
        super().__init__(
            nn.Conv3d(3, mid, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, out_planes, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(out_planes),
            nn.ReLU(inplace=True),
        )


def conv2plus1d_shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """The reference's projection shortcut: a (2+1)D conv with 1x1x1 kernels (spatial stride (1, s, s),
    BN, ReLU, temporal stride (s, 1, 1)), inner width floor(in*out / (in + out)), then BN. Laid out as
    Sequential(Conv2Plus1D-like Sequential, BatchNorm3d), the shape of torchvision's `downsample`."""
    mid = conv2plus1d_width(in_planes, out_planes, (1, 1, 1))
    conv = nn.Sequential(
        nn.Conv3d(in_planes, mid, kernel_size=1, stride=(1, stride, stride), bias=False),
        nn.BatchNorm3d(mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid, out_planes, kernel_size=1, stride=(stride, 1, 1), bias=False),
    )
    return nn.Sequential(conv, nn.BatchNorm3d(out_planes))


class _TinyStem(nn.Sequential):
    """BasicStem's layout (3x7x7 conv, stride (1, 2, 2), BN, ReLU) at the tiny width."""

    def __init__(self, out_planes: int = TINY_WIDTHS[0]) -> None:
        super().__init__(
            nn.Conv3d(3, out_planes, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(out_planes),
            nn.ReLU(inplace=True),
        )


class NarrowVideoResNet(VideoResNet):
    """VideoResNet with stage widths other than torchvision's fixed 64/128/256/512 (only `tiny` uses it).

    The stages are built by VideoResNet's own `_make_layer` and the forward is VideoResNet's; only the
    widths differ. The classifier is nn.Identity, the pool global.
    """

    def __init__(self, widths=TINY_WIDTHS, layers=(1, 1, 1, 1), block=BasicBlock, conv_maker=Conv3DSimple) -> None:
        nn.Module.__init__(self)
        self.inplanes = widths[0]
        self.stem = _TinyStem(widths[0])
        self.layer1 = self._make_layer(block, conv_maker, widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, conv_maker, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, conv_maker, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, conv_maker, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Identity()
        for m in self.modules():  # VideoResNet's initialisation
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def _video_resnet_10(conv_maker, stem) -> VideoResNet:
    return VideoResNet(BasicBlock, [conv_maker] * 4, [1, 1, 1, 1], stem)


def _r2plus1d_10() -> VideoResNet:
    model = _video_resnet_10(ReferenceConv2Plus1D, R2Plus1dStemWide)
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(model, name)[0]
        old = block.downsample[0]
        block.downsample = conv2plus1d_shortcut(old.in_channels, old.out_channels, block.stride)
        for m in block.downsample.modules():  # VideoResNet's initialisation (BN: 1 and 0 by default)
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


# ----------------------------------------------------------------------------- normalisation options
NORMS = ("bn", "frozen_bn", "group")


class FrozenBatchNorm3d(nn.Module):
    """BatchNorm3d that always normalises with its running statistics, which never change (in train mode
    too); the affine weight and bias stay trainable. Same parameter and buffer names as nn.BatchNorm3d, so
    torchvision's weights and BatchNorm checkpoints load into it. Every sample is normalised on its own, so
    a batch split into chunks (gradient caching, docs/method.md §4) gives exactly the unsplit gradient. It is
    deliberately not a torch BatchNorm subclass: SyncBatchNorm conversion leaves it alone."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> "FrozenBatchNorm3d":
        m = cls(bn.num_features, bn.eps)
        with torch.no_grad():
            if bn.affine:
                m.weight.copy_(bn.weight)
                m.bias.copy_(bn.bias)
            if bn.track_running_stats:
                m.running_mean.copy_(bn.running_mean)
                m.running_var.copy_(bn.running_var)
                m.num_batches_tracked.copy_(bn.num_batches_tracked)
        return m.to(bn.weight.device if bn.affine else bn.running_mean.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, frozen statistics"


def group_norm_groups(channels: int, max_groups: int = 32) -> int:
    """Groups of the GroupNorm that replaces a C-channel BatchNorm: gcd(C, 32) (32 for the usual widths;
    the (2+1)D convs' odd inner widths get fewer, down to 1 = LayerNorm over channels and positions)."""
    return math.gcd(channels, max_groups)


def convert_norm(model: nn.Module, norm: str) -> nn.Module:
    """Replace every BatchNorm of `model` in place: "bn" keeps them; "frozen_bn" swaps in
    FrozenBatchNorm3d (statistics and weights copied); "group" swaps in GroupNorm(gcd(C, 32), C), whose
    weight and bias keep BatchNorm's names (running statistics are dropped from the state dict)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "bn":
        return model
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            if norm == "frozen_bn":
                new = FrozenBatchNorm3d.from_batchnorm(child)
            else:
                new = nn.GroupNorm(group_norm_groups(child.num_features), child.num_features, eps=child.eps)
                if child.affine:
                    with torch.no_grad():
                        new.weight.copy_(child.weight)
                        new.bias.copy_(child.bias)
                new.to(child.weight.device if child.affine else child.running_mean.device)
            setattr(model, name, new)
        else:
            convert_norm(child, norm)
    return model


_BUILDERS = {
    "tiny": lambda: NarrowVideoResNet(),
    "r3d_10": lambda: _video_resnet_10(Conv3DSimple, BasicStem),
    "r2plus1d_10": _r2plus1d_10,
    "r3d_18": lambda: r3d_18(weights=None),
    "mc3_18": lambda: mc3_18(weights=None),
    "r2plus1d_18": lambda: r2plus1d_18(weights=None),
    "s3d": lambda: s3d(weights=None),
}

# state-dict key prefixes of the classifiers that torchvision files carry and the backbones do not
HEAD_PREFIXES = ("fc.", "classifier.")


def _strip_head(model: nn.Module) -> nn.Module:
    if isinstance(model, VideoResNet):
        model.fc = nn.Identity()
        model.feature_dim = model.layer4[-1].conv2[1].num_features
    else:  # S3D: features -> global pool -> (classifier) -> mean over the singleton (T, H, W) dims
        model.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        model.classifier = nn.Identity()
        model.feature_dim = 1024
    return model


def load_backbone_weights(model: nn.Module, path: str) -> None:
    """Load a local state-dict file into a backbone (strict), dropping classifier keys ("fc.*",
    "classifier.*") such as those of torchvision's Kinetics files. `.safetensors` files are read with
    safetensors, anything else with torch.load(weights_only=True); a {"state_dict": ...} wrapper is opened."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights: no file at {path!r} (backbone weights are read from a local file, "
                                "never downloaded)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"weights: {path!r} does not hold a state dict (got {type(state).__name__})")
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights: {path!r} does not match the backbone's keys and shapes: {e}") from None


def build_backbone(name: str, *, weights: Optional[str] = None, norm: str = "bn") -> nn.Module:
    """A backbone by name (one of BACKBONES).

    Args:
        name: "tiny", "r3d_10", "r2plus1d_10", "r3d_18", "mc3_18", "r2plus1d_18" or "s3d".
        weights: optional path to a local state-dict file (torchvision's Kinetics weights or an exported
            backbone); classifier keys in it are ignored. Nothing is ever downloaded.
        norm: "bn" (BatchNorm, torchvision's and the paper's), "frozen_bn" (BatchNorm whose statistics
            never change: FrozenBatchNorm3d; meant with weights whose statistics are meaningful) or
            "group" (GroupNorm with gcd(C, 32) groups). The last two normalise every sample on its own,
            so gradient caching and multi-process runs give exactly the gradient of the whole batch
            (docs/method.md §4); "bn" normalises with the statistics of each process's (or chunk's) batch.
            The weights (and, for frozen_bn, the statistics) are loaded before the conversion.
    Returns:
        an nn.Module mapping float (N, 3, T, H, W) to the pooled feature (N, F), with attributes
        `feature_dim` = F (512; 1024 for s3d; 64 for tiny) and `backbone_name` = name. Its state_dict
        has torchvision's keys minus the classifier's.
    """
    if name not in _BUILDERS:
        raise ValueError(f"backbone name must be one of {BACKBONES}, got {name!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    model = _strip_head(_BUILDERS[name]())
    model.backbone_name = name
    if weights is not None:
        load_backbone_weights(model, os.fspath(weights))
    return convert_norm(model, norm)
