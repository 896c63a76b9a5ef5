"""The root pretraining config: small dataclasses that validate themselves, YAML presets, dotted overrides.

    cfg = load_config("demo", ["optim.lr=0.01", "data.batch_size=8"])   # preset name or a YAML path
    save_config(cfg, "runs/x/config.yaml")                              # the resolved config, every field

A preset is a YAML file in `engine/configs/` (`dualvar pretrain --config NAME`); it may name another preset
under `base:`, whose values it then overrides. Every key and value is checked when the config is built,
before any data is read: an unknown key or a bad value raises `ConfigError` naming it by its dotted path.
Hyperparameter defaults are the paper's (docs/method.md §5.1).
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import yaml

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DATASETS = ("synthetic", "ucf101", "hmdb51", "kinetics400", "list")
FRAMEWORKS = ("simclr", "moco")
MODES = ("baseline", "clip-sr", "clip-sr-tc")
BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it by its dotted path."""


def check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")


def check_positive(key: str, value, *, integer: bool = False, zero: bool = False) -> None:
    kind = "integer" if integer else "number"
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value))
    check(ok and (value >= 0 if zero else value > 0), key, f"a {'non-negative' if zero else 'positive'} {kind}",
           value)


def check_choice(key: str, value, choices) -> None:
    check(value in choices, key, f"one of {', '.join(map(str, choices))}", value)


@dataclass
class DataConfig:
    """The pretraining videos and how clips are read (docs/method.md §1).

    dataset: "synthetic" (generated on first use into `root`, no download) or a real set read through its
        index (`index`, written by `dualvar data index --dataset DATASET ...`).
    index: the JSONL index of a real set; root: the videos folder (synthetic: where they are generated;
        empty = a cache folder under ~/.cache/dualvar). split: the index split to train on; holdout: videos
        of that split held out as validation (the paper: 800), drawn with holdout_seed.
    frames, stride, crop, size, long: T, ds, the crop side and the decode size (H = size, W = long).
    batch_size: the global batch: clips (videos) per optimizer step over all processes (each of W processes
        reads batch_size / W); num_workers: loader processes (per process).
    synthetic_*: the generated set (classes, videos per class, frames per video, frame height and width).
    """
    dataset: str = "ucf101"
    index: str = ""
    root: str = ""
    split: str = "train"
    holdout: int = 800
    holdout_seed: int = 666
    frames: int = 16
    stride: int = 4
    crop: int = 112
    size: int = 128
    long: int = 171
    batch_size: int = 8
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
        for name in ("frames", "stride", "crop", "size", "long", "batch_size", "synthetic_classes",
                     "synthetic_videos_per_class", "synthetic_frames", "synthetic_height", "synthetic_width"):
            check_positive(f"{p}.{name}", getattr(self, name), integer=True)
        for name in ("holdout", "num_workers", "holdout_seed"):
            check_positive(f"{p}.{name}", getattr(self, name), integer=True, zero=True)
        check(self.crop <= min(self.size, self.long), f"{p}.crop", f"at most min(size, long) = "
               f"{min(self.size, self.long)}", self.crop)
        check_choice(f"{p}.backend", self.backend, ("auto", "decord", "pyav"))
        check_choice(f"{p}.split", self.split, ("train", "test", "val"))


@dataclass
class ModelConfig:
    """Backbone and framework (docs/method.md §2).

    backbone: a name of dualvar.engine.models.BACKBONES; weights: optional local torchvision state dict.
    framework: "simclr" or "moco"; mode: "baseline", "clip-sr" or "clip-sr-tc" (the paper's full method).
    clip_dim D, n_series s, series_dim d; momentum: MoCo's key-encoder EMA m.
    compile: torch.compile the backbone(s); channels_last: channels_last_3d memory format, "auto" (on a GPU),
    "always" or "never".
    norm: the backbone's normalisation: "bn" (BatchNorm, the paper's), "frozen_bn" (BatchNorm with frozen
    statistics) or "group" (GroupNorm); the last two make gradient caching exact (docs/method.md §4).
    key_bn: MoCo's key-encoder BatchNorm across processes: "shuffle" (batch-shuffle BN, MoCo's recipe),
    "sync" (SyncBatchNorm, GPUs only; as the reference code, whose SyncBN covers the whole model) or "local"
    (each process's own batch). A single process ignores it.
    """
    backbone: str = "r2plus1d_10"
    weights: str = ""
    framework: str = "simclr"
    mode: str = "clip-sr-tc"
    clip_dim: int = 128
    n_series: int = 2
    series_dim: int = 64
    momentum: float = 0.999
    compile: bool = False
    channels_last: str = "auto"
    norm: str = "bn"
    key_bn: str = "shuffle"

    def validate(self, p: str) -> None:
        from dualvar.engine.models import BACKBONES
        check_choice(f"{p}.backbone", self.backbone, BACKBONES)
        check_choice(f"{p}.framework", self.framework, FRAMEWORKS)
        check_choice(f"{p}.mode", self.mode, MODES)
        for name in ("clip_dim", "n_series", "series_dim"):
            check_positive(f"{p}.{name}", getattr(self, name), integer=True)
        check(0 <= self.momentum < 1, f"{p}.momentum", "in [0, 1)", self.momentum)
        check_choice(f"{p}.channels_last", self.channels_last, ("auto", "always", "never"))
        check_choice(f"{p}.norm", self.norm, ("bn", "frozen_bn", "group"))
        check_choice(f"{p}.key_bn", self.key_bn, ("shuffle", "sync", "local"))


@dataclass
class LossConfig:
    """The DualVar objective (docs/method.md §3): temperatures tau (clip), tau_a (tc), theta (shuffle
    rank); cap of the ranking difference (None: the reference's choice per framework); the two ranking
    weights; MoCo's queue size K; the kernel backend of every loss and of the view layout.
    reference_ddp: with several processes, reproduce the reference code's gradient weighting (SimCLR clip
    gradient scaled by 1/W, cross-rank tc negatives without gradient; docs/method.md §4(b)) instead of the
    exact gradient of the global batch (§4(a), the default)."""
    tau: float = 0.07
    tau_a: float = 0.07
    theta: float = 0.05
    cap: Optional[float] = None
    sr_weights: tuple = (0.5, 0.5)
    queue_size: int = 16384
    backend: str = "auto"
    derangement: bool = False
    reference_ddp: bool = False

    def validate(self, p: str) -> None:
        for name in ("tau", "tau_a", "theta"):
            check_positive(f"{p}.{name}", getattr(self, name))
        if self.cap is not None:
            check(not math.isnan(self.cap) and self.cap > 0, f"{p}.cap", "a positive number, inf or null",
                   self.cap)
        check(len(self.sr_weights) == 2 and all(isinstance(w, (int, float)) and w >= 0 for w in self.sr_weights),
               f"{p}.sr_weights", "two non-negative numbers", self.sr_weights)
        check_positive(f"{p}.queue_size", self.queue_size, integer=True)
        check_choice(f"{p}.backend", self.backend, BACKENDS)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (docs/method.md §5.1: SGD, lr 0.003, momentum 0.9, wd 1e-4 on
    all parameters, x0.1 at epochs 120 and 160, no warm-up).

    name: "sgd" or "adamw". schedule: "multistep" (x gamma at each epoch in milestones), "cosine" (linear
    warm-up over warmup_epochs, then cosine down to min_lr_ratio * lr) or "constant". Schedules are
    evaluated per step from the fractional epoch, so a multistep drop lands on the epoch's first step.
    clip_grad_norm: 0 = no clipping (the gradient norm is logged either way).
    """
    name: str = "sgd"
    lr: float = 0.003
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple = (0.9, 0.999)
    schedule: str = "multistep"
    milestones: tuple = (120, 160)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    clip_grad_norm: float = 0.0

    def validate(self, p: str) -> None:
        check_choice(f"{p}.name", self.name, ("sgd", "adamw"))
        check_positive(f"{p}.lr", self.lr)
        check(0 <= self.momentum < 1, f"{p}.momentum", "in [0, 1)", self.momentum)
        check_positive(f"{p}.weight_decay", self.weight_decay, zero=True)
        check(len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas),
               f"{p}.betas", "two numbers in [0, 1)", self.betas)
        check_choice(f"{p}.schedule", self.schedule, ("multistep", "cosine", "constant"))
        check(all(isinstance(m, (int, float)) and m > 0 for m in self.milestones)
               and list(self.milestones) == sorted(self.milestones), f"{p}.milestones",
               "increasing positive epochs", self.milestones)
        check(0 < self.gamma <= 1, f"{p}.gamma", "in (0, 1]", self.gamma)
        check_positive(f"{p}.warmup_epochs", self.warmup_epochs, zero=True)
        check(0 <= self.min_lr_ratio <= 1, f"{p}.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        check_positive(f"{p}.clip_grad_norm", self.clip_grad_norm, zero=True)


@dataclass
class TrainConfig:
    """The run: epochs (max_steps > 0 stops earlier), device ("auto": cuda if available), precision
    ("auto": bf16 autocast on GPU, fp32 on CPU; "fp16" uses a grad scaler), seed, how often to log
    (steps), the progress bar and TensorBoard switches, and how many consecutive non-finite losses stop
    the run (each one skips its optimizer step). cpu_threads: torch's intra-op threads (0: torch's default,
    one per core; on a CPU shared with other work, 1 avoids long OpenMP barrier waits).
    grad_cache_chunk: gradient caching (dualvar.engine.grad_cache): 0 = off (the process's batch in one
    pass); N = run the backbone on N clips at a time, twice (without, then with a graph), with every loss
    computed once on the whole batch; "auto" = measure one probe step and take the largest chunk that fits
    the device's free memory less memory_margin (a fraction), printing the choice.
    sync_bn: SyncBatchNorm in the backbone when there are several processes (GPUs only; MoCo: the query
    encoder, see model.key_bn for the key encoder)."""
    epochs: int = 200
    max_steps: int = 0
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True
    max_nonfinite: int = 3
    cpu_threads: int = 0
    grad_cache_chunk: Union[int, str] = 0
    memory_margin: float = 0.2
    sync_bn: bool = False

    def validate(self, p: str) -> None:
        check_positive(f"{p}.epochs", self.epochs, integer=True)
        check_positive(f"{p}.cpu_threads", self.cpu_threads, integer=True, zero=True)
        check_positive(f"{p}.max_steps", self.max_steps, integer=True, zero=True)
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), f"{p}.device",
               "auto, cpu, cuda or cuda:N", self.device)
        check_choice(f"{p}.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        check_positive(f"{p}.seed", self.seed, integer=True, zero=True)
        check_positive(f"{p}.log_every", self.log_every, integer=True)
        check_positive(f"{p}.max_nonfinite", self.max_nonfinite, integer=True)
        check(self.grad_cache_chunk == "auto" or (isinstance(self.grad_cache_chunk, int)
                                                   and not isinstance(self.grad_cache_chunk, bool)
                                                   and self.grad_cache_chunk >= 0),
               f"{p}.grad_cache_chunk", "0 (off), a positive number of clips or auto", self.grad_cache_chunk)
        check(isinstance(self.memory_margin, (int, float)) and 0 <= self.memory_margin < 1, f"{p}.memory_margin",
               "a fraction in [0, 1)", self.memory_margin)


@dataclass
class CheckpointConfig:
    """Checkpoints in RUN_DIR/checkpoints: every `every_steps` steps (0: only at the end) and at the end,
    keeping the newest `keep`. resume: "none", "auto" (the newest one that loads) or a checkpoint path."""
    every_steps: int = 1000
    keep: int = 3
    resume: str = "none"

    def validate(self, p: str) -> None:
        check_positive(f"{p}.every_steps", self.every_steps, integer=True, zero=True)
        check_positive(f"{p}.keep", self.keep, integer=True)
        check(bool(self.resume), f"{p}.resume", "none, auto or a checkpoint path", self.resume)


@dataclass
class EvalConfig:
    """Evaluation during pretraining (arrives with the evaluation issue): every_epochs = 0 turns it off."""
    every_epochs: int = 0

    def validate(self, p: str) -> None:
        check_positive(f"{p}.every_epochs", self.every_epochs, integer=True, zero=True)


@dataclass
class Config:
    """The root config: one small dataclass per component."""
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        validate_sections(self)
        if self.model.framework == "moco":
            check(self.loss.queue_size % self.data.batch_size == 0, "loss.queue_size",
                   f"a multiple of data.batch_size ({self.data.batch_size}) for MoCo", self.loss.queue_size)
        if self.model.mode != "baseline":
            check(self.data.frames % self.model.n_series == 0, "data.frames",
                   f"divisible by model.n_series ({self.model.n_series})", self.data.frames)
        return self

    def to_dict(self) -> dict:
        """Plain nested dict (tuples as lists): what YAML and checkpoints store."""
        return sections_to_dict(self)


def validate_sections(cfg) -> None:
    """Validate each dataclass section of a root config (`section.validate(its name)`)."""
    for f in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            getattr(cfg, f.name).validate(f.name)


def sections_to_dict(cfg) -> dict:
    """A root config of sections as a plain nested dict (tuples as lists): what YAML and checkpoints store."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
    return {k: ({kk: plain(vv) for kk, vv in v.items()} if isinstance(v, dict) else plain(v))
            for k, v in dataclasses.asdict(cfg).items()}


# ----------------------------------------------------------------------------- building from dicts
def _coerce(key: str, value: Any, annotation) -> Any:
    """`value` as the field's type, or a ConfigError naming `key`."""
    tp = annotation
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        errors = []
        for arg in args:  # the first member type that takes the value
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{key} must be one of {' or '.join(a.__name__ for a in args)}, got {value!r}")
    if tp is bool:
        check(isinstance(value, bool), key, "true or false", value)
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) and ".inf" spellings as strings sometimes
            try:
                value = float(value)
            except ValueError:
                pass
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, "a string", value)
        return value
    if tp is tuple:
        check(isinstance(value, (list, tuple)), key, "a list", value)
        return tuple(value)
    raise TypeError(f"unsupported config field type {tp!r} of {key}")


def build_section(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            where = prefix or "the root config"
            raise ConfigError(f"unknown config key {prefix + '.' if prefix else ''}{key!s} ({where} has: "
                              f"{', '.join(sorted(names))})")
    kwargs = {}
    for name, v in values.items():
        path = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        kwargs[name] = build_section(tp, v, path) if dataclasses.is_dataclass(tp) else _coerce(path, v, tp)
    return cls(**kwargs)


def merge_values(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_values(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_names(preset_dir: str = PRESET_DIR) -> list[str]:
    """The preset names (YAML files) in `preset_dir`; none when it does not exist."""
    if not os.path.isdir(preset_dir):
        return []
    return sorted(f[:-5] for f in os.listdir(preset_dir) if f.endswith(".yaml"))


def read_yaml(name_or_path: str, preset_dir: str = PRESET_DIR, what: str = "config", seen: tuple = ()) -> dict:
    """The values of a preset name (a YAML file in `preset_dir`) or a YAML path, with its `base:` chain merged
    in; `what` names the kind of config in the error for a missing one."""
    path = name_or_path if os.path.sep in name_or_path or name_or_path.endswith((".yaml", ".yml")) \
        else os.path.join(preset_dir, name_or_path + ".yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"no {what} {name_or_path!r}: not a file and not a preset (presets: "
                          f"{', '.join(preset_names(preset_dir))})")
    if path in seen:
        raise ConfigError(f"config {path} names itself as a base (through {' -> '.join(seen)})")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config {path} must be a YAML mapping")
    base = values.pop("base", None)
    if base is not None:
        values = merge_values(read_yaml(str(base), preset_dir, what, seen + (path,)), values)
    return values


def parse_override(text: str) -> tuple[list[str], Any]:
    """"optim.lr=0.01" -> (["optim", "lr"], 0.01); the value is read as YAML (numbers, lists, null...)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must be KEY=VALUE with a dotted key, e.g. optim.lr=0.01")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    out = merge_values({}, values)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[:i + 1])} is not a section")
        node[keys[-1]] = value
    return out


def from_dict(values: dict) -> Config:
    """A validated Config from a (partial) nested dict; missing keys take their defaults."""
    return build_section(Config, values, "").validate()


def load_config(name_or_path: str, overrides: Optional[list[str]] = None) -> Config:
    """Preset name (see `preset_names()`) or YAML path, then dotted overrides; validated."""
    return load_sections(Config, name_or_path, overrides)


def load_sections(cls, name_or_path: str, overrides: Optional[Sequence[str]] = None, preset_dir: str = PRESET_DIR,
                  what: str = "config"):
    """A validated root config of dataclass `cls` from a preset name (in `preset_dir`) or YAML path, then
    dotted overrides; `what` names the kind of config in the error for a missing one."""
    values = apply_overrides(read_yaml(name_or_path, preset_dir, what), list(overrides or []))
    return build_section(cls, values, "").validate()


def config_changes(old: Config, new: Config, ignore=("checkpoint.resume",)) -> list[str]:
    """'key: old -> new' for every dotted key whose value differs (keys in `ignore` left out)."""
    a, b = old.to_dict(), new.to_dict()
    out = []
    for section in a:
        pairs = a[section].items() if isinstance(a[section], dict) else [(None, a[section])]
        for key, va in pairs:
            vb = b[section][key] if key is not None else b[section]
            name = f"{section}.{key}" if key is not None else section
            if va != vb and name not in ignore:
                out.append(f"{name}: {va!r} -> {vb!r}")
    return out


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def default_synthetic_root(data: DataConfig) -> str:
    """Cache folder of the generated synthetic set (one per generation setting)."""
    base = os.environ.get("DUALVAR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dualvar"))
    tag = (f"synthetic-c{data.synthetic_classes}-v{data.synthetic_videos_per_class}-f{data.synthetic_frames}-"
           f"{data.synthetic_height}x{data.synthetic_width}")
    return os.path.join(base, tag)
