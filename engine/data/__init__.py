"""Video data: indexes, reading, clip sampling, augmentation, synthetic videos, datasets and loaders.

How a trainer uses it (pretraining):

    index = "runs/ucf101_split1.jsonl"        # from `dualvar data index --dataset ucf101 ...`
    loader = build_loader(index, mode="pretrain", split="train", batch_size=B, num_workers=W,
                          config=ClipConfig(frames=16, stride=4), seed=seed, rank=rank,
                          num_replicas=world, device=device)
    loader.load_state_dict(ckpt["data"])        # on resume (else loader.set_epoch(0))
    for epoch in ...:
        loader.set_epoch(epoch)                 # (not after load_state_dict for the resumed epoch)
        for batch in loader:                    # dict of tensors, see VideoClipDataset
            views = to_views(batch, device, out_dtype=torch.bfloat16)   # (B, 3, C, T, 112, 112)
            ...
            log(loader.failures())              # {kind: count, "attempts": n}, all workers
            ckpt["data"] = loader.state_dict()  # exact position: the next batch after resume
Fine-tuning: mode="finetune" (views (B, 1, ...), horizontal flip and jitter applied by to_views);
evaluation: mode="eval", ClipConfig(stride=2) -> (B, 10, C, T, 112, 112), no colour augmentation.
"""
from .augment import (IMAGENET_MEAN, IMAGENET_STD, apply_colour, centre_crop, gaussian_blur, normalise_,
                      random_crop, resize_hw)
from .dataset import (ClipConfig, DataFailureError, ResumableDistributedSampler, VideoClipDataset, VideoLoader,
                      build_loader, holdout_split, seed_worker, to_views)
from .index import build_index, format_summary, load_index, probe_video
from .reader import FAILURE_KINDS, VideoReadError, open_video, read_frames, resolve_backend
from .sampling import clip_indices, eval_indices, finetune_indices, pretrain_indices
from .synthetic import class_names, render_video, write_synthetic_dataset

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "apply_colour", "centre_crop", "gaussian_blur", "normalise_", "random_crop",
    "resize_hw", "ClipConfig", "DataFailureError", "ResumableDistributedSampler", "VideoClipDataset", "VideoLoader",
    "build_loader", "holdout_split", "seed_worker", "to_views", "build_index", "format_summary", "load_index",
    "probe_video",
    "FAILURE_KINDS", "VideoReadError", "open_video", "read_frames", "resolve_backend", "clip_indices",
    "eval_indices", "finetune_indices", "pretrain_indices", "class_names", "render_video", "write_synthetic_dataset",
]
