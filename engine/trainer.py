"""DualVar pretraining on one process (CPU or one GPU), or on many under torchrun:
`dualvar pretrain --config PRESET [key=value ...]`, `torchrun --nproc_per_node=N -m dualvar.engine.cli pretrain ...`.

    trainer = Trainer(load_config("demo"), "runs/demo")
    summary = trainer.fit()

One training step (`Trainer.train_step`) reads top to bottom: views (one frame-permutation call on the
uint8 batch) -> framework (one embeddings record) -> objective (named parts) -> backward -> optimizer step
-> objective update (MoCo queues) -> log. The same code runs on CPU and GPU: the device is picked once and
passed down; on a GPU the backbone runs under bf16 autocast in channels_last_3d, the losses keep fp32
statistics (the objective runs outside autocast; the fused kernels accumulate in fp32).

A step whose loss has a non-finite part skips its optimizer step (and the queue update) and is logged
with that part's name; `train.max_nonfinite` consecutive ones stop the run (NonFiniteLossError). The same
holds for a non-finite gradient norm without a grad scaler (fp32, bf16).

Several processes (torchrun; dualvar.engine.distributed joins the group and hands the trainer its rank,
world size and device): the model runs under DistributedDataParallel, each process reads its shard of the
global batch (data.batch_size / W clips), the losses use the gradient-exact gathers (or the reference's
weighting, loss.reference_ddp), the logged loss parts are the mean over processes (which also makes every
process take the same skip decision on a non-finite part), only rank 0 logs and writes checkpoints (a
barrier follows each save), every rank resumes from the checkpoint rank 0 picks, and each rank's random
generators are saved and restored as its own. MoCo's key encoder uses batch-shuffle BN, SyncBN or its own
batch (model.key_bn); train.sync_bn turns on SyncBN in the backbone. A process started without torchrun runs
exactly as before.

Gradient caching (train.grad_cache_chunk, dualvar.engine.grad_cache): the step embeds its batch in chunks
without a graph, computes the losses once, then re-embeds each chunk with a graph and back-propagates its
slice of the embeddings' gradient; "auto" picks the chunk from one probe step (dualvar.engine.batch_plan).
The permutations of the whole batch are drawn once, as the unchunked step draws them.

Test hook: with the environment variable DUALVAR_KILL_AT_STEP=k the process sends itself SIGKILL right
after step k is logged (and checkpointed, if k is a checkpoint step), while the loader's workers are
prefetching: the resume test uses it to stop a run at a chosen point in the middle of an epoch. With
DUALVAR_FAIL_AT_STEP=RANK:STEP the process of that rank raises a RuntimeError after that step: the
multi-process test of a failing rank uses it.
"""
from __future__ import annotations

import fcntl
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from typing import Optional

import numpy as np
import torch

from . import distributed as D
from .checkpoint import CheckpointManager, Counters, PerRank, RNGState, newest_readable
from .config import Config, ConfigError, config_changes, default_synthetic_root, load_config, save_config
from .metrics import MetricsLogger, peak_memory_bytes

KILL_ENV = "DUALVAR_KILL_AT_STEP"
FAIL_ENV = "DUALVAR_FAIL_AT_STEP"
VIEWS_PER_SAMPLE = 3  # clips sampled per video (views 0, 1, 2); clips/s counts these
KERNEL_OPS = ("permute_frames", "contrastive", "shuffle_rank")  # the fused ops a step runs (summary: backends)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss part (or gradient norm)."""


class DatasetMissingError(FileNotFoundError):
    """The config's dataset index is not there; the message is the command that prepares it."""


# ----------------------------------------------------------------------------- data
_PREPARE = {
    "ucf101": "dualvar data index --dataset ucf101 --root /path/to/UCF101 --out {index}",
    "hmdb51": "dualvar data index --dataset hmdb51 --root /path/to/HMDB51 --out {index}",
    "kinetics400": "dualvar data index --dataset kinetics400 --root /path/to/kinetics400 "
                   "--splits /path/to/kinetics400/annotations --out {index}",
    "list": "dualvar data index --dataset list --root /path/to/videos --list /path/to/list.txt --out {index}",
}


def ensure_synthetic(data) -> str:
    """Index of the generated synthetic set at data.root (default: a cache folder), written on first use.
    A file lock makes concurrent first uses generate it once."""
    from .data import build_index, write_synthetic_dataset
    root = data.root or default_synthetic_root(data)
    index = os.path.join(root, "index_split1.jsonl")
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return index
    os.makedirs(os.path.dirname(os.path.abspath(root)) or ".", exist_ok=True)
    with open(os.path.abspath(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done):
            write_synthetic_dataset(root, classes=data.synthetic_classes,
                                    videos_per_class=data.synthetic_videos_per_class, frames=data.synthetic_frames,
                                    height=data.synthetic_height, width=data.synthetic_width, seed=0)
            build_index("ucf101", root, index, clip_span=(data.frames - 1) * data.stride + 1)
            open(done, "w").close()
    return index


def training_entries(data) -> list[dict]:
    """The index entries pretraining reads (the split, minus the validation hold-out). Raises
    DatasetMissingError, naming the command that prepares the index, when it is not there."""
    from .data import holdout_split, load_index
    if data.dataset == "synthetic":
        index = ensure_synthetic(data)
    else:
        index = data.index
        if not os.path.isfile(index):
            raise DatasetMissingError(f"no {data.dataset} index at {index}; prepare it with: "
                                      + _PREPARE[data.dataset].format(index=index))
    entries = load_index(index, split=data.split, only_ok=True)
    if data.holdout:
        if data.holdout >= len(entries):
            raise ConfigError(f"data.holdout ({data.holdout}) must be smaller than the {len(entries)} "
                              f"readable {data.split} videos of {index}")
        entries, _ = holdout_split(entries, data.holdout, data.holdout_seed)
    return entries


# ----------------------------------------------------------------------------- optimisation
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but torch sees no CUDA device")
    return device


def build_optimizer(params, optim) -> torch.optim.Optimizer:
    """SGD (the paper's: momentum, weight decay on every parameter) or AdamW."""
    params = [p for p in params if p.requires_grad]
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def lr_factor(optim, step: int, steps_per_epoch: int, total_epochs: float) -> float:
    """Learning-rate multiplier of optimizer step `step` (0-based), from its fractional epoch.

    multistep: gamma ** (number of milestones <= the epoch), i.e. torch's MultiStepLR stepped once per
    epoch (the paper's x0.1 at epochs 120 and 160). cosine: linear warm-up over warmup_epochs (step k of
    the warm-up gets (k + 1) / warm-up steps, so no step has lr 0), then a cosine from 1 down to
    min_lr_ratio at total_epochs. A warm-up ramp multiplies any schedule.
    """
    epoch = step / steps_per_epoch
    warm_steps = optim.warmup_epochs * steps_per_epoch
    warm = min(1.0, (step + 1) / warm_steps) if warm_steps > 0 else 1.0
    if optim.schedule == "multistep":
        return warm * optim.gamma ** sum(1 for m in optim.milestones if math.floor(epoch) >= m)
    if optim.schedule == "cosine":
        if warm < 1.0:
            return warm
        span = max(total_epochs - optim.warmup_epochs, 1e-12)
        progress = min(1.0, max(0.0, epoch - optim.warmup_epochs) / span)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return warm


def _batch_rows(batch: dict, lo: int, hi: int) -> dict:
    """Samples lo..hi-1 of a collated loader batch (every tensor with the batch's leading dimension)."""
    n = batch["video"].shape[0]
    return {k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in batch.items()}


def _fail_hook(rank: int, step: int) -> None:
    spec = os.environ.get(FAIL_ENV, "")
    if spec and spec == f"{rank}:{step}":
        raise RuntimeError(f"deliberate failure of rank {rank} after step {step} ({FAIL_ENV}={spec})")


def _autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ----------------------------------------------------------------------------- trainer
def count_nonfinite(owner, metrics: dict, detail, stopped: str) -> Optional[str]:
    """One training step's non-finite bookkeeping, shared by the pretraining and fine-tuning loops. `owner`
    has nonfinite_run, counters, cfg.train.max_nonfinite and _message. A step without "nonfinite" in its
    metrics resets the run; one with it is counted and said ("step N: non-finite PART (detail(metrics));
    optimizer step skipped ..."). Returns the stop message once max_nonfinite are in a row ("stopping at
    step N: " + stopped.format(part=PART) + " for LIMIT consecutive steps (train.max_nonfinite)")."""
    if "nonfinite" not in metrics:
        owner.nonfinite_run = 0
        return None
    owner.nonfinite_run += 1
    owner.counters.nonfinite_steps += 1
    step, limit, part = owner.counters.step, owner.cfg.train.max_nonfinite, metrics["nonfinite"]
    owner._message(f"step {step}: non-finite {part} ({detail(metrics)}); optimizer step skipped "
                   f"({owner.nonfinite_run} in a row, the limit is {limit})")
    if owner.nonfinite_run >= limit:
        return (f"stopping at step {step}: {stopped.format(part=part)} for {limit} consecutive steps "
                "(train.max_nonfinite)")
    return None


def log_due(step: int, metrics: dict, log_every: int, total_steps: int) -> bool:
    """Whether a step's metrics are logged: every log_every steps, a non-finite step and the last step."""
    return step % log_every == 0 or "nonfinite" in metrics or step == total_steps


def checkpoint_due(step: int, every: int, total_steps: int) -> bool:
    """Whether a checkpoint is written after a step: every `every` steps (0: never) and after the last."""
    return bool(every and step % every == 0) or step == total_steps


def step_rates(t0: float, t1: float, t2: float, clips: int, device: torch.device) -> dict:
    """The timing metrics of a step that waited for data from t0 to t1 and computed from t1 to t2 on
    `clips` clips (over all processes): data_s, step_s, clips_per_s, peak_mem_mb."""
    return dict(data_s=t1 - t0, step_s=t2 - t1, clips_per_s=clips / max(t2 - t0, 1e-9),
                peak_mem_mb=peak_memory_bytes(device) / 2**20)


class Trainer:
    """Builds every component from a validated Config and runs the loop.

    run_dir: where config.yaml, metrics.jsonl, tensorboard/, checkpoints/ and summary.json go.
    rank/world_size/is_main: this process's place in a distributed run (single process: 0, 1, True); the
    loader reads this rank's shard of a global batch of data.batch_size clips. With world_size > 1 the
    process group must be initialised (dualvar.engine.distributed.init_from_env). device: where this
    process trains (default: from train.device; under torchrun, the GPU of its local rank).
    """

    def __init__(self, cfg: Config, run_dir: str, *, rank: int = 0, world_size: int = 1,
                 is_main: Optional[bool] = None, device: Optional[torch.device] = None):
        from .data import ClipConfig, build_loader
        from .frameworks import build_framework
        from .models import build_backbone
        from .objectives import DualVarLossConfig, build_objective

        self.cfg, self.run_dir = cfg, run_dir
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0 if is_main is None else is_main
        if cfg.data.batch_size % world_size:
            raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) must be divisible by the number of "
                              f"processes ({world_size})")
        if world_size != D.world_size():
            raise RuntimeError(f"world_size is {world_size} but the process group has {D.world_size()} processes "
                               "(start multi-process runs with torchrun; see dualvar.engine.distributed)")
        self.device = torch.device(device) if device is not None else resolve_device(cfg.train.device)
        self.amp_dtype = _autocast_dtype(cfg.train.precision, self.device)
        entries = training_entries(cfg.data)  # a missing dataset fails here, before the run directory exists
        if self.is_main:
            os.makedirs(run_dir, exist_ok=True)
            saved = os.path.join(run_dir, "config.yaml")
            if cfg.checkpoint.resume != "none" and os.path.exists(saved):
                changed = config_changes(load_config(saved), cfg)
                if changed:
                    print(f"resuming with a config that differs from {saved}: {'; '.join(changed)}", flush=True)
            save_config(cfg, saved)

        if cfg.train.cpu_threads:
            torch.set_num_threads(cfg.train.cpu_threads)
        seed = cfg.train.seed
        random.seed(seed + rank)
        np.random.seed(seed + rank)
        torch.manual_seed(seed)  # same initial weights on every rank

        d = cfg.data
        self.loader = build_loader(entries, "pretrain", batch_size=d.batch_size // world_size,
                                   config=ClipConfig(frames=d.frames, stride=d.stride, crop=d.crop, size=d.size,
                                                     long=d.long, backend=d.backend),
                                   num_workers=d.num_workers, seed=seed, rank=rank, num_replicas=world_size,
                                   device=self.device)
        self.steps_per_epoch = self.loader.sampler.num_samples // (d.batch_size // world_size)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"data.batch_size ({d.batch_size}) is larger than the {len(self.loader.dataset)} "
                              "training videos: no full batch per epoch")
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

        m = cfg.model
        self.framework = build_framework(m.framework, build_backbone(m.backbone, weights=m.weights or None,
                                                                     norm=m.norm),
                                         mode=m.mode, clip_dim=m.clip_dim, n_series=m.n_series,
                                         series_dim=m.series_dim, momentum=m.momentum).to(self.device)
        self.shuffle_generator = self._cross_process_norms(seed)
        channels_last = m.channels_last == "always" or (m.channels_last == "auto" and self.device.type == "cuda")
        if channels_last:
            self.framework.to(memory_format=torch.channels_last_3d)
        if m.compile:
            for module in self.framework.modules():
                if hasattr(module, "feature_dim"):  # the backbones (MoCo: query and key); keys stay unprefixed
                    module.compile()
        loss = cfg.loss
        self.perm_generator = torch.Generator(device=self.device).manual_seed(seed * 1000 + rank)
        objective_config = DualVarLossConfig(mode=m.mode, framework=m.framework, tau=loss.tau, tau_a=loss.tau_a,
                                             theta=loss.theta, cap=loss.cap, sr_weights=tuple(loss.sr_weights),
                                             distributed=world_size > 1,
                                             reference_ddp=loss.reference_ddp and world_size > 1, backend=loss.backend)
        self.objective = build_objective(objective_config, queue_size=loss.queue_size, clip_dim=m.clip_dim,
                                         series_dim=m.series_dim, n_series=m.n_series,
                                         generator=torch.Generator().manual_seed(seed + 1), device=self.device)
        self.params = [p for p in self.framework.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(cfg.optim, step, self.steps_per_epoch, cfg.train.epochs))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.counters = Counters(step=0, epoch=0, nonfinite_steps=0)
        self.nonfinite_run = 0  # consecutive non-finite steps
        self.batch_plan = None
        self.chunk = self._plan_chunk()  # 0: no gradient caching
        # DDP after the probe: the probe runs the bare model, DDP's buckets count in its reserve
        self.model = D.wrap_ddp(self.framework, self.device)

        from .export import git_revision
        generators = {"views": self.perm_generator}
        if self.shuffle_generator is not None:
            generators["key_shuffle"] = self.shuffle_generator
        rng = RNGState(generators) if world_size == 1 else PerRank(RNGState(generators))
        self.checkpoints = CheckpointManager(
            os.path.join(run_dir, "checkpoints"),
            {"model": self.framework, "objective": self.objective, "optimizer": self.optimizer,
             "scheduler": self.scheduler, "scaler": self.scaler, "data": self.loader,
             "rng": rng, "trainer": self.counters},
            keep=cfg.checkpoint.keep, is_main=self.is_main,
            meta={"config": cfg.to_dict(), "git_revision": git_revision()}, log=self._message)
        self.logger: Optional[MetricsLogger] = None

    # ------------------------------------------------------------------ multi-process set-up
    def _cross_process_norms(self, seed: int) -> Optional[torch.Generator]:
        """SyncBN (train.sync_bn; MoCo key encoder: model.key_bn=sync) and MoCo's batch-shuffle BN
        (model.key_bn=shuffle) with several processes. Returns the shuffle's generator (seeded alike on
        every rank, checkpointed), or None."""
        cfg, fw = self.cfg, self.framework
        if self.world_size == 1:
            return None
        moco = cfg.model.framework == "moco"
        try:
            if cfg.train.sync_bn:
                fw.backbone = D.convert_sync_batchnorm(fw.backbone)
            if moco and cfg.model.key_bn == "sync":
                fw.key_backbone = D.convert_sync_batchnorm(fw.key_backbone)
        except ValueError as e:
            raise ConfigError(f"train.sync_bn / model.key_bn: {e}") from None
        if moco and cfg.model.key_bn == "shuffle":
            generator = torch.Generator().manual_seed(seed + 2)
            fw.key_shuffle = D.BatchShuffle(generator)
            return generator
        return None

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()

    def _plan_chunk(self) -> int:
        """train.grad_cache_chunk as a number of clips per backbone pass (0: off); "auto" measures a probe
        step (dualvar.engine.batch_plan) and prints its choice."""
        from .batch_plan import plan_chunk
        from .frameworks import make_views
        from .grad_cache import probe_pass
        setting, clips = self.cfg.train.grad_cache_chunk, self.cfg.data.batch_size // self.world_size
        batchnorm = self.cfg.model.norm == "bn"
        if setting != "auto":
            if setting == 1 and batchnorm and clips > 1:
                raise ConfigError("train.grad_cache_chunk=1 with model.norm=bn: BatchNorm in train mode needs more "
                                  "than one clip per chunk; use a larger chunk, or model.norm=frozen_bn or group")
            return setting if setting and setting < clips else 0
        d, m = self.cfg.data, self.cfg.model
        param_bytes = sum(p.numel() * p.element_size() for p in self.params)
        state_copies = 2 if self.cfg.optim.name == "adamw" else (1 if self.cfg.optim.momentum else 0)
        reserve = param_bytes * (state_copies + (1 if self.world_size > 1 else 0))  # optimizer state, DDP buckets
        if self.device.type == "cpu":  # the uint8 batches (this one and the loader workers' prefetched ones)
            reserve += 3 * d.frames * d.crop * d.crop * 3 * clips * (1 + 2 * d.num_workers)

        def probe(c: int) -> None:
            g = torch.Generator().manual_seed(0)
            video = torch.randint(0, 256, (c, 3, d.frames, d.crop, d.crop, 3), dtype=torch.uint8, generator=g)
            views, perm = make_views({"video": video}, self.device, n_series=m.n_series,
                                     generator=torch.Generator(device=self.device).manual_seed(0),
                                     out_dtype=self.amp_dtype or torch.float32, backend=self.cfg.loss.backend)
            shuffle_state = self.shuffle_generator.get_state() if self.shuffle_generator is not None else None
            probe_pass(self.framework, views, perm, autocast=self._autocast)
            if shuffle_state is not None:  # the probe leaves every generator as it found it
                self.shuffle_generator.set_state(shuffle_state)
            self.optimizer.zero_grad(set_to_none=True)

        plan = plan_chunk(probe, clips, self.device, margin=self.cfg.train.memory_margin, reserve=reserve,
                          fixed=param_bytes, min_chunk=2 if batchnorm else 1)
        self.batch_plan = plan
        if self.is_main:
            print(plan.describe(), flush=True)
        return plan.chunk if plan.chunk < clips else 0

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: dict) -> dict:
        """One optimisation step on a loader batch; returns the step's metrics (python floats)."""
        from dualvar.kernels import random_segment_permutation

        from .frameworks import make_views
        from .grad_cache import GradCache
        cfg = self.cfg
        self.framework.train()
        n = batch["video"].shape[0]
        view_args = dict(n_series=cfg.model.n_series, out_dtype=self.amp_dtype or torch.float32,
                         backend=cfg.loss.backend)
        cache = None
        if self.chunk:
            # 1-2 with gradient caching: the batch's permutations once, then views and embeddings chunk by
            # chunk without a graph (views are rebuilt from the uint8 batch in the second pass)
            perm = random_segment_permutation(n, cfg.model.n_series, generator=self.perm_generator,
                                              derangement=cfg.loss.derangement)
            cache = GradCache(self.model, self.chunk, autocast=self._autocast)
            emb = cache.embed(n, lambda lo, hi: make_views(_batch_rows(batch, lo, hi), self.device, generator=None,
                                                           perm=perm[lo:hi], **view_args))
        else:
            # 1. views: one frame-permutation call on the uint8 batch (the shuffled view included)
            views, perm = make_views(batch, self.device, generator=self.perm_generator,
                                     derangement=cfg.loss.derangement, **view_args)
            # 2. framework: backbone + heads (MoCo: key encoder EMA, then keys) -> one embeddings record
            with self._autocast():
                emb = self.model(views, perm)
        # 3. objective, outside autocast: its statistics are fp32
        out = self.objective(emb)
        parts = {k: v.float() for k, v in out.parts().items()}
        # every process's parts, averaged (the global batch's loss); the same skip decision on every rank
        parts = dict(zip(parts, D.all_reduce(torch.stack(list(parts.values())), "mean").unbind()))
        names = [k for k in parts if k != "total"]
        finite = torch.stack([parts[k] for k in names]).isfinite().tolist()  # the step's one sync
        bad = [k for k, ok in zip(names, finite) if not ok]
        grad_norm = float("nan")
        if not bad:
            # 4. backward (gradient caching: into the embeddings, then chunk by chunk into the parameters),
            # 5. step (the grad scaler only acts in fp16)
            self.scaler.scale(out.total).backward()
            if cache is not None:
                cache.backward(emb)
            self.scaler.unscale_(self.optimizer)
            max_norm = cfg.optim.clip_grad_norm or float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
            if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
                bad = ["grad_norm"]
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                # 6. MoCo: this step's keys into the queues (SimCLR: nothing)
                self.objective.update(emb)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.counters.step += 1
        metrics = {k: v.item() for k, v in parts.items()}
        metrics.update(lr=lr, grad_norm=grad_norm, epoch=self.counters.epoch)
        if bad:
            metrics["nonfinite"] = ",".join(bad)
        return metrics

    # ------------------------------------------------------------------ loop
    def _resume_source(self, how: str) -> str:
        """checkpoint.resume as one path for every rank: with several processes rank 0 picks the newest
        checkpoint that loads ("auto") and the others take its choice."""
        if self.world_size == 1 or how != "auto":
            return how
        found = newest_readable(self.checkpoints.folder, self._message) if self.is_main else None
        path = D.broadcast_object(found[0] if found is not None else None)
        return path if path is not None else "none"

    def _message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.logger is not None:
            self.logger.message(text)
        else:
            print(text, flush=True)

    def _count_nonfinite(self, metrics: dict) -> Optional[str]:
        """Count a skipped step and say so; returns the stop message once max_nonfinite are in a row."""
        return count_nonfinite(self, metrics, lambda m: "loss parts: " + ", ".join(
            f"{k} {m[k]:.4g}" for k in ("clip_nce", "tc_nce", "sr_rank_view0", "sr_rank_view2") if k in m),
            "{part} non-finite")

    def fit(self) -> dict:
        """Train to the end (or resume and finish); returns the summary (also in RUN_DIR/summary.json)."""
        cfg = self.cfg
        kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
        resumed = self.checkpoints.resume(self._resume_source(cfg.checkpoint.resume))
        if resumed is None:
            self.loader.set_epoch(self.counters.epoch)
        start_step = self.counters.step
        self.logger = MetricsLogger(self.run_dir, is_main=self.is_main, total_steps=self.total_steps,
                                    start_step=start_step, tensorboard=cfg.train.tensorboard,
                                    progress=cfg.train.progress)
        self._message(f"{cfg.name}: {cfg.model.framework} {cfg.model.mode}, {cfg.model.backbone}, "
                      f"{len(self.loader.dataset)} videos, {self.steps_per_epoch} steps/epoch, {self.total_steps} "
                      f"steps, device {self.device}, autocast {self.amp_dtype}, run dir {self.run_dir}"
                      + (f", {self.world_size} processes ({self.cfg.data.batch_size // self.world_size} clips each)"
                         if self.world_size > 1 else "")
                      + (f", gradient caching in chunks of {self.chunk}" if self.chunk else ""))
        short = self.loader.dataset.shorter_than_clip()
        if short:
            self._message(f"{short} videos are shorter than one clip; their clips repeat edge frames")
        every = cfg.checkpoint.every_steps
        t_start, steps_done = time.perf_counter(), 0
        step_time = data_time = 0.0
        try:
            while self.counters.step < self.total_steps:
                t0 = time.perf_counter()
                for batch in self.loader:
                    t1 = time.perf_counter()
                    metrics = self.train_step(batch)
                    t2 = time.perf_counter()
                    _fail_hook(self.rank, self.counters.step)
                    step, steps_done = self.counters.step, steps_done + 1
                    data_time, step_time = data_time + (t1 - t0), step_time + (t2 - t1)
                    stop = self._count_nonfinite(metrics)
                    if log_due(step, metrics, cfg.train.log_every, self.total_steps):
                        fails = self.loader.failures()
                        metrics.update(step_rates(t0, t1, t2, VIEWS_PER_SAMPLE * batch["video"].shape[0]
                                                  * self.world_size, self.device),
                                       skipped_videos=sum(v for k, v in fails.items() if k != "attempts"))
                        self.logger.log(step, metrics)
                    self.logger.advance()
                    if stop:
                        raise NonFiniteLossError(stop)
                    if checkpoint_due(step, every, self.total_steps):
                        self.checkpoints.save(step)
                        D.barrier()  # no rank runs ahead of a checkpoint rank 0 is still writing
                    if kill_at and step == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    if step >= self.total_steps:
                        break
                    t0 = time.perf_counter()
                else:  # the epoch's batches are all consumed
                    self.counters.epoch += 1
                    self.loader.set_epoch(self.counters.epoch)
        except BaseException:
            self.logger.close()  # an interrupted run keeps its last checkpoint; nothing half-done is saved
            raise
        wall = time.perf_counter() - t_start
        fails = self.loader.failures()
        if self.world_size > 1:  # every process's read failures
            kinds = sorted(fails)
            fails = dict(zip(kinds, D.all_reduce(torch.tensor([fails[k] for k in kinds]), "sum").tolist()))
        summary = {
            "steps": self.counters.step, "epochs_done": self.counters.step / self.steps_per_epoch,
            "resumed_from": resumed, "steps_this_run": steps_done, "wall_s": wall,
            "step_s_mean": step_time / max(steps_done, 1), "data_s_mean": data_time / max(steps_done, 1),
            "clips_per_s": VIEWS_PER_SAMPLE * self.cfg.data.batch_size * steps_done / max(wall, 1e-9),
            "peak_mem_mb": peak_memory_bytes(self.device) / 2**20,
            "nonfinite_steps": self.counters.nonfinite_steps, "processes": self.world_size,
            "grad_cache_chunk": self.chunk,
            "read_failures": {k: v for k, v in fails.items() if k != "attempts" and v}, "reads": fails["attempts"],
        }
        from dualvar.kernels import last_backend
        summary["backends"] = {op: last_backend(op) for op in KERNEL_OPS}
        text = self.logger.summary(summary)
        self.logger.close()
        self.loader.close()
        if self.is_main:  # results.json and report.md with the training plot, as every run directory has
            from dualvar.engine.evaluate.report import write_report
            write_report(self.run_dir)
        self._message(f"done: {self.run_dir}\n{text}")
        return summary
