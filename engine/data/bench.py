"""Pretraining loader throughput: decode + crop (workers) + transfer + device augmentation."""
from __future__ import annotations

import os
import tempfile
import time
from typing import Optional

import torch

from .dataset import VideoClipDataset, build_loader, to_views
from .index import build_index, load_index
from .synthetic import write_synthetic_dataset


def ensure_synthetic_index(root: Optional[str] = None, **synth_kwargs) -> str:
    """Index path of the synthetic set at `root` (written first if absent; default: a temp folder)."""
    root = root or os.path.join(tempfile.gettempdir(), "dualvar-synthetic")
    if not os.path.isfile(os.path.join(root, "ucfTrainTestlist", "classInd.txt")):
        write_synthetic_dataset(root, **synth_kwargs)
    out = os.path.join(root, "index_split1.jsonl")
    build_index("ucf101", root, out)
    return out


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_loader(index: str, num_workers: int = 0, batch_size: int = 8, batches: int = 10,
                 device: str = "cpu", warmup: int = 1) -> dict:
    """Time `batches` batches of the pretraining loader after `warmup` batches (worker start-up is
    excluded). Shares: time of decode + crop vs device augmentation (to_views) measured in one process.
    """
    loader = build_loader(index, "pretrain", "train", batch_size, num_workers=num_workers, device=device)
    it = iter(loader)
    for _ in range(warmup):
        to_views(next(it), device)
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        batch = next(it)
        to_views(batch, device)
        n += batch["video"].shape[0]
    _sync(device)
    elapsed = time.perf_counter() - t0
    del it, loader
    # split of single-process time: decode + crop in __getitem__, augmentation in to_views
    ds = VideoClipDataset(load_index(index, "train", only_ok=True), "pretrain")
    t0 = time.perf_counter()
    items = [ds[i] for i in range(batch_size)]
    t_decode = time.perf_counter() - t0
    batch = torch.utils.data.default_collate(items)
    t0 = time.perf_counter()
    to_views(batch, device)
    _sync(device)
    t_aug = time.perf_counter() - t0
    return {"workers": num_workers, "batch_size": batch_size, "batches": batches, "device": str(device),
            "clips_per_s": 3 * n / elapsed, "videos_per_s": n / elapsed, "seconds": elapsed,
            "decode_share": t_decode / (t_decode + t_aug), "augment_share": t_aug / (t_decode + t_aug)}
