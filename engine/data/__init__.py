"""Video data: indexes, reading, clip sampling, augmentation, synthetic videos, datasets and loaders."""
from .augment import (IMAGENET_MEAN, IMAGENET_STD, apply_colour, centre_crop, gaussian_blur, normalise_,
                      random_crop, resize_hw)
from .dataset import (ClipConfig, DataFailureError, ResumableDistributedSampler, VideoClipDataset, VideoLoader,
                      build_loader, seed_worker, to_views)
from .index import build_index, format_summary, load_index, probe_video
from .reader import FAILURE_KINDS, VideoReadError, open_video, read_frames, resolve_backend
from .sampling import clip_indices, eval_indices, finetune_indices, pretrain_indices
from .synthetic import class_names, render_video, write_synthetic_dataset

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "apply_colour", "centre_crop", "gaussian_blur", "normalise_", "random_crop",
    "resize_hw", "ClipConfig", "DataFailureError", "ResumableDistributedSampler", "VideoClipDataset", "VideoLoader",
    "build_loader", "seed_worker", "to_views", "build_index", "format_summary", "load_index", "probe_video",
    "FAILURE_KINDS", "VideoReadError", "open_video", "read_frames", "resolve_backend", "clip_indices",
    "eval_indices", "finetune_indices", "pretrain_indices", "class_names", "render_video", "write_synthetic_dataset",
]
