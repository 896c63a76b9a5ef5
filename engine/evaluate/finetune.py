"""Fine-tuning: the whole pretrained network plus a linear classifier (docs/method.md §5.2, §6.1, §6.2).

    cfg = load_finetune_config("ucf101_after_ucf101", ["model.checkpoint=runs/pretrain", "data.split=2"])
    tuner = FineTuner(cfg, "runs/ft_ucf101")
    section = tuner.fit()                    # train, then the 10-clip test -> results.json, report.md

Command line: `dualvar finetune --config PRESET --checkpoint RUN_DIR_OR_SAFETENSORS [--index INDEX] [--split N]`.

Model (§6.1): backbone -> pooled feature (F) -> Linear(F, classes), weights N(0, 0.01^2), bias 0; no dropout,
no final BatchNorm, no L2 normalisation. The backbone comes from a pretraining run directory (its newest
readable checkpoint; MoCo: the query encoder), a file written by `dualvar export`, or `random:NAME[:SEED]`
(a randomly initialised backbone); projection and series heads are never loaded. Every layer is trained.

Training (§5.2): one clip per video from the data layer's "finetune" mode (16 frames at ds = 2, uniform
random start, random 112 crop, horizontal flip and colour jitter, both clip-consistent), cross-entropy, SGD
(momentum 0.9, weight decay 1e-3 on every parameter), lr 0.05 x0.1 at the preset's epochs. The training set
is the index's train split minus `data.holdout` videos (the paper: 800), which are the validation set
(`test.val_every_epochs`: one random-start, centre-cropped clip per video; it never selects the tested
checkpoint, as in the paper, which tests the last epoch).

Test (§6.2): every video of the test split, 10 clips at ds = 2 centred by the data layer's eval sampler, a
centre crop, softmax of each clip's logits averaged over the clips, top-1 and top-5. A test video that cannot
be read stays in the denominator as a wrong answer, never replaced by another video.

Checkpoints, resume (`--resume auto`), metrics.jsonl, TensorBoard and the progress bar are the pretraining
trainer's (engine/checkpoint.py, engine/metrics.py). Presets: engine/configs/finetune/*.yaml.
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import (CheckpointConfig, ConfigError, OptimConfig, TrainConfig, build_section, check, check_choice,
                      check_positive, load_sections, preset_names, sections_to_dict, validate_sections)

FINETUNE_PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                   "finetune")
SECTION = "finetune"
DATASETS = ("ucf101", "hmdb51", "synthetic", "list")

# Paper Table 4 (docs/method.md §7.1), top-1 %: ours, R(2+1)D-10, 16 x 112 x 112, by (pretraining set, method).
PAPER_TABLE4 = {
    ("ucf101", "moco"): {"label": "DualVar (MoCo), paper Table 4", "ucf101": 78.5, "hmdb51": 47.5},
    ("ucf101", "simclr"): {"label": "DualVar (SimCLR), paper Table 4", "ucf101": 79.0, "hmdb51": 45.4},
    ("kinetics400", "simclr"): {"label": "DualVar (SimCLR), paper Table 4", "ucf101": 82.0, "hmdb51": 51.2},
}
PAPER_BUDGET = {"ucf101": "UCF101 split-1 train, 200 epochs (checkpoint of epoch 189), batch 64",
                "kinetics400": "Kinetics-400 train, 200 epochs (checkpoint of epoch 189), batch 64"}


# ----------------------------------------------------------------------------- config
@dataclass
class FinetuneDataConfig:
    """The labelled videos (docs/method.md §5.2).

    dataset: "ucf101", "hmdb51", "list" (an index of any labelled set) or "synthetic" (generated on first use,
        as pretraining does). index: the JSONL index (`dualvar data index --split N`); "{split}" in it is
        replaced by `split`. split: the dataset's split number (1-3 for UCF101 and HMDB51; recorded in the
        results, the paper's numbers are split 1). train_split/test_split: the index's split names.
    holdout/holdout_seed: train videos held out as the validation set (the paper: 800, seed 666).
    frames, stride, crop, size, long, reference_resize: T, ds, crop side, decode H x W (or W x H).
    batch_size: clips per optimizer step over all processes (the paper: 4 GPUs x 4 = 16).
    """
    dataset: str = "ucf101"
    index: str = ""
    root: str = ""
    split: int = 1
    train_split: str = "train"
    test_split: str = "test"
    holdout: int = 800
    holdout_seed: int = 666
    frames: int = 16
    stride: int = 2
    crop: int = 112
    size: int = 128
    long: int = 171
    reference_resize: bool = False
    batch_size: int = 16
    num_workers: int = 4
    backend: str = "auto"
    synthetic_classes: int = 10
    synthetic_videos_per_class: int = 30
    synthetic_frames: int = 64
    synthetic_height: int = 128
    synthetic_width: int = 171

    def validate(self, p: str) -> None:
        check_choice(f"{p}.dataset", self.dataset, DATASETS)
        if self.dataset != "synthetic":
            check(bool(self.index), f"{p}.index", f"the path of a {self.dataset} index (dualvar data index)",
                   self.index)
        check_positive(f"{p}.split", self.split, integer=True)
        if self.dataset in ("ucf101", "hmdb51"):
            check(self.split in (1, 2, 3), f"{p}.split", "1, 2 or 3", self.split)
        for name in ("frames", "stride", "crop", "size", "long", "batch_size", "synthetic_classes",
                     "synthetic_videos_per_class", "synthetic_frames", "synthetic_height", "synthetic_width"):
            check_positive(f"{p}.{name}", getattr(self, name), integer=True)
        for name in ("holdout", "holdout_seed", "num_workers"):
            check_positive(f"{p}.{name}", getattr(self, name), integer=True, zero=True)
        short = min(self.size, self.long)
        check(self.crop <= short, f"{p}.crop", f"at most min(size, long) = {short}", self.crop)
        check_choice(f"{p}.backend", self.backend, ("auto", "decord", "pyav"))

    def index_path(self) -> str:
        return self.index.replace("{split}", str(self.split))


@dataclass
class FinetuneModelConfig:
    """checkpoint: a pretraining run directory, a `dualvar export` file or random:NAME[:SEED].
    backbone: the expected backbone name (empty: whatever the checkpoint holds). num_classes: 0 = from the
    index. init_std: std of the classifier's normal init. channels_last: as pretraining's ("auto": on GPU)."""
    checkpoint: str = ""
    backbone: str = ""
    num_classes: int = 0
    init_std: float = 0.01
    channels_last: str = "auto"

    def validate(self, p: str) -> None:
        check(bool(self.checkpoint), f"{p}.checkpoint", "a pretraining run directory, an exported .safetensors "
               "file or random:BACKBONE[:SEED] (--checkpoint)", self.checkpoint)
        if self.backbone:
            from ..models import BACKBONES
            check_choice(f"{p}.backbone", self.backbone, BACKBONES)
        check_positive(f"{p}.num_classes", self.num_classes, integer=True, zero=True)
        check_positive(f"{p}.init_std", self.init_std)
        check_choice(f"{p}.channels_last", self.channels_last, ("auto", "on", "off"))


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """The pretraining optimiser section with the fine-tuning defaults (after UCF101 pretraining)."""
    lr: float = 0.05
    weight_decay: float = 1e-3
    milestones: tuple = (30, 60, 80)


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """The pretraining run section with the fine-tuning default of 100 epochs."""
    epochs: int = 100


@dataclass
class FinetuneTestConfig:
    """clips: clips per test video (softmax-averaged); stride: their ds (the paper: 2); batch_size: test
    videos per forward pass (x clips); num_workers: test reading processes. val_every_epochs: validation on
    the held-out videos every N epochs (0: never). final_test: run the test at the end of training."""
    clips: int = 10
    stride: int = 2
    batch_size: int = 4
    num_workers: int = 2
    val_every_epochs: int = 0
    final_test: bool = True

    def validate(self, p: str) -> None:
        for name in ("clips", "stride", "batch_size"):
            check_positive(f"{p}.{name}", getattr(self, name), integer=True)
        for name in ("num_workers", "val_every_epochs"):
            check_positive(f"{p}.{name}", getattr(self, name), integer=True, zero=True)


@dataclass
class FinetuneConfig:
    """Root of a fine-tuning config (presets: engine/configs/finetune/NAME.yaml)."""
    name: str = "finetune"
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    test: FinetuneTestConfig = field(default_factory=FinetuneTestConfig)

    def validate(self) -> "FinetuneConfig":
        validate_sections(self)
        return self

    def to_dict(self) -> dict:
        return sections_to_dict(self)


def finetune_preset_names() -> list[str]:
    return preset_names(FINETUNE_PRESET_DIR)


def finetune_config_from_dict(values: dict) -> FinetuneConfig:
    return build_section(FinetuneConfig, values, "").validate()


def load_finetune_config(name_or_path: str, overrides: Optional[Sequence[str]] = None) -> FinetuneConfig:
    """A preset name (engine/configs/finetune/NAME.yaml, `base:` names another) or a YAML path, then dotted
    overrides ("optim.lr=0.01"); validated (ConfigError names a bad key by its dotted path)."""
    return load_sections(FinetuneConfig, name_or_path, overrides, FINETUNE_PRESET_DIR, "fine-tuning config")


# ----------------------------------------------------------------------------- model
class VideoClassifier(nn.Module):
    """backbone (N, 3, T, H, W) -> (N, F) -> Linear(F, classes) logits (docs/method.md §6.1)."""

    def __init__(self, backbone: nn.Module, num_classes: int, init_std: float = 0.01):
        super().__init__()
        if not hasattr(backbone, "feature_dim"):
            raise TypeError("backbone must have a feature_dim attribute (see dualvar.engine.models)")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.backbone = backbone
        self.fc = nn.Linear(backbone.feature_dim, num_classes)
        nn.init.normal_(self.fc.weight, 0.0, init_std)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


def wrap_model(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """The one place where the classifier is wrapped for training. One process: the model itself.
    (Multi-process training wraps it here: SyncBatchNorm as the paper, then DistributedDataParallel.)"""
    if world_size > 1:
        raise NotImplementedError("fine-tuning runs on one process for now (world_size must be 1)")
    return model


# ----------------------------------------------------------------------------- test-time maths
def clip_average_softmax(logits: torch.Tensor) -> torch.Tensor:
    """(B, clips, C) logits -> (B, C): the mean over clips of each clip's softmax (docs/method.md §6.2),
    computed in float32 (float64 stays float64)."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be (videos, clips, classes), got shape {tuple(logits.shape)}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.softmax(logits.to(dtype), dim=-1).mean(dim=1)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5),
                  valid: Optional[torch.Tensor] = None) -> dict:
    """{k: fraction of rows whose label is among the k highest scores}, k capped at the number of classes.
    Rows with valid=False count as wrong; ties rank the lower class index first."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (N, classes), got shape {tuple(scores.shape)}")
    if labels.shape != (scores.shape[0],) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape ({scores.shape[0]},)")
    n, c = scores.shape
    if n == 0:
        raise ValueError("scores: no rows")
    valid = torch.ones(n, dtype=torch.bool) if valid is None else valid.bool()
    order = torch.sort(scores.float().cpu(), dim=1, descending=True, stable=True).indices
    hit = order == labels.cpu()[:, None]
    out = {}
    for k in ks:
        kk = min(int(k), c)
        out[int(k)] = float((hit[:, :kk].any(1) & valid.cpu()).sum()) / n
    return out


# ----------------------------------------------------------------------------- evaluation clips
class ClipVideos(Dataset):
    """uint8 clips (clips, T, crop, crop, 3) of each entry, centre-cropped; a read failure is returned with
    ok=False, never substituted.

    mode "test": the ten-clip sampler (data layer `eval_indices`, docs/method.md §6.2). mode "val": one clip
    from the fine-tuning sampler (uniform random start, `finetune_indices`), drawn from (seed, epoch, i).
    """

    def __init__(self, entries: Sequence[dict], mode: str, *, frames: int, stride: int, clips: int, crop: int,
                 size: int, long: int, reference_resize: bool = False, backend: str = "auto", seed: int = 0,
                 epoch: int = 0, timeout_s: Optional[float] = 60.0):
        if mode not in ("test", "val"):
            raise ValueError(f"mode must be 'test' or 'val', got {mode!r}")
        self.entries, self.mode = list(entries), mode
        self.frames, self.stride, self.clips, self.crop = frames, stride, clips if mode == "test" else 1, crop
        self.size, self.long, self.reference_resize = size, long, reference_resize
        self.backend, self.seed, self.epoch, self.timeout_s = backend, seed, epoch, timeout_s

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        from ..data.augment import centre_crop, resize_hw
        from ..data.reader import VideoReadError, read_frames
        from ..data.sampling import eval_indices, finetune_indices
        h, w = resize_hw(self.size, self.long, self.reference_resize)
        if self.mode == "test":
            def indices(L):
                return eval_indices(L, self.frames, self.stride, self.clips)
        else:
            rng = np.random.default_rng([self.seed, self.epoch, i, 7])

            def indices(L):
                return finetune_indices(L, rng, self.frames, self.stride)[None]
        label = int(self.entries[i].get("label", -1))
        try:
            frames, _, _ = read_frames(str(self.entries[i]["path"]), indices, height=h, width=w, backend=self.backend,
                                       timeout_s=self.timeout_s)
            video = torch.from_numpy(np.stack([centre_crop(frames[v], self.crop) for v in range(frames.shape[0])]))
            return {"video": video, "ok": True, "kind": "ok", "detail": "", "label": label, "i": i}
        except VideoReadError as e:
            video = torch.zeros(self.clips, self.frames, self.crop, self.crop, 3, dtype=torch.uint8)
            return {"video": video, "ok": False, "kind": e.kind, "detail": str(e), "label": label, "i": i}


@torch.inference_mode()
def predict_videos(model: nn.Module, dataset: ClipVideos, *, device: torch.device, batch_size: int = 4,
                   num_workers: int = 0, amp_dtype: Optional[torch.dtype] = None, progress: bool = False,
                   desc: str = "test") -> dict:
    """Class probabilities of every video of `dataset` (clip softmaxes averaged), in order.

    Returns {"probs": float32 (N, C) (zeros where unreadable), "labels": int64 (N,), "valid": bool (N,),
    "clip_hits": correct top-1 clips, "clips": clips scored, "failures": {kind: count}, "failed": examples}.
    """
    from ..data import IMAGENET_MEAN, IMAGENET_STD, to_views
    from ..data.reader import FAILURE_KINDS
    was_training = model.training
    model.eval()
    n = len(dataset)
    probs: Optional[torch.Tensor] = None
    labels = torch.tensor([int(e.get("label", -1)) for e in dataset.entries], dtype=torch.int64)
    valid = torch.zeros(n, dtype=torch.bool)
    failures = {k: 0 for k in FAILURE_KINDS}
    failed: list = []
    clip_hits = clips = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    t0, done = time.perf_counter(), 0
    for batch in loader:
        ok = batch["ok"]
        rows = batch["i"]
        for good, kind, detail in zip(ok.tolist(), batch["kind"], batch["detail"]):
            if not good:
                failures[kind] = failures.get(kind, 0) + 1
                if len(failed) < 8:
                    failed.append(detail or kind)
        if ok.any():
            video = batch["video"][ok]
            B, V = video.shape[:2]
            x = to_views({"video": video}, device, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment_colour=False,
                         out_dtype=amp_dtype or torch.float32)
            with autocast:
                logits = model(x.reshape(B * V, *x.shape[2:]))
            logits = logits.float().view(B, V, -1)
            p = clip_average_softmax(logits).cpu()
            if probs is None:
                probs = torch.zeros(n, p.shape[1], dtype=torch.float32)
            idx = rows[ok]
            probs[idx] = p
            valid[idx] = True
            clip_hits += int((logits.argmax(-1).cpu() == batch["label"][ok][:, None]).sum())
            clips += B * V
        done += ok.numel()
        if progress:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            print(f"\r{desc}: {done}/{n} videos ({rate:.1f}/s)", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    model.train(was_training)
    if probs is None:
        probs = torch.zeros(n, 1)
    return {"probs": probs, "labels": labels, "valid": valid, "clip_hits": clip_hits, "clips": clips,
            "failures": failures, "failed": failed}


def score_predictions(pred: dict, num_classes: int) -> dict:
    """top-1, top-5 (top-min(5, C)), clip top-1 and the confusion matrix [true, predicted] of `predict_videos`'
    output; unreadable videos count as wrong. Non-finite probabilities (a diverged model) make the accuracies
    NaN, with their count in "nonfinite"."""
    probs, labels, valid = pred["probs"], pred["labels"], pred["valid"]
    nonfinite = int((~torch.isfinite(probs[valid])).any(1).sum()) if valid.any() else 0
    acc = topk_accuracy(probs, labels, (1, 5), valid) if not nonfinite else {1: math.nan, 5: math.nan}
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    if valid.any() and not nonfinite:
        top = torch.sort(probs[valid], dim=1, descending=True, stable=True).indices[:, 0]
        yv = labels[valid]
        known = (yv >= 0) & (yv < num_classes)
        conf.index_put_((yv[known], top[known]), torch.ones(int(known.sum()), dtype=torch.int64), accumulate=True)
    n = int(labels.numel())
    return {"top1": acc[1], "top5": acc[5], "top5_k": min(5, num_classes), "tested": n,
            "without_feature": int((~valid).sum()), "nonfinite": nonfinite,
            "clip_top1": pred["clip_hits"] / max(pred["clips"], 1) if not nonfinite else math.nan, "confusion": conf}


# ----------------------------------------------------------------------------- data
_PREPARE = {
    "ucf101": "dualvar data index --dataset ucf101 --root /path/to/UCF101 --split {split} --out {index}",
    "hmdb51": "dualvar data index --dataset hmdb51 --root /path/to/HMDB51 --split {split} --out {index}",
    "list": "dualvar data index --dataset list --root /path/to/videos --list /path/to/list.txt --out {index}",
}


def finetune_sets(data: FinetuneDataConfig) -> tuple[list, list, list, dict]:
    """(train, validation, test entries, info) of the config's index. Train: the readable videos of the train
    split minus `holdout` (the validation set, drawn as pretraining draws it); test: every test entry."""
    from ..data import holdout_split, load_index
    from .features import class_names_of, infer_dataset
    if data.dataset == "synthetic":
        from ..config import DataConfig
        from ..trainer import ensure_synthetic
        index = ensure_synthetic(DataConfig(dataset="synthetic", root=data.root, frames=data.frames,
                                            stride=data.stride, synthetic_classes=data.synthetic_classes,
                                            synthetic_videos_per_class=data.synthetic_videos_per_class,
                                            synthetic_frames=data.synthetic_frames,
                                            synthetic_height=data.synthetic_height,
                                            synthetic_width=data.synthetic_width))
    else:
        index = data.index_path()
        if not os.path.isfile(index):
            raise FileNotFoundError(f"data.index: no {data.dataset} index at {index}; prepare it with: "
                                    + _PREPARE[data.dataset].format(index=index, split=data.split))
    entries = load_index(index)
    train_all = [e for e in entries if e["split"] == data.train_split and e.get("status", "ok") == "ok"]
    test = [e for e in entries if e["split"] == data.test_split]
    if not test:
        raise ValueError(f"data.test_split: {index} has no {data.test_split!r} videos")
    if data.holdout >= len(train_all):
        raise ConfigError(f"data.holdout ({data.holdout}) must be smaller than the {len(train_all)} readable "
                          f"{data.train_split!r} videos of {index}")
    train, val = holdout_split(train_all, data.holdout, data.holdout_seed) if data.holdout else (train_all, [])
    info = {"index": os.path.abspath(index), "dataset": infer_dataset(entries), "split": data.split,
            "train_videos": len(train), "val_videos": len(val), "test_videos": len(test),
            "test_unreadable_in_index": sum(1 for e in test if e.get("status", "ok") != "ok"),
            "class_names": class_names_of(entries)}
    return train, val, test, info


def _autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ----------------------------------------------------------------------------- the fine-tuner
class FineTuner:
    """Builds the classifier, data, optimiser and checkpoints from a FinetuneConfig and runs the loop.

    run_dir gets finetune_config.yaml, metrics.jsonl, tensorboard/, checkpoints/, summary.json, results.json
    (section "finetune"), report.md and the plots. rank/world_size: this process's place in a distributed
    run (one process for now: see `wrap_model`).
    """

    def __init__(self, cfg: FinetuneConfig, run_dir: str, *, rank: int = 0, world_size: int = 1):
        import yaml

        from ..checkpoint import CheckpointManager, Counters, RNGState
        from ..data import ClipConfig, build_loader
        from ..export import git_revision
        from ..trainer import build_optimizer, lr_factor, resolve_device
        from .features import load_backbone

        self.cfg, self.run_dir, self.rank, self.world_size = cfg, run_dir, rank, world_size
        self.is_main = rank == 0
        d = cfg.data
        if d.batch_size % world_size:
            raise ConfigError(f"data.batch_size ({d.batch_size}) must be divisible by the number of processes "
                              f"({world_size})")
        self.device = resolve_device(cfg.train.device)
        self.amp_dtype = _autocast_dtype(cfg.train.precision, self.device)
        self.train_entries, self.val_entries, self.test_entries, self.info = finetune_sets(d)
        names = self.info["class_names"]
        self.num_classes = cfg.model.num_classes or len(names)
        labels = [int(e["label"]) for e in self.train_entries + self.test_entries]
        if min(labels) < 0 or max(labels) >= self.num_classes:
            raise ConfigError(f"model.num_classes ({self.num_classes}) must exceed every label of the index "
                              f"(labels {min(labels)}..{max(labels)})")
        self.class_names = (names + [f"class {i}" for i in range(len(names), self.num_classes)])[:self.num_classes]

        if getattr(cfg.train, "cpu_threads", 0):
            torch.set_num_threads(cfg.train.cpu_threads)
        seed = cfg.train.seed
        torch.manual_seed(seed)
        np.random.seed(seed + rank)
        backbone, self.source = load_backbone(cfg.model.checkpoint, device="cpu")
        if cfg.model.backbone and self.source.get("backbone") != cfg.model.backbone:
            raise ConfigError(f"model.backbone is {cfg.model.backbone!r} but {cfg.model.checkpoint} holds a "
                              f"{self.source.get('backbone')!r} backbone (model.backbone= accepts any)")
        torch.manual_seed(seed)  # the classifier's init does not depend on how the backbone was loaded
        self.model = VideoClassifier(backbone, self.num_classes, cfg.model.init_std).to(self.device).train()
        cl = cfg.model.channels_last
        if cl == "on" or (cl == "auto" and self.device.type == "cuda"):
            self.model.to(memory_format=torch.channels_last_3d)
        self.net = wrap_model(self.model, self.device, world_size)

        self.clip_config = ClipConfig(frames=d.frames, stride=d.stride, crop=d.crop, size=d.size, long=d.long,
                                      reference_resize=d.reference_resize, backend=d.backend)
        local = d.batch_size // world_size
        self.loader = build_loader(self.train_entries, "finetune", batch_size=local, config=self.clip_config,
                                   num_workers=d.num_workers, seed=seed, rank=rank, num_replicas=world_size,
                                   device=self.device)
        self.steps_per_epoch = self.loader.sampler.num_samples // local
        if self.steps_per_epoch < 1:
            raise ConfigError(f"data.batch_size ({d.batch_size}) is larger than the {len(self.train_entries)} "
                              "training videos: no full batch per epoch")
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(cfg.optim, step, self.steps_per_epoch, cfg.train.epochs))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.counters = Counters(step=0, epoch=0, nonfinite_steps=0)
        self.nonfinite_run = 0
        self.val_history: list = []
        if self.is_main:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "finetune_config.yaml"), "w") as f:
                yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        source = {k: v for k, v in self.source.items() if k != "config" and isinstance(v, (str, int, float, bool))}
        self.checkpoints = CheckpointManager(
            os.path.join(run_dir, "checkpoints"),
            {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler,
             "rng": RNGState(), "trainer": self.counters, "data": self.loader},
            keep=cfg.checkpoint.keep, is_main=self.is_main,
            meta={"kind": "finetune", "finetune_config": cfg.to_dict(), "source": source,
                  "git_revision": git_revision()}, log=self._message)
        self.logger = None

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: dict) -> dict:
        """One optimisation step on a loader batch (one clip per video); returns the step's metrics."""
        from ..data import to_views
        self.net.train()
        x = to_views(batch, self.device, out_dtype=self.amp_dtype or torch.float32)[:, 0]
        y = batch["label"].to(self.device)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else nullcontext())
        with autocast:
            logits = self.net(x)
        loss = F.cross_entropy(logits.float(), y)
        ok, acc = torch.stack([loss.isfinite().float(), (logits.argmax(1) == y).float().mean()]).tolist()
        grad_norm, bad = float("nan"), None
        if ok:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip_grad_norm or math.inf))
            if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
                bad = "grad_norm"
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
        else:
            bad = "loss"
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.counters.step += 1
        metrics = {"loss": float(loss.detach()), "train_top1": acc, "lr": lr, "grad_norm": grad_norm,
                   "epoch": self.counters.epoch}
        if bad:
            metrics["nonfinite"] = bad
        return metrics

    # ------------------------------------------------------------------ evaluation
    def _message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.logger is not None:
            self.logger.message(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def _clips(self, entries, mode: str, epoch: int = 0) -> ClipVideos:
        d, t = self.cfg.data, self.cfg.test
        return ClipVideos(entries, mode, frames=d.frames, stride=t.stride if mode == "test" else d.stride,
                          clips=t.clips, crop=d.crop, size=d.size, long=d.long, reference_resize=d.reference_resize,
                          backend=d.backend, seed=self.cfg.train.seed, epoch=epoch)

    def _validation_history(self) -> list:
        """Validation rows of the whole run (metrics.jsonl, across resumes), else this process's."""
        from .report import read_metrics
        rows = read_metrics(os.path.join(self.run_dir, "metrics.jsonl"))
        keys = ("step", "epoch", "val_top1", "val_top5")
        found = [{k: r[k] for k in keys if k in r} for r in rows if "val_top1" in r]
        return found or list(self.val_history)

    def validate(self) -> Optional[dict]:
        """Top-1 on the held-out videos (one random-start, centre-cropped clip each); None without hold-out."""
        if not self.val_entries:
            return None
        t = self.cfg.test
        pred = predict_videos(self.model, self._clips(self.val_entries, "val", self.counters.epoch),
                              device=self.device, batch_size=t.batch_size * t.clips, num_workers=t.num_workers,
                              amp_dtype=self.amp_dtype)
        res = score_predictions(pred, self.num_classes)
        out = {"step": self.counters.step, "epoch": self.counters.epoch, "val_top1": res["top1"],
               "val_top5": res["top5"]}
        self.val_history.append(out)
        return out

    def test(self, *, progress: bool = True) -> dict:
        """The ten-clip test (docs/method.md §6.2) of the current weights; writes the "finetune" section of
        results.json, the plots and report.md (main process); returns the section."""
        t, d = self.cfg.test, self.cfg.data
        t0 = time.perf_counter()
        pred = predict_videos(self.model, self._clips(self.test_entries, "test"), device=self.device,
                              batch_size=t.batch_size, num_workers=t.num_workers, amp_dtype=self.amp_dtype,
                              progress=progress and self.cfg.train.progress, desc="test videos")
        res = score_predictions(pred, self.num_classes)
        protocol = {"dataset": self.info["dataset"], "split": d.split, "frames": d.frames, "stride": t.stride,
                    "clips": t.clips, "crop": d.crop, "size": d.size, "long": d.long, "holdout": d.holdout,
                    "train_stride": d.stride, "epochs": self.cfg.train.epochs, "batch_size": d.batch_size,
                    "lr": self.cfg.optim.lr, "milestones": list(self.cfg.optim.milestones),
                    "weight_decay": self.cfg.optim.weight_decay}
        pre_cfg = self.source.get("config") if isinstance(self.source.get("config"), dict) else {}
        pretrain = {"dataset": (pre_cfg.get("data") or {}).get("dataset"), "method": self.source.get("method"),
                    "mode": self.source.get("mode"), "step": self.source.get("step"),
                    "epochs": (pre_cfg.get("train") or {}).get("epochs"), "run": self.source.get("run"),
                    "random_init": bool(self.source.get("random_init"))}
        section = {**{k: v for k, v in res.items()}, "protocol": protocol, "pretrain": pretrain,
                   "paper": paper_row(protocol, pretrain, self.source.get("backbone")),
                   "checkpoint": {k: self.source.get(k) for k in ("source", "backbone", "method", "mode", "step",
                                                                  "run", "random_init", "seed")
                                  if self.source.get(k) is not None},
                   "trained": {"steps": self.counters.step, "epochs_done": self.counters.step / self.steps_per_epoch,
                               "train_videos": len(self.train_entries),
                               "nonfinite_steps": self.counters.nonfinite_steps},
                   "validation": self._validation_history(),
                   "sets": {k: v for k, v in self.info.items() if k != "class_names"},
                   "failures": pred["failures"], "failed_examples": pred["failed"], "device": str(self.device),
                   "test_seconds": time.perf_counter() - t0}
        if self.is_main:
            from . import report
            report.plot_confusion(res["confusion"], self.class_names, os.path.join(self.run_dir, CONFUSION_PNG),
                                  title="Fine-tuned: test confusion (rows: true class, row-normalised)")
            report.update_results(self.run_dir, SECTION, section)
            write_finetune_report(self.run_dir)
        return section

    # ------------------------------------------------------------------ loop
    def resume(self, how: Optional[str] = None) -> Optional[int]:
        return self.checkpoints.resume(how or self.cfg.checkpoint.resume)

    def fit(self) -> dict:
        """Train to the end (or resume and finish), then test (test.final_test); returns the "finetune"
        section (or the training summary when the test is off)."""
        from ..metrics import MetricsLogger, peak_memory_bytes
        from ..trainer import NonFiniteLossError, checkpoint_due, log_due, step_rates
        cfg = self.cfg
        resumed = self.resume()
        if resumed is None:
            self.loader.set_epoch(self.counters.epoch)
        self.logger = MetricsLogger(self.run_dir, is_main=self.is_main, total_steps=self.total_steps,
                                    start_step=self.counters.step, tensorboard=cfg.train.tensorboard,
                                    progress=cfg.train.progress)
        self._message(f"{cfg.name}: fine-tuning {self.source.get('backbone')} from {cfg.model.checkpoint} on "
                      f"{self.info['dataset']} split {cfg.data.split} ({len(self.train_entries)} train, "
                      f"{len(self.val_entries)} validation, {len(self.test_entries)} test videos, "
                      f"{self.num_classes} classes), {self.steps_per_epoch} steps/epoch, {self.total_steps} steps, "
                      f"device {self.device}, run dir {self.run_dir}")
        every = cfg.checkpoint.every_steps
        t_start, steps_done = time.perf_counter(), 0
        try:
            while self.counters.step < self.total_steps:
                t0 = time.perf_counter()
                for batch in self.loader:
                    t1 = time.perf_counter()
                    metrics = self.train_step(batch)
                    t2 = time.perf_counter()
                    step, steps_done = self.counters.step, steps_done + 1
                    stop = self._count_nonfinite(metrics)
                    if log_due(step, metrics, cfg.train.log_every, self.total_steps):
                        metrics.update(step_rates(t0, t1, t2, batch["video"].shape[0] * self.world_size, self.device))
                        self.logger.log(step, metrics)
                    self.logger.advance()
                    if stop:
                        raise NonFiniteLossError(stop)
                    epoch_done = step % self.steps_per_epoch == 0
                    if epoch_done:  # before the checkpoint: it resumes at the next epoch's first batch
                        self._end_epoch()
                    if checkpoint_due(step, every, self.total_steps):
                        self.checkpoints.save(step)
                    if step >= self.total_steps or epoch_done:
                        break
                    t0 = time.perf_counter()
                else:  # the loader ran dry before the epoch's last step (not expected with full batches)
                    self._end_epoch()
        except BaseException:
            self.logger.close()
            raise
        wall = time.perf_counter() - t_start
        summary = {"steps": self.counters.step, "epochs_done": self.counters.step / self.steps_per_epoch,
                   "resumed_from": resumed, "steps_this_run": steps_done, "wall_s": wall,
                   "nonfinite_steps": self.counters.nonfinite_steps,
                   "peak_mem_mb": peak_memory_bytes(self.device) / 2**20}
        self.logger.summary(summary)
        self.logger.close()
        self.logger = None
        self.release_loader()
        if not cfg.test.final_test:
            return summary
        section = self.test()
        self._message(f"test ({section['tested']} videos, {cfg.test.clips} clips each): top-1 "
                      f"{100 * section['top1']:.1f}%  top-{section['top5_k']} {100 * section['top5']:.1f}%")
        return section

    def release_loader(self) -> None:
        """Stop the training loader's (persistent) worker processes, e.g. before the test's loader forks."""
        self.loader.close()

    def _end_epoch(self) -> None:
        """Count the finished epoch, validate when due, and point the loader at the next epoch."""
        self.counters.epoch += 1
        val_every = self.cfg.test.val_every_epochs
        if val_every and self.counters.epoch % val_every == 0:
            val = self.validate()
            if val is not None:
                self.logger.log(self.counters.step, {k: v for k, v in val.items() if k != "step"})
                self._message(f"epoch {self.counters.epoch}: validation top-1 {100 * val['val_top1']:.1f}% "
                              f"({len(self.val_entries)} held-out videos)")
        self.loader.set_epoch(self.counters.epoch)

    def _count_nonfinite(self, metrics: dict) -> Optional[str]:
        from ..trainer import count_nonfinite
        return count_nonfinite(self, metrics, lambda m: f"loss {m['loss']:.4g}", "non-finite {part}")


# ----------------------------------------------------------------------------- paper row and report
TRAINING_PNG, CONFUSION_PNG = "finetune_training.png", "finetune_confusion.png"


def paper_row(protocol: dict, pretrain: dict, backbone: Optional[str]) -> Optional[dict]:
    """The paper's Table 4 number for this run's setting, or None where the protocol differs (dataset other
    than UCF101/HMDB51 split 1, other clips, or a pretraining set/method the paper has no row for). The
    backbone and budgets may differ: the report shows both."""
    want = {"split": 1, "frames": 16, "stride": 2, "clips": 10, "crop": 112, "size": 128, "long": 171}
    if protocol.get("dataset") not in ("ucf101", "hmdb51") or any(protocol.get(k) != v for k, v in want.items()):
        return None
    row = PAPER_TABLE4.get((pretrain.get("dataset"), pretrain.get("method")))
    if row is None or pretrain.get("mode") != "clip-sr-tc":
        return None
    epochs = 150 if pretrain["dataset"] == "kinetics400" else 100
    return {"label": row["label"], "arch": "R(2+1)D-10 (r2plus1d_10)", "top1": row[protocol["dataset"]],
            "setting": f"pretrained on {PAPER_BUDGET[pretrain['dataset']]}; fine-tuned {epochs} epochs, batch 16, "
                       f"{protocol['dataset'].upper()} split 1, 10-clip test"}


def plot_finetune_training(rows: Sequence[dict], path: str, title: str = "Fine-tuning") -> Optional[str]:
    """Loss, train/validation top-1 and learning rate over steps (metrics.jsonl rows)."""
    from .report import _figure, _number, _save
    rows = [r for r in rows if "loss" in r or "val_top1" in r]
    if not rows:
        return None
    fig = _figure(7, 7)
    if fig is None:
        return None
    panels = [("loss", ["loss"]), ("top-1 (%)", ["train_top1", "val_top1"]), ("learning rate", ["lr"])]
    for i, (name, keys) in enumerate(panels):
        ax = fig.add_subplot(3, 1, i + 1)
        for k in keys:
            pts = [(r["step"], _number(r[k]) * (100 if "top1" in k else 1)) for r in rows if k in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if k == "val_top1" else "-", label=k,
                        linewidth=0.9, markersize=3)
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        if name.startswith("top"):
            ax.legend(fontsize=7)
        if i == 0:
            ax.set_title(title)
    ax.set_xlabel("step")
    return _save(fig, path)


def finetune_markdown(sec: dict) -> str:
    """The fine-tuning section of a report: our top-1/top-5 (and the paper's Table 4 row where the protocol
    matches), the protocol, budgets, and unreadable videos."""
    from .report import _number, _pct, _table
    proto, ck, pre, tr = sec.get("protocol", {}), sec.get("checkpoint", {}), sec.get("pretrain", {}), \
        sec.get("trained", {})
    k = sec.get("top5_k", 5)
    init = "random init" if pre.get("random_init") else \
        f"{pre.get('method') or '?'} {pre.get('mode') or ''} on {pre.get('dataset') or '?'}, step {pre.get('step')}"
    ours = f"this run ({ck.get('backbone', '?')}; {init})"
    rows = [[ours, proto.get("dataset", "?"), _pct(sec.get("top1")), _pct(sec.get("top5"))]]
    paper = sec.get("paper")
    if paper:
        rows.append([f"{paper['label']}, {paper['arch']}", proto.get("dataset"), f"{_number(paper['top1']):.1f}",
                     "-"])
    out = ["## Fine-tuning", "", _table(["fine-tuned (%)", "dataset", "top-1", f"top-{k}"], rows), ""]
    if paper:
        out += [f"Paper row: {paper['setting']}. This run: {tr.get('steps')} steps ({tr.get('epochs_done', 0):.4g} "
                f"epochs of {tr.get('train_videos')} videos, batch {proto.get('batch_size')}).", ""]
    else:
        out += ["The paper's Table 4 is not shown: this run does not follow its protocol (UCF101 or HMDB51 split 1, "
                "16 frames at ds 2, 112 crop, 10-clip test, after DualVar clip-sr-tc pretraining on UCF101 or "
                "Kinetics-400).", ""]
    out += [f"Protocol: {proto.get('dataset')} split {proto.get('split')}; trained {tr.get('steps')} steps "
            f"({tr.get('epochs_done', 0):.4g} epochs) on {tr.get('train_videos')} videos ({proto.get('holdout')} "
            f"held out), batch {proto.get('batch_size')}, lr {proto.get('lr')} x0.1 at epochs "
            f"{proto.get('milestones')}, weight decay {proto.get('weight_decay')}; clips of {proto.get('frames')} "
            f"frames at ds {proto.get('train_stride')}, {proto.get('crop')} crop of {proto.get('size')}x"
            f"{proto.get('long')} frames. Test: {sec.get('tested')} videos, {proto.get('clips')} clips each at ds "
            f"{proto.get('stride')}, centre crop, clip softmaxes averaged (single-clip top-1 "
            f"{_pct(sec.get('clip_top1'))}%).", ""]
    val = sec.get("validation") or []
    if val:
        out += [f"Validation (held-out videos, one random clip): top-1 {_pct(val[-1].get('val_top1'))}% at epoch "
                f"{val[-1].get('epoch')} (the tested weights are the last epoch's, as in the paper).", ""]
    if sec.get("nonfinite"):
        out += [f"**Non-finite outputs** for {sec['nonfinite']} test videos: accuracy is NaN.", ""]
    if sec.get("without_feature"):
        out += [f"**Unreadable videos:** {sec['without_feature']} of {sec.get('tested')} test videos could not be "
                "read and count as wrong.", ""]
        out += [f"    {line}" for line in sec.get("failed_examples", [])[:5]] + [""]
    return "\n".join(out)


def write_finetune_report(run_dir: str) -> str:
    """(Re)write RUN_DIR/report.md of a fine-tuning run from results.json and metrics.jsonl; returns its path."""
    from .report import read_metrics, read_results
    results = read_results(run_dir)
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    name = os.path.basename(os.path.abspath(run_dir))
    parts = [f"# Report: {name}", ""]
    if SECTION in results:
        parts.append(finetune_markdown(results[SECTION]))
    if rows and plot_finetune_training(rows, os.path.join(run_dir, TRAINING_PNG), title=f"Fine-tuning: {name}"):
        parts += [f"![training]({TRAINING_PNG})", ""]
    if os.path.isfile(os.path.join(run_dir, CONFUSION_PNG)):
        parts += [f"![confusion]({CONFUSION_PNG})", ""]
    if len(parts) == 2:
        parts += ["Nothing to report yet.", ""]
    path = os.path.join(run_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(parts).rstrip() + "\n")
    return path
