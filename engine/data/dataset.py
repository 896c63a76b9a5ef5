"""Datasets of uint8 clips, failure accounting, a resumable distributed sampler and the loader.

Data flow: a DataLoader worker reads only the needed frames (resized at decode), crops them
(clip-consistent) and returns uint8 clips plus the sample's augmentation parameters;
`to_views(batch, device)` moves them to the device, lays them out with `permute_frames`, applies the
batched colour jitter / blur and normalises.

Randomness: every sample draws from `numpy.random.default_rng([seed, epoch, index])`, so a batch does
not depend on the number of workers, on which worker read it, or on prefetching. The epoch reaches
persistent workers with the index itself: the sampler yields (index, epoch) pairs when
`tag_epoch=True` (what `build_loader` sets); a plain int index uses `dataset.set_epoch`.
"""
from __future__ import annotations

import functools
import math
import os
import random
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from . import augment, sampling
from .reader import FAILURE_KINDS, VideoReadError, read_frames

MODES = ("pretrain", "finetune", "eval")
_EXAMPLES, _EXAMPLE_BYTES = 4, 512


@dataclass
class ClipConfig:
    """How clips are read and cropped.

    frames/stride: T and ds (pretrain default 16/4; finetune and eval use 16/2 in the paper).
    size/long/reference_resize: frames are resized at decode to (size, long) = H x W, or W x H with
    reference_resize=True (the reference's quirk, docs/method.md §8.3). crop: square crop side.
    eval_clips: clips per video in eval mode. backend/num_threads: video reader. timeout_s: time limit
    of one read (open + decode). min_frames: fewer frames is a "too_short" failure (shorter videos
    than one clip are kept: edge frames repeat). max_failure_fraction/min_attempts: past this fraction
    of failed reads (once min_attempts reads were made) the run stops. max_substitutions: failed
    reads in a row for one sample before giving up.
    """
    frames: int = 16
    stride: int = 4
    crop: int = 112
    size: int = 128
    long: int = 171
    reference_resize: bool = False
    eval_clips: int = 10
    backend: str = "auto"
    num_threads: int = 1
    timeout_s: Optional[float] = 60.0
    min_frames: int = 1
    max_failure_fraction: float = 0.05
    min_attempts: int = 200
    max_substitutions: int = 20

    def __post_init__(self):
        if self.frames < 1 or self.stride < 1:
            raise ValueError(f"frames and stride must be >= 1, got {self.frames}, {self.stride}")
        h, w = augment.resize_hw(self.size, self.long, self.reference_resize)
        if self.crop > min(h, w):
            raise ValueError(f"crop {self.crop} does not fit in resized frames {h}x{w}")
        if not 0 <= self.max_failure_fraction <= 1:
            raise ValueError("max_failure_fraction must be in [0, 1]")


class DataFailureError(RuntimeError):
    """Too many videos failed to read; the message gives counts and example files."""


class VideoClipDataset(Dataset):
    """Clips of indexed videos for pretraining, fine-tuning or evaluation.

    Args:
        entries: index entries (dicts with at least "path" and "label"; see index.py).
        mode: "pretrain" (3 views, docs/method.md §1.2-1.3), "finetune" (1 view, §5.2) or "eval"
            (eval_clips centre-cropped clips, §6.2).
        config: ClipConfig. seed: base seed of the per-sample generators.

    Item (dict of tensors; V = 3 pretrain, 1 finetune, eval_clips eval):
        video: uint8 (V, T, crop, crop, 3) frames already in sampled order (time reversal applied).
        label, index (int64; index = the entry actually read, after any substitution),
        substituted (bool), time_reverse (bool, pretrain),
        jitter float (V, 4), jitter_order int64 (V, 4), jitter_apply bool (V,),
        blur_sigma float (V,), blur_apply bool (V,), hflip bool (V,)   [pretrain and finetune].
    Failed reads are replaced by another random entry and counted by kind; see `failures()`.
    """

    def __init__(self, entries: Sequence[dict], mode: str = "pretrain", config: Optional[ClipConfig] = None,
                 seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not entries:
            raise ValueError("no videos in the dataset (empty index or split)")
        self.entries = list(entries)
        self.mode, self.config, self.seed = mode, config or ClipConfig(), int(seed)
        self.epoch = 0
        self.attach_counters(0)
        self._local_examples: list[str] = []

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shorter_than_clip(self) -> int:
        """Entries whose indexed length is below one clip's span ((T - 1) * ds + 1 frames); they are
        kept, with repeated edge frames (docs/method.md §8.14), and this count is for the training log."""
        span = (self.config.frames - 1) * self.config.stride + 1
        return sum(1 for e in self.entries if 0 < int(e.get("n_frames", span)) < span)

    # ------------------------------------------------------------------ failure counters
    def attach_counters(self, num_workers: int) -> None:
        """(Re)allocate the shared counters for the main process and `num_workers` workers.

        Each process writes only its own row of a shared-memory tensor, so counts from every worker
        are visible in the main process without locks. Call before the DataLoader starts workers.
        """
        rows = int(num_workers) + 1
        self._counts = torch.zeros(rows, len(FAILURE_KINDS) + 1, dtype=torch.int64).share_memory_()
        self._examples = torch.zeros(rows, _EXAMPLES, _EXAMPLE_BYTES, dtype=torch.uint8).share_memory_()

    def _row(self) -> int:
        info = get_worker_info()
        return 0 if info is None else min(info.id + 1, self._counts.shape[0] - 1)

    def failures(self) -> dict:
        """{kind: count} of failed reads summed over all processes, plus "attempts" (all reads)."""
        tot = self._counts.sum(0).tolist()
        return {**dict(zip(FAILURE_KINDS, tot[:-1])), "attempts": tot[-1]}

    def failure_examples(self) -> list[str]:
        """Up to a few failed reads per process, as 'kind: path: detail' lines."""
        out = []
        for row in self._examples:
            for ex in row:
                s = bytes(ex.tolist()).rstrip(b"\0").decode("utf-8", "replace")
                if s:
                    out.append(s)
        return out

    def _record(self, row: int, error: Optional[VideoReadError]) -> None:
        self._counts[row, -1] += 1
        if error is None:
            return
        self._counts[row, FAILURE_KINDS.index(error.kind)] += 1
        n = int(self._counts[row, :-1].sum())
        if n <= _EXAMPLES:
            raw = str(error).encode()[:_EXAMPLE_BYTES]
            self._examples[row, n - 1].zero_()
            self._examples[row, n - 1, :len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        counts = self.failures()
        failed = sum(counts[k] for k in FAILURE_KINDS)
        if counts["attempts"] >= self.config.min_attempts and \
                failed > self.config.max_failure_fraction * counts["attempts"]:
            raise DataFailureError(self._failure_message(counts, failed))

    def _failure_message(self, counts: dict, failed: int) -> str:
        kinds = ", ".join(f"{k} {counts[k]}" for k in FAILURE_KINDS if counts[k])
        examples = "\n  ".join(self.failure_examples()[:8])
        return (f"{failed} of {counts['attempts']} video reads failed ({kinds}), more than the allowed "
                f"fraction {self.config.max_failure_fraction:g}. Examples:\n  {examples}\n"
                f"Re-index the dataset (`dualvar data index`) or raise max_failure_fraction.")

    # ------------------------------------------------------------------ items
    def __getitem__(self, item: Union[int, tuple]) -> dict:
        index, epoch = (item if isinstance(item, tuple) else (item, self.epoch))
        index = int(index)
        rng = np.random.default_rng([self.seed, int(epoch), index])
        row = self._row()
        cfg = self.config
        for attempt in range(cfg.max_substitutions + 1):
            try:
                sample = self._load(index, rng)
                self._record(row, None)
                sample["index"] = torch.tensor(index, dtype=torch.int64)
                sample["substituted"] = torch.tensor(attempt > 0)
                return sample
            except VideoReadError as e:
                self._record(row, e)
                index = int(rng.integers(0, len(self.entries)))
        raise DataFailureError(f"{cfg.max_substitutions + 1} reads in a row failed; last examples:\n  "
                               + "\n  ".join(self.failure_examples()[:8]))

    def _load(self, index: int, rng: np.random.Generator) -> dict:
        cfg, entry = self.config, self.entries[index]
        h, w = augment.resize_hw(cfg.size, cfg.long, cfg.reference_resize)
        out: dict = {"label": torch.tensor(int(entry.get("label", -1)), dtype=torch.int64)}
        box: dict = {}

        def indices(L: int) -> np.ndarray:
            if self.mode == "pretrain":
                idx, box["reverse"] = sampling.pretrain_indices(L, rng, cfg.frames, cfg.stride)
            elif self.mode == "finetune":
                idx = sampling.finetune_indices(L, rng, cfg.frames, cfg.stride)[None]
            else:
                idx = sampling.eval_indices(L, cfg.frames, cfg.stride, cfg.eval_clips)
            return idx

        frames, _, _ = read_frames(entry["path"], indices, height=h, width=w, backend=cfg.backend,
                                   num_threads=cfg.num_threads, timeout_s=cfg.timeout_s, min_frames=cfg.min_frames)
        V = frames.shape[0]
        if self.mode == "eval":
            clips = np.stack([augment.centre_crop(frames[v], cfg.crop) for v in range(V)])
            out["video"] = torch.from_numpy(clips)
            return out
        clips = np.stack([augment.random_crop(frames[v], rng, cfg.crop) for v in range(V)])
        if self.mode == "pretrain":
            params = [augment.sample_pretrain_view_params(rng, v) for v in range(V)]
            out["time_reverse"] = torch.tensor(box["reverse"])
            hflip = [False] * V
        else:
            params = [augment.sample_finetune_params(rng)]
            hflip = [p["hflip"] for p in params]
        out["video"] = torch.from_numpy(clips)
        out["jitter"] = torch.from_numpy(np.stack([p["jitter"] for p in params]))
        out["jitter_order"] = torch.from_numpy(np.stack([p["jitter_order"] for p in params]))
        out["jitter_apply"] = torch.tensor([p["jitter_apply"] for p in params])
        out["blur_sigma"] = torch.tensor([float(p["blur_sigma"]) for p in params], dtype=torch.float32)
        out["blur_apply"] = torch.tensor([p["blur_apply"] for p in params])
        out["hflip"] = torch.tensor(hflip)
        return out


def holdout_split(entries: Sequence[dict], n: int = 800, seed: int = 666) -> tuple[list[dict], list[dict]]:
    """(train, val): `n` entries drawn without replacement as a validation hold-out (docs/method.md §1.1).

    Deterministic for `seed`, with numpy's generator (the reference used pandas.sample(n=800,
    random_state=666); the drawn videos differ, the protocol is the same). Order is kept.
    """
    if not 0 <= n <= len(entries):
        raise ValueError(f"cannot hold out {n} of {len(entries)} videos")
    held = set(np.random.default_rng(seed).choice(len(entries), size=n, replace=False).tolist())
    train = [e for i, e in enumerate(entries) if i not in held]
    val = [e for i, e in enumerate(entries) if i in held]
    return train, val


# ----------------------------------------------------------------------------- device side
def to_views(batch: dict, device: Union[str, torch.device], *, mean: Sequence[float] = augment.IMAGENET_MEAN,
             std: Sequence[float] = augment.IMAGENET_STD, out_dtype: torch.dtype = torch.float32,
             augment_colour: bool = True, backend: str = "auto") -> torch.Tensor:
    """uint8 batch -> normalised float views (B, V, C, T, H, W) on `device`.

    `permute_frames` (mean 0, std 1) gathers, flips (batch["hflip"]) and lays the clips out as
    [0, 1] floats; the per-sample jitter and blur (if the batch carries them and augment_colour)
    run batched on the device; normalisation by mean/std comes last.
    """
    from dualvar.kernels import identity_index, permute_frames
    video = batch["video"].to(device, non_blocking=True)
    B, V, T, H, W, C = video.shape
    flat = video.reshape(B * V, T, H, W, C)
    hflip = batch.get("hflip")
    hflip = hflip.reshape(-1).to(device) if hflip is not None else None
    x = permute_frames(flat, identity_index(B * V, T, device), (0.0,) * C, (1.0,) * C,
                       out_dtype=torch.float32, hflip=hflip, backend=backend)
    if augment_colour and "jitter" in batch:
        x = augment.apply_colour(x, batch["jitter"].reshape(B * V, 4), batch["jitter_order"].reshape(B * V, 4),
                                 batch["jitter_apply"].reshape(-1), batch["blur_sigma"].reshape(-1),
                                 batch["blur_apply"].reshape(-1))
    augment.normalise_(x, mean, std)
    return x.to(out_dtype).view(B, V, C, T, H, W)


# ----------------------------------------------------------------------------- sampler
class ResumableDistributedSampler(Sampler):
    """`DistributedSampler` order (same permutation, padding and sharding) with a saveable position.

    The position is the number of this rank's samples of the current epoch already consumed; it is
    advanced by `advance(n)` (VideoLoader does it per batch handed out, so prefetched batches do not
    count) and restored by `load_state_dict`, after which iteration continues from that sample.
    `set_epoch(e)` starts epoch e at position 0. With tag_epoch=True it yields (index, epoch) pairs.
    """

    def __init__(self, dataset_len, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, tag_epoch: bool = False):
        """dataset_len: the dataset's length, or the dataset itself (as DistributedSampler takes)."""
        if not isinstance(dataset_len, int):
            dataset_len = len(dataset_len)
        if num_replicas is None or rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if ready else 1)
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas - 1}]")
        self.dataset_len, self.num_replicas, self.rank = int(dataset_len), int(num_replicas), int(rank)
        self.shuffle, self.seed, self.drop_last, self.tag_epoch = shuffle, int(seed), drop_last, tag_epoch
        if drop_last and self.dataset_len % self.num_replicas:
            self.num_samples = math.ceil((self.dataset_len - self.num_replicas) / self.num_replicas)
        else:
            self.num_samples = math.ceil(self.dataset_len / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.epoch, self.position = 0, 0

    def epoch_indices(self) -> list[int]:
        """This rank's full index list of the current epoch (as torch's DistributedSampler)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            indices = list(range(self.dataset_len))
        if not self.drop_last:
            pad = self.total_size - len(indices)
            indices += (indices * math.ceil(pad / max(len(indices), 1)))[:pad]
        else:
            indices = indices[:self.total_size]
        return indices[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator:
        rest = self.epoch_indices()[self.position:]
        if self.tag_epoch:
            return iter([(i, self.epoch) for i in rest])
        return iter(rest)

    def __len__(self) -> int:
        return self.num_samples - self.position

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def advance(self, n: int) -> None:
        self.position = min(self.num_samples, self.position + int(n))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_replicas": self.num_replicas, "dataset_len": self.dataset_len}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_replicas", "dataset_len"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this sampler has {getattr(self, key)}; "
                                 "resuming needs the same dataset, seed and world size")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ----------------------------------------------------------------------------- loader
def seed_worker(worker_id: int, seed: int, rank: int, epoch: int) -> None:
    """worker_init_fn: seed torch, numpy and random from (seed, rank, worker id, epoch)."""
    ss = np.random.SeedSequence([seed, rank, worker_id, epoch])
    s64 = int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64).dot([1, 1 << 32]))
    torch.manual_seed(s64)
    np.random.seed(ss.generate_state(1)[0])
    random.seed(s64)


class VideoLoader:
    """DataLoader + ResumableDistributedSampler; counts consumed samples for exact resume.

    Iterating yields collated batches (dicts of tensors, leading dim B; see VideoClipDataset).
    `set_epoch`, `state_dict`, `load_state_dict` act on the sampler; `failures()` on the dataset.
    """

    def __init__(self, dataset: VideoClipDataset, batch_size: int, *, num_workers: int = 0, rank: int = 0,
                 num_replicas: int = 1, shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                 device: Union[str, torch.device, None] = None, prefetch_factor: int = 2,
                 persistent_workers: bool = True):
        self.dataset = dataset
        dataset.attach_counters(num_workers)
        self.sampler = ResumableDistributedSampler(len(dataset), num_replicas, rank, shuffle=shuffle, seed=seed,
                                                   drop_last=False, tag_epoch=True)
        pin = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        kw = {}
        if num_workers > 0:
            kw = dict(prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                      worker_init_fn=functools.partial(seed_worker, seed=seed, rank=rank, epoch=0))
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=pin, drop_last=drop_last, **kw)

    def __iter__(self):
        for batch in self.loader:
            self.sampler.advance(batch["index"].shape[0])
            yield batch

    def close(self) -> None:
        """Stop the worker processes now. A persistent iterator otherwise keeps them until garbage collection,
        and a later loader's fork then trips over them."""
        it = getattr(self.loader, "_iterator", None)
        self.loader._iterator = None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.dataset.set_epoch(state["epoch"])

    def failures(self) -> dict:
        return self.dataset.failures()


def build_loader(index_path_or_entries, mode: str = "pretrain", split: str = "train", batch_size: int = 8, *,
                 config: Optional[ClipConfig] = None, num_workers: int = 0, seed: int = 0, rank: int = 0,
                 num_replicas: int = 1, device=None, shuffle: Optional[bool] = None,
                 drop_last: Optional[bool] = None) -> VideoLoader:
    """Dataset + loader from an index file (JSONL, see index.py) or a list of entries.

    Unreadable/missing entries of the index are left out up front (they were probed); files that fail
    later are substituted and counted at read time.
    """
    from .index import load_index
    if isinstance(index_path_or_entries, (str, os.PathLike)):
        entries = load_index(str(index_path_or_entries), split=split, only_ok=True)
    else:
        entries = list(index_path_or_entries)
    dataset = VideoClipDataset(entries, mode=mode, config=config, seed=seed)
    train = mode != "eval"
    return VideoLoader(dataset, batch_size, num_workers=num_workers, rank=rank, num_replicas=num_replicas,
                       shuffle=train if shuffle is None else shuffle,
                       drop_last=train if drop_last is None else drop_last, seed=seed, device=device)
