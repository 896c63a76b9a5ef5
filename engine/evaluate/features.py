"""Frozen-backbone video features: loading a backbone, multi-clip extraction, and an on-disk cache.

A video's feature is the mean over `clips` temporal clips (docs/method.md §6.2-6.3: 10 clips of T frames at
stride ds, centres spread over the video, resize to size x long then a centre crop) of the backbone's pooled
output, in eval mode (BatchNorm uses its running statistics). Videos are read directly, one entry at a time:
unlike the training loader, a video that cannot be read is never replaced by another one. It is recorded
as failed (by kind) and its row is marked invalid, so evaluations can count it in their denominators.

Cache: one file per (model, clip settings) holding one row per video path, with the file's size and
mtime; any subset of videos (gallery, queries, probe train/test) reuses it, and a video is decoded again
only when its file changed. Failed reads of existing files are cached too (same key); missing files and
timed-out reads are not.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.augment import IMAGENET_MEAN, IMAGENET_STD, centre_crop, resize_hw
from ..data.dataset import to_views
from ..data.reader import FAILURE_KINDS, VideoReadError, read_frames
from ..data.sampling import eval_indices

# 2: the ten-clip sampler's window is the clip length T (was the reference's fixed 16): older features differ
CACHE_VERSION = 2
RANDOM_PREFIX = "random:"


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class FeatureConfig:
    """How clips are taken from each video (defaults: the retrieval protocol, docs/method.md §6.3).

    frames/stride/clips: T, ds and the number of clips per video (centres as in §6.2). size/long: decode
    size H x W (reference_resize=True: W x H, the reference's quirk); crop: centre crop side.
    mean/std: per-channel normalisation of [0, 1] pixels (the pretraining run's).
    """
    frames: int = 16
    stride: int = 4
    clips: int = 10
    size: int = 128
    long: int = 171
    crop: int = 112
    reference_resize: bool = False
    mean: tuple = tuple(IMAGENET_MEAN)
    std: tuple = tuple(IMAGENET_STD)

    def __post_init__(self):
        for name in ("frames", "stride", "clips", "size", "long", "crop"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"FeatureConfig.{name} must be a positive integer, got {v!r}")
        h, w = resize_hw(self.size, self.long, self.reference_resize)
        if self.crop > min(h, w):
            raise ValueError(f"FeatureConfig.crop ({self.crop}) must fit in the resized {h}x{w} frames")
        for name in ("mean", "std"):
            v = tuple(float(x) for x in getattr(self, name))
            if len(v) != 3 or (name == "std" and min(v) <= 0):
                raise ValueError(f"FeatureConfig.{name} must be 3 numbers{' > 0' if name == 'std' else ''}, "
                                 f"got {getattr(self, name)!r}")
            object.__setattr__(self, name, v)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# ----------------------------------------------------------------------------- backbones
def file_digest(path: str, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (hex): the cache key of a checkpoint, robust to copies and renames."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def parse_export_metadata(raw: Optional[dict]) -> dict:
    """An exported file's string metadata as Python values: JSON values decoded ("config" becomes the
    run's nested config dict, mean/std lists, numbers numbers); other strings kept."""
    meta: dict = {}
    for k, v in (raw or {}).items():
        try:
            meta[k] = json.loads(v)
        except (TypeError, ValueError):
            meta[k] = v
    return meta


def _default_builder(name: str) -> nn.Module:
    from ..models import build_backbone
    return build_backbone(name)


def _meta_from_config(cfg: dict) -> dict:
    """Backbone name and clip settings of a run's config dict (as stored in checkpoints and exports)."""
    data, model = cfg.get("data", {}), cfg.get("model", {})
    return {"backbone": model.get("backbone"), "method": model.get("framework"), "mode": model.get("mode"),
            "frames": data.get("frames"), "stride": data.get("stride"), "crop": data.get("crop"),
            "size": data.get("size"), "long": data.get("long"), "run": cfg.get("name"), "config": cfg}


def load_backbone(path_or_run_dir: str, *, device: Union[str, torch.device] = "cpu",
                  builder: Optional[Callable[[str], nn.Module]] = None) -> tuple[nn.Module, dict]:
    """(backbone in eval mode on `device`, metadata) from a run directory, an exported file or a random init.

    path_or_run_dir:
      - a pretraining run directory: the backbone (MoCo: the query encoder) of its newest readable
        checkpoint (RUN_DIR/checkpoints/step-*.pt), rebuilt from the config stored in the checkpoint;
      - a .safetensors file written by `dualvar export` (the backbone's state dict; metadata "backbone",
        "frames", "stride", "size" = crop side, "mean", "std", "config" = the run's config as JSON, ...);
      - "random:NAME[:SEED]": build_backbone(NAME) initialised under torch.manual_seed(SEED) (default 0).
    Metadata returned: "backbone", "frames", "stride", "crop", "size", "long" (decode size, from the run's
    config when known), "mean"/"std" when known, "config" (dict) when known, "source" (absolute path or the
    spec), "model_key" (sha256 of the file read, or the spec: what the feature cache is keyed by).
    builder(name) -> nn.Module builds the backbone (default: dualvar.engine.models.build_backbone).
    """
    builder = builder or _default_builder
    src = str(path_or_run_dir)
    if src.startswith(RANDOM_PREFIX):
        parts = src[len(RANDOM_PREFIX):].split(":")
        if not parts[0] or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise ValueError(f"checkpoint: expected {RANDOM_PREFIX}NAME[:SEED], got {src!r}")
        seed = int(parts[1]) if len(parts) == 2 else 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = builder(parts[0])
        # keyed by the weights themselves: a change to the architecture's code invalidates cached features
        h = hashlib.sha256()
        for k, v in model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        meta = {"backbone": parts[0], "seed": seed, "random_init": True, "source": src,
                "model_key": f"random:{parts[0]}:{seed}:{h.hexdigest()[:16]}"}
    elif os.path.isdir(src):
        from ..checkpoint import newest_readable
        from ..export import backbone_state
        found = newest_readable(os.path.join(src, "checkpoints"), log=lambda m: print(m, file=sys.stderr))
        if found is None:
            raise FileNotFoundError(f"checkpoint: no readable checkpoint in {os.path.join(src, 'checkpoints')}")
        ckpt, content = found
        state, _ = backbone_state(content)
        cfg = content["meta"]["config"]
        meta = {**_meta_from_config(cfg), "step": content.get("step"), "checkpoint": os.path.abspath(ckpt)}
        model = builder(str(meta["backbone"]))
        model.load_state_dict(state, strict=True)
        meta.update(source=os.path.abspath(ckpt), model_key="sha256:" + file_digest(ckpt))
    elif os.path.isfile(src):
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(src, framework="pt") as f:
            raw = f.metadata()
        meta = parse_export_metadata(raw)
        if "backbone" not in meta:
            raise ValueError(f"checkpoint: {src} has no 'backbone' entry in its metadata (keys: {sorted(meta)}); "
                             "write it with `dualvar export`")
        if "size" in meta:  # the export's "size" is the crop side
            meta["crop"] = meta.pop("size")
        if isinstance(meta.get("config"), dict):
            meta = {**{k: v for k, v in _meta_from_config(meta["config"]).items() if v is not None}, **meta}
        model = builder(str(meta["backbone"]))
        model.load_state_dict(load_file(src), strict=True)
        meta.update(source=os.path.abspath(src), model_key="sha256:" + file_digest(src))
    else:
        raise FileNotFoundError(f"checkpoint: no such run directory or file: {src} (or use "
                                f"{RANDOM_PREFIX}NAME[:SEED] for a randomly initialised backbone)")
    if not hasattr(model, "feature_dim"):
        raise TypeError(f"checkpoint: backbone {meta['backbone']!r} has no feature_dim attribute")
    return model.to(device).eval(), meta


def feature_config_from_meta(meta: dict, **overrides) -> FeatureConfig:
    """FeatureConfig from a checkpoint's metadata (frames, crop, size, long, reference_resize, mean, std);
    stride and clips are the protocol's (4 and 10, docs/method.md §6.3) unless overridden. Overrides that
    are None are ignored."""
    kw: dict = {}
    for name in ("frames", "crop", "size", "long"):
        if meta.get(name) is not None:
            kw[name] = int(meta[name])
    if "reference_resize" in meta:
        kw["reference_resize"] = bool(meta["reference_resize"])
    for name in ("mean", "std"):
        if meta.get(name) is not None:
            kw[name] = tuple(float(v) for v in meta[name])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return FeatureConfig(**kw)


# ----------------------------------------------------------------------------- cache
def _file_key(path: str) -> Optional[list]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


class FeatureCache:
    """Per-video features of one model under one FeatureConfig, in `cache_dir/features-<key>.pt`.

    Rows: path -> (file key [size, mtime_ns], status "ok" or a failure kind, feature or None, detail).
    """

    def __init__(self, cache_dir: str, model_key: str, config: FeatureConfig):
        ident = json.dumps({"v": CACHE_VERSION, "model": model_key, "clips": config.to_dict()}, sort_keys=True)
        self.key = hashlib.sha256(ident.encode()).hexdigest()[:20]
        self.ident = ident
        self.path = os.path.join(cache_dir, f"features-{self.key}.pt")
        self.rows: dict = {}
        self.dirty = False
        if os.path.isfile(self.path):
            try:
                blob = torch.load(self.path, map_location="cpu", weights_only=True)
                if blob.get("ident") == ident:
                    self.rows = blob["rows"]
            except Exception as e:  # a corrupt cache is rebuilt, never trusted
                print(f"dualvar: ignoring unreadable feature cache {self.path} ({e})", file=sys.stderr)

    def get(self, path: str) -> Optional[dict]:
        row = self.rows.get(path)
        key = _file_key(path)
        if row is None or key is None or row["file_key"] != key:
            return None
        return row

    def put(self, path: str, status: str, feature: Optional[torch.Tensor], detail: str = "") -> None:
        key = _file_key(path)
        if key is None or status == "timeout":  # missing files and timeouts (transient) are retried every time
            return
        self.rows[path] = {"file_key": key, "status": status,
                           "feature": None if feature is None else feature.detach().float().cpu().clone(),
                           "detail": detail}
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        torch.save({"ident": self.ident, "rows": self.rows}, tmp)
        os.replace(tmp, self.path)
        self.dirty = False


# ----------------------------------------------------------------------------- extraction
@dataclass
class FeatureSet:
    """Features of a list of videos, in the list's order.

    features: float32 (N, F), zeros where invalid; labels: int64 (N,); valid: bool (N,) (False = the video
    could not be read); paths: N paths; kinds: per row "ok" or the failure kind; failures: {kind: count}
    over invalid rows; failed: up to a few 'kind: path: detail' lines; decoded: videos read in this call
    (0 when everything came from the cache).
    """
    features: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    paths: list
    kinds: list = field(default_factory=list)
    failures: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)
    decoded: int = 0

    @property
    def num_failed(self) -> int:
        return int((~self.valid).sum())


def _count_failures(kinds: Sequence[str]) -> dict:
    out = {k: 0 for k in FAILURE_KINDS}
    for k in kinds:
        if k and k != "ok":
            out[k] = out.get(k, 0) + 1
    return out


class _EvalVideos(Dataset):
    """Reads the centre-cropped uint8 clips (clips, T, crop, crop, 3) of each path; failures are returned
    as an item with ok=False (never substituted)."""

    def __init__(self, paths: Sequence[str], config: FeatureConfig, backend: str, timeout_s: Optional[float]):
        self.paths, self.config, self.backend, self.timeout_s = list(paths), config, backend, timeout_s

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        c = self.config
        h, w = resize_hw(c.size, c.long, c.reference_resize)
        try:
            frames, _, _ = read_frames(self.paths[i], lambda L: eval_indices(L, c.frames, c.stride, c.clips),
                                       height=h, width=w, backend=self.backend, timeout_s=self.timeout_s)
            video = torch.from_numpy(np.stack([centre_crop(frames[v], c.crop) for v in range(c.clips)]))
            return {"video": video, "ok": True, "kind": "ok", "detail": "", "i": i}
        except VideoReadError as e:
            video = torch.zeros(c.clips, c.frames, c.crop, c.crop, 3, dtype=torch.uint8)
            return {"video": video, "ok": False, "kind": e.kind, "detail": str(e), "i": i}


@torch.inference_mode()
def embed_clips(backbone: nn.Module, video: torch.Tensor, config: FeatureConfig,
                device: Union[str, torch.device]) -> torch.Tensor:
    """uint8 (B, clips, T, H, W, 3) -> float32 (B, F): the mean of the backbone's pooled clip features."""
    B, V = video.shape[:2]
    x = to_views({"video": video}, device, mean=config.mean, std=config.std, out_dtype=torch.float32,
                 augment_colour=False)
    feats = backbone(x.reshape(B * V, *x.shape[2:])).float()
    if feats.dim() != 2 or feats.shape[0] != B * V:
        raise ValueError(f"backbone must return pooled (N, F) features, got shape {tuple(feats.shape)}")
    return feats.view(B, V, -1).mean(1)


def extract_features(backbone: nn.Module, entries: Sequence[dict], config: FeatureConfig, *,
                     device: Union[str, torch.device] = "cpu", batch_size: int = 8, num_workers: int = 0,
                     cache: Optional[FeatureCache] = None, video_backend: str = "auto",
                     timeout_s: Optional[float] = 60.0, progress: bool = False, desc: str = "features",
                     save_every: int = 50) -> FeatureSet:
    """Features (FeatureSet) of `entries` (index dicts with "path" and "label"), in order.

    Rows found in `cache` (same file size and mtime) are not decoded; the rest are read in batches by
    `num_workers` loader processes, embedded with `embed_clips` and written back to the cache (saved every
    `save_every` batches and at the end, so an interrupted run keeps its work).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not entries:
        raise ValueError("entries: no videos to extract features from")
    was_training = backbone.training
    backbone.eval()
    paths = [str(e["path"]) for e in entries]
    labels = torch.tensor([int(e.get("label", -1)) for e in entries], dtype=torch.int64)
    n = len(paths)
    rows: list = [None] * n
    todo = []
    for i, p in enumerate(paths):
        hit = cache.get(p) if cache is not None else None
        if hit is not None:
            rows[i] = hit
        else:
            todo.append(i)
    decoded = 0
    if todo:
        ds = _EvalVideos([paths[i] for i in todo], config, video_backend, timeout_s)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            persistent_workers=False)
        t0, done = time.perf_counter(), 0
        for b, batch in enumerate(loader):
            ok = batch["ok"]
            feats = embed_clips(backbone, batch["video"][ok], config, device).cpu() if ok.any() else None
            j = 0
            for pos, (good, kind, detail) in enumerate(zip(ok.tolist(), batch["kind"], batch["detail"])):
                i = todo[int(batch["i"][pos])]
                feat = None
                if good:
                    feat, j = feats[j], j + 1
                rows[i] = {"status": kind, "feature": feat, "detail": detail}
                if cache is not None:
                    cache.put(paths[i], kind, feat, detail)
            decoded += ok.numel()
            done += ok.numel()
            if cache is not None and (b + 1) % save_every == 0:
                cache.save()
            if progress:
                rate = done / max(time.perf_counter() - t0, 1e-9)
                print(f"\r{desc}: {done}/{len(todo)} videos decoded ({rate:.1f}/s), "
                      f"{n - len(todo)} from the cache", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
    if cache is not None:
        cache.save()
    backbone.train(was_training)
    dim = next((r["feature"].numel() for r in rows if r["feature"] is not None), getattr(backbone, "feature_dim", 0))
    features = torch.zeros(n, dim, dtype=torch.float32)
    valid = torch.zeros(n, dtype=torch.bool)
    kinds, failed = [], []
    for i, r in enumerate(rows):
        kinds.append(r["status"])
        if r["feature"] is not None:
            features[i] = r["feature"]
            valid[i] = True
        elif len(failed) < 8:
            failed.append(r["detail"] or f"{r['status']}: {paths[i]}")
    return FeatureSet(features, labels, valid, paths, kinds, _count_failures(kinds), failed, decoded)


# ----------------------------------------------------------------------------- evaluation sets
def infer_dataset(entries: Sequence[dict]) -> str:
    """"ucf101", "hmdb51", "kinetics400", "synthetic" or "unknown", from the index's class names."""
    names = {str(e.get("class_name", "")) for e in entries}
    if len(names) == 101 and "ApplyEyeMakeup" in names:
        return "ucf101"
    if len(names) == 51 and "brush_hair" in names:
        return "hmdb51"
    if len(names) == 400:
        return "kinetics400"
    from ..data.synthetic import MOTIONS
    if names and all("Then" in n and all(p in MOTIONS for p in n.split("Then")) for n in names):
        return "synthetic"
    return "unknown"


def class_names_of(entries: Sequence[dict]) -> list:
    """Class names indexed by label (0..max label), "class N" where the index has no name."""
    n = max((int(e.get("label", -1)) for e in entries), default=-1) + 1
    names = [f"class {i}" for i in range(n)]
    for e in entries:
        lab = int(e.get("label", -1))
        if lab >= 0 and e.get("class_name"):
            names[lab] = str(e["class_name"])
    return names


def evaluation_sets(index: str, *, holdout: int = 800, holdout_seed: int = 666, train_split: str = "train",
                    test_split: str = "test") -> tuple[list, list, dict]:
    """(train entries, test entries, info) of an index for retrieval and the linear probe.

    Train (the retrieval gallery, the probe's training set): the readable videos of `train_split` minus
    `holdout` of them drawn by the data layer's holdout_split(holdout_seed), exactly the videos pretraining
    reads (docs/method.md §1.1, §6.3). Test (queries): every entry of `test_split`, whatever its indexed
    status: a video that cannot be read stays in the denominator. info counts everything.
    """
    from ..data import holdout_split, load_index
    if not os.path.isfile(index):
        raise FileNotFoundError(f"index: no such file {index} (write one with `dualvar data index`)")
    entries = load_index(index)
    train_all = [e for e in entries if e["split"] == train_split]
    test = [e for e in entries if e["split"] == test_split]
    train_ok = [e for e in train_all if e.get("status", "ok") == "ok"]
    if not test:
        raise ValueError(f"index: {index} has no {test_split!r} videos")
    if not isinstance(holdout, int) or holdout < 0:
        raise ValueError(f"holdout must be a non-negative integer, got {holdout!r}")
    if holdout >= len(train_ok):
        raise ValueError(f"holdout ({holdout}) must be smaller than the {len(train_ok)} readable {train_split!r} "
                         f"videos of {index} (set it with --holdout)")
    train = holdout_split(train_ok, holdout, holdout_seed)[0] if holdout else list(train_ok)
    info = {"index": os.path.abspath(index), "dataset": infer_dataset(entries), "train_split": train_split,
            "test_split": test_split, "train_videos": len(train_all),
            "train_unreadable_in_index": len(train_all) - len(train_ok), "holdout": holdout,
            "holdout_seed": holdout_seed, "train_used": len(train), "test_videos": len(test),
            "test_unreadable_in_index": sum(1 for e in test if e.get("status", "ok") != "ok"),
            "class_names": class_names_of(entries)}
    return train, test, info


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_index(meta: dict) -> Optional[str]:
    """The index a pretraining run read (from the config stored with its checkpoint), or None. A synthetic
    run's set is generated if it is not there (as pretraining does)."""
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        return None
    from ..config import from_dict
    data = from_dict(cfg).data
    if data.dataset == "synthetic":
        from ..trainer import ensure_synthetic
        return ensure_synthetic(data)
    return data.index or None


@dataclass
class Evaluation:
    """Everything an evaluation command needs: the backbone and its metadata, the clip settings, the train
    and test entries with their counts (info), the feature cache (None: off) and the device."""
    backbone: nn.Module
    meta: dict
    config: FeatureConfig
    train: list
    test: list
    info: dict
    cache: Optional[FeatureCache]
    device: torch.device

    def features(self, which: str, *, batch_size: int = 8, num_workers: int = 0, video_backend: str = "auto",
                 progress: bool = False) -> FeatureSet:
        entries = {"train": self.train, "test": self.test}[which]
        return extract_features(self.backbone, entries, self.config, device=self.device, batch_size=batch_size,
                                num_workers=num_workers, cache=self.cache, video_backend=video_backend,
                                progress=progress, desc=f"{which} features")

    def describe(self) -> dict:
        """JSON-able record of the checkpoint, clip settings and sets (for results.json)."""
        m = self.meta
        checkpoint = {k: m.get(k) for k in ("source", "model_key", "backbone", "method", "mode", "step", "run",
                                            "random_init", "seed") if m.get(k) is not None}
        info = {k: v for k, v in self.info.items() if k != "class_names"}
        return {"checkpoint": checkpoint, "clips": self.config.to_dict(), "sets": info,
                "device": str(self.device),
                "feature_cache": self.cache.path if self.cache is not None else None}


def setup_evaluation(checkpoint: str, index: Optional[str] = None, *, holdout: Optional[int] = None,
                     holdout_seed: Optional[int] = None, test_split: str = "test",
                     device: Union[str, torch.device, None] = "auto", cache_dir: Optional[str] = None,
                     use_cache: bool = True, builder: Optional[Callable[[str], nn.Module]] = None,
                     **clip_overrides) -> Evaluation:
    """Load the backbone and resolve clip settings, index, hold-out and cache for an evaluation.

    index: default the run's own (from its stored config). holdout/holdout_seed: default the run's
    data.holdout/holdout_seed, else the paper's 800/666. clip_overrides: FeatureConfig fields (None = the
    checkpoint's value, else the protocol default). cache_dir: default beside the checkpoint
    (RUN_DIR/eval_cache, or FILE's folder/eval_cache), for random inits $DUALVAR_CACHE (~/.cache/dualvar)/features.
    """
    dev = resolve_device(device)
    backbone, meta = load_backbone(checkpoint, device=dev, builder=builder)
    config = feature_config_from_meta(meta, **clip_overrides)
    index = index or default_index(meta)
    if not index:
        raise ValueError("index: no --index given and the checkpoint does not name the index it was trained on")
    data_cfg = (meta.get("config") or {}).get("data", {}) if isinstance(meta.get("config"), dict) else {}
    holdout = int(data_cfg.get("holdout", 800)) if holdout is None else holdout
    holdout_seed = int(data_cfg.get("holdout_seed", 666)) if holdout_seed is None else holdout_seed
    train, test, info = evaluation_sets(index, holdout=holdout, holdout_seed=holdout_seed, test_split=test_split)
    cache = None
    if use_cache:
        if cache_dir is None:
            if meta.get("random_init"):
                base = os.environ.get("DUALVAR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dualvar"))
                cache_dir = os.path.join(base, "features")
            elif os.path.isdir(checkpoint):
                cache_dir = os.path.join(checkpoint, "eval_cache")
            else:
                cache_dir = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "eval_cache")
        cache = FeatureCache(cache_dir, meta["model_key"], config)
    return Evaluation(backbone, meta, config, train, test, info, cache, dev)


def default_out_dir(checkpoint: str) -> str:
    """Where an evaluation writes results.json/report.md by default: the run directory, or the exported
    file's folder; random inits need an explicit one."""
    if checkpoint.startswith(RANDOM_PREFIX):
        raise ValueError("--out is needed for a random: checkpoint")
    return checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
