"""Backbones (torchvision's video networks and the paper's R(2+1)D-10 / R3D-10) and projection heads.

    backbone = build_backbone("r2plus1d_10")            # (N, 3, T, H, W) -> (N, backbone.feature_dim)
    clip = ClipHead(backbone.feature_dim, 128)           # (N, F) -> (N, 128), unit rows
    series = SeriesHead(backbone.feature_dim, 2, 64)     # (N, F) -> (N, 2, 64), unit chunks
"""
from .backbones import BACKBONES, build_backbone, conv2plus1d_width, load_backbone_weights
from .heads import ClipHead, SeriesHead

__all__ = ["BACKBONES", "build_backbone", "conv2plus1d_width", "load_backbone_weights", "ClipHead", "SeriesHead"]
