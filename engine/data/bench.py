"""Pretraining loader throughput: decode + crop (workers) + transfer + device augmentation."""
from __future__ import annotations

import os
import tempfile
import time
from typing import Optional

import torch

from .dataset import VideoClipDataset, build_loader, to_views
from .index import build_index, load_index
from .reader import resolve_backend
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
                 device: str = "cpu", warmup: int = 1, augment_colour: bool = True) -> dict:
    """Time `batches` batches of the pretraining loader after `warmup` batches (worker start-up is
    excluded). decode_share/augment_share: time of decode + crop (`dataset[i]`) vs device augmentation
    (`to_views`) for one batch in one process; loop_wait_share/loop_augment_share: the timed loop's
    time waiting for the loader vs in `to_views` (with workers, decoding overlaps augmentation).
    """
    loader = build_loader(index, "pretrain", "train", batch_size, num_workers=num_workers, device=device)
    it = iter(loader)
    for _ in range(warmup):
        to_views(next(it), device)
    _sync(device)
    t0 = time.perf_counter()
    n, t_wait, t_views = 0, 0.0, 0.0
    for _ in range(batches):
        t1 = time.perf_counter()
        batch = next(it)
        t2 = time.perf_counter()
        to_views(batch, device, augment_colour=augment_colour)
        _sync(device)
        t_views += time.perf_counter() - t2
        t_wait += t2 - t1
        n += batch["video"].shape[0]
    elapsed = time.perf_counter() - t0
    failures = {k: v for k, v in loader.failures().items() if k != "attempts" and v}
    del it, loader
    # split of single-process time: decode + crop in __getitem__, augmentation in to_views
    ds = VideoClipDataset(load_index(index, "train", only_ok=True), "pretrain")
    t0 = time.perf_counter()
    items = [ds[i] for i in range(batch_size)]
    t_decode = time.perf_counter() - t0
    batch = torch.utils.data.default_collate(items)
    t0 = time.perf_counter()
    to_views(batch, device, augment_colour=augment_colour)
    _sync(device)
    t_aug = time.perf_counter() - t0
    return {"workers": num_workers, "augment_colour": augment_colour, "batch_size": batch_size, "batches": batches,
            "device": str(device),
            "clips_per_s": 3 * n / elapsed, "videos_per_s": n / elapsed, "seconds": elapsed,
            "failures": failures, "backend": resolve_backend("auto"),
            "loop_wait_share": t_wait / elapsed, "loop_augment_share": t_views / elapsed,
            "decode_share": t_decode / (t_decode + t_aug), "augment_share": t_aug / (t_decode + t_aug)}
