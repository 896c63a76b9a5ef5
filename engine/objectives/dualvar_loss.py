"""The DualVar objective (docs/method.md §3, §9.2-9.4) composed from dualvar.kernels, for SimCLR and MoCo.

Objectives take the framework's `Embeddings` record (dualvar.engine.frameworks), never the model, and return
the total plus named parts; the trainer combines and logs them. Both frameworks' objectives have the same
interface, `forward(emb)` and `update(emb)` (after the optimizer step: MoCo enqueues the keys, SimCLR does
nothing), so the training step never branches on the framework. `build_objective` makes the right one. Parts:

    clip_nce        NT-Xent of the clip embeddings (SimCLR, tau) or InfoNCE against the clip queue (MoCo)
    tc_nce          temporal-coherent loss on the mean series vectors m = mean_k u_k (not re-normalised),
                    temperature tau_a; SimCLR: NT-Xent over views 0 and 1; MoCo: InfoNCE of m_q against
                    m_k and a queue of per-key means (exact: m_q . mean_l n_l = mean_{k,l} u_{q,k} . n_l)
    sr_rank_view0   w0 * R(u of view 0 (MoCo: the query), calibrated shuffled series)
    sr_rank_view2   w2 * R(u of view 2, calibrated shuffled series)

Modes: "baseline" (clip only), "clip-sr" (alias "only-seg"), "clip-sr-tc" (alias "avg-series", the
paper's full method). Total = clip_nce + tc_nce + sr_rank_view0 + sr_rank_view2 over the parts the mode
computes (docs/method.md §3.4).

Non-finite embeddings are not an error here: they propagate (NaN in, NaN part and total out, no device
sync to look for them), and the trainer names the part that went non-finite and skips the step.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from dualvar.kernels import distributed as dist, info_nce_loss, nt_xent_loss, shuffle_rank_loss

if TYPE_CHECKING:
    from dualvar.engine.frameworks import Embeddings

MODES = ("baseline", "clip-sr", "clip-sr-tc")
MODE_ALIASES = {"only-seg": "clip-sr", "avg-series": "clip-sr-tc", "simclr": "baseline", "moco": "baseline"}
FRAMEWORKS = ("simclr", "moco")


@dataclasses.dataclass(frozen=True)
class DualVarLossConfig:
    """What the objective computes.

    mode: "baseline", "clip-sr" ("only-seg") or "clip-sr-tc" ("avg-series").
    framework: "simclr" or "moco".
    tau: clip temperature; tau_a: tc temperature; theta: shuffle-rank temperature.
    cap: clamp of the scaled ranking difference before the softplus. None = the reference's choice per
        framework: 5 for SimCLR, +inf for MoCo (whose reference also hard-codes theta = 0.05).
    sr_weights: (w0, w2) of the two ranking terms.
    distributed: SimCLR losses use rows of this rank against columns of every rank (a process group
        must be initialised); MoCo queues are filled with every rank's keys.
    reference_ddp: replicate the reference's DDP gradient weighting (docs/method.md §4(b)): clip gradient
        scaled by 1/W and cross-rank tc negatives treated as constants. Default: exact gradients (§4(a)).
    backend: kernel backend for every loss ("auto", "triton", "cuda", "cpu", "torch").
    check_perm: validate the segment permutations on every call (one device sync on CUDA).
    """
    mode: str = "clip-sr-tc"
    framework: str = "simclr"
    tau: float = 0.07
    tau_a: float = 0.07
    theta: float = 0.05
    cap: Optional[float] = None
    sr_weights: tuple = (0.5, 0.5)
    distributed: bool = False
    reference_ddp: bool = False
    backend: str = "auto"
    check_perm: bool = True

    def __post_init__(self):
        mode = MODE_ALIASES.get(self.mode, self.mode)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (or {tuple(MODE_ALIASES)}), got {self.mode!r}")
        object.__setattr__(self, "mode", mode)
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {FRAMEWORKS}, got {self.framework!r}")
        for name in ("tau", "tau_a", "theta"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        cap = self.cap if self.cap is not None else (5.0 if self.framework == "simclr" else math.inf)
        if not isinstance(cap, (int, float)) or math.isnan(cap):
            raise ValueError(f"cap must be a number or inf, got {self.cap!r}")
        object.__setattr__(self, "cap", float(cap))
        w = tuple(float(x) for x in self.sr_weights)
        if len(w) != 2 or not all(math.isfinite(x) and x >= 0 for x in w):
            raise ValueError(f"sr_weights must be two non-negative numbers, got {self.sr_weights!r}")
        object.__setattr__(self, "sr_weights", w)
        if self.reference_ddp and not self.distributed:
            raise ValueError("reference_ddp only applies with distributed=True")

    @property
    def with_sr(self) -> bool:
        return self.mode in ("clip-sr", "clip-sr-tc")

    @property
    def with_tc(self) -> bool:
        return self.mode == "clip-sr-tc"


@dataclasses.dataclass
class DualVarLossOutput:
    """total: scalar to back-propagate. Parts are None when the mode does not compute them.
    sr_accuracy: mean ranking accuracy of the two sr terms; sr_accuracy_view0/2 per term (no grad)."""
    total: torch.Tensor
    clip_nce: torch.Tensor
    tc_nce: Optional[torch.Tensor] = None
    sr_rank_view0: Optional[torch.Tensor] = None
    sr_rank_view2: Optional[torch.Tensor] = None
    sr_accuracy: Optional[torch.Tensor] = None
    sr_accuracy_view0: Optional[torch.Tensor] = None
    sr_accuracy_view2: Optional[torch.Tensor] = None

    def parts(self) -> dict:
        """name -> detached tensor for every computed part (incl. total), for logging."""
        return {f.name: getattr(self, f.name).detach() for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def _world_size() -> int:
    if not dist.is_distributed():
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
    return dist.world_size()


def _check_series(name: str, u: Optional[torch.Tensor], like: Optional[torch.Tensor] = None) -> None:
    if u is None:
        raise ValueError(f"{name} is required in this mode")
    if u.dim() != 3:
        raise ValueError(f"{name} must be (B, s, d), got {tuple(u.shape)}")
    if like is not None and u.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(u.shape)} but expected {tuple(like.shape)}")


def _check_clip(name: str, z: torch.Tensor, like: Optional[torch.Tensor] = None) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"{name} must be (B, D) clip embeddings, got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    if like is not None and z.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(z.shape)} but expected {tuple(like.shape)}")


def _sr_parts(cfg: DualVarLossConfig, u0, u2, y_shuf, perm):
    _check_series("u2", u2, u0)
    _check_series("y_shuf", y_shuf, u0)
    res = shuffle_rank_loss(u0, y_shuf, perm, cfg.theta, cap=cfg.cap, weight=cfg.sr_weights[0], anchor2=u2,
                            weight2=cfg.sr_weights[1], return_parts=True, check_perm=cfg.check_perm,
                            backend=cfg.backend)
    return dict(sr_rank_view0=res.terms[0], sr_rank_view2=res.terms[1], sr_accuracy=res.accuracy.mean(),
                sr_accuracy_view0=res.accuracy[0], sr_accuracy_view2=res.accuracy[1])


def _total(parts: dict) -> torch.Tensor:
    names = ("clip_nce", "tc_nce", "sr_rank_view0", "sr_rank_view2")
    total = None
    for n in names:
        if parts.get(n) is not None:
            v = parts[n].to(parts["clip_nce"].dtype)
            total = v if total is None else total + v
    return total


def _check_record(emb) -> None:
    for name in ("z0", "z1", "u0", "u1", "u2", "y_shuf", "perm"):
        if not hasattr(emb, name):
            raise TypeError(f"emb must be an Embeddings record (dualvar.engine.frameworks) with field {name!r}, "
                            f"got {type(emb).__name__}")


class DualVarLoss(nn.Module):
    """SimCLR DualVar objective.

    forward(emb: Embeddings) -> DualVarLossOutput, reading
        z0, z1: (B, D) unit clip embeddings of views 0 and 1.
        u0, u1, u2: (B, s, d) unit series vectors (each chunk normalised) of views 0, 1, 2.
        y_shuf: (B, s, d) raw series vectors of the shuffled clip, in shuffled order.
        perm: int64 (B, s), shuffled segment j = original segment perm[b, j].
    baseline needs z0, z1; clip-sr adds u0, u2, y_shuf, perm; clip-sr-tc adds u1.
    With distributed=True every tensor holds this rank's B clips.
    update(emb): nothing (SimCLR keeps no state between steps).
    """

    def __init__(self, config: DualVarLossConfig):
        super().__init__()
        if config.framework != "simclr":
            raise ValueError("DualVarLoss is the SimCLR objective; use MoCoDualVarLoss for framework='moco'")
        self.config = config

    def forward(self, emb: "Embeddings") -> DualVarLossOutput:
        cfg = self.config
        _check_record(emb)
        z0, z1, u0, u1 = emb.z0, emb.z1, emb.u0, emb.u1
        _check_clip("z0", z0)
        _check_clip("z1", z1, z0)
        clip = nt_xent_loss(torch.cat([z0, z1]), cfg.tau, distributed=cfg.distributed, check_finite=False,
                            backend=cfg.backend)
        if cfg.reference_ddp:
            clip = _ScaleGrad.apply(clip, 1.0 / _world_size())
        parts = {"clip_nce": clip}
        if cfg.with_tc:
            _check_series("u0", u0)
            _check_series("u1", u1, u0)
            m = torch.cat([u0.mean(dim=1), u1.mean(dim=1)])  # (2B, d), not re-normalised
            parts["tc_nce"] = nt_xent_loss(m, cfg.tau_a, distributed=cfg.distributed,
                                           reference_ddp=cfg.reference_ddp, check_finite=False, backend=cfg.backend)
        if cfg.with_sr:
            _check_series("u0", u0)
            parts.update(_sr_parts(cfg, u0, emb.u2, emb.y_shuf, emb.perm))
        return DualVarLossOutput(total=_total(parts), **parts)

    def update(self, emb: "Embeddings") -> None:
        """SimCLR has no queues: nothing to do after the step."""


class Queue(nn.Module):
    """A MoCo queue of K entries of dim D (a buffer, so it is checkpointed with the loss module).

    enqueue(keys) writes the n rows of `keys` at the pointer and moves it by n (K must be divisible
    by n). The update is out of place: a loss computed from the old entries can still be
    back-propagated after the enqueue.
    """

    def __init__(self, entries: torch.Tensor):
        super().__init__()
        if entries.dim() != 2:
            raise ValueError(f"queue entries must be (K, D), got {tuple(entries.shape)}")
        self.register_buffer("entries", entries.detach().clone())
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=entries.device))

    @classmethod
    def random_unit(cls, size: int, dim: int, *, generator: Optional[torch.Generator] = None,
                    device=None, dtype=torch.float32) -> "Queue":
        """K random unit vectors (the reference's clip queue initialisation)."""
        x = torch.randn(size, dim, generator=generator, device=device if generator is None else generator.device)
        return cls(torch.nn.functional.normalize(x, dim=1).to(device=device, dtype=dtype))

    @classmethod
    def random_series_means(cls, size: int, n_series: int, dim: int, *, generator: Optional[torch.Generator] = None,
                            device=None, dtype=torch.float32) -> "Queue":
        """K means of n_series random unit chunks: the reference's per-chunk normalised series queue,
        stored as the per-entry mean the tc loss needs (docs/method.md §9.2)."""
        x = torch.randn(size, n_series, dim, generator=generator,
                        device=device if generator is None else generator.device)
        return cls(torch.nn.functional.normalize(x, dim=2).mean(dim=1).to(device=device, dtype=dtype))

    @property
    def size(self) -> int:
        return self.entries.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = keys.detach()
        K = self.size
        n = keys.shape[0]
        if keys.dim() != 2 or keys.shape[1] != self.entries.shape[1]:
            raise ValueError(f"keys must be (n, {self.entries.shape[1]}), got {tuple(keys.shape)}")
        if n == 0 or K % n:
            raise ValueError(f"queue size {K} must be divisible by the number of keys enqueued per step ({n})")
        p = int(self.ptr)
        idx = torch.arange(p, p + n, device=self.entries.device)
        self.entries = self.entries.index_copy(0, idx, keys.to(self.entries.dtype))
        self.ptr.fill_((p + n) % K)


class MoCoDualVarLoss(nn.Module):
    """MoCo DualVar objective with a clip queue and a series-mean queue (docs/method.md §2.3, §3.5, §9.2).

    forward(emb: Embeddings) -> DualVarLossOutput, reading
        z0, z1: (B, D) unit clip embeddings of the query (view 0) and key (view 1; no gradient).
        u0, u1: (B, s, d) unit series vectors of query and key (u1: no gradient).
        u2: (B, s, d) unit series of view 2 (query encoder); y_shuf: (B, s, d) raw series of the
        shuffled clip; perm: int64 (B, s).
    update(emb): after the step, write this step's keys (all ranks' when distributed) into the queues:
    z1 into the clip queue, mean_k u1 into the series-mean queue. The series queue is updated in every
    series mode (as the reference does), so switching modes keeps it warm; baseline records carry no
    series and leave it as it is.
    """

    def __init__(self, config: DualVarLossConfig, clip_queue: Queue, series_queue: Queue):
        super().__init__()
        if config.framework != "moco":
            raise ValueError("MoCoDualVarLoss is the MoCo objective; use DualVarLoss for framework='simclr'")
        if clip_queue.size != series_queue.size:
            raise ValueError(f"clip queue ({clip_queue.size}) and series queue ({series_queue.size}) must have "
                             "one size")
        self.config = config
        self.clip_queue = clip_queue
        self.series_queue = series_queue

    def forward(self, emb: "Embeddings") -> DualVarLossOutput:
        cfg = self.config
        _check_record(emb)
        z_q, z_k, u_q, u_k = emb.z0, emb.z1, emb.u0, emb.u1
        _check_clip("z0", z_q)
        _check_clip("z1", z_k, z_q)
        # the queues keep their own dtype (float32); the loss reads them in the embeddings' dtype
        parts = {"clip_nce": info_nce_loss(z_q, z_k.detach(), self.clip_queue.entries.to(z_q.dtype), cfg.tau,
                                           check_finite=False, backend=cfg.backend)}
        if cfg.with_tc:
            _check_series("u0", u_q)
            _check_series("u1", u_k, u_q)
            parts["tc_nce"] = info_nce_loss(u_q.mean(dim=1), u_k.detach().mean(dim=1),
                                            self.series_queue.entries.to(u_q.dtype), cfg.tau_a, check_finite=False,
                                            backend=cfg.backend)
        if cfg.with_sr:
            _check_series("u0", u_q)
            parts.update(_sr_parts(cfg, u_q, emb.u2, emb.y_shuf, emb.perm))
        return DualVarLossOutput(total=_total(parts), **parts)

    @torch.no_grad()
    def update(self, emb: "Embeddings") -> None:
        """Enqueue the keys of this step (every rank's when distributed, in rank order)."""
        _check_record(emb)
        self.enqueue(emb.z1, emb.u1)

    @torch.no_grad()
    def enqueue(self, z_k: torch.Tensor, u_k: Optional[torch.Tensor] = None) -> None:
        gather = dist.all_gather_no_grad if self.config.distributed else torch.Tensor.detach
        self.clip_queue.enqueue(gather(z_k))
        if u_k is not None:
            self.series_queue.enqueue(gather(u_k.mean(dim=1)))


def build_objective(config: DualVarLossConfig, *, queue_size: int = 16384, clip_dim: int = 128, series_dim: int = 64,
                    n_series: int = 2, generator: Optional[torch.Generator] = None, device=None) -> nn.Module:
    """The objective of `config.framework`: DualVarLoss (SimCLR) or MoCoDualVarLoss with two queues of
    `queue_size` entries (clip: random unit vectors of clip_dim; series: means of n_series random unit
    chunks of series_dim, as the reference initialises them), drawn from `generator`, placed on `device`.
    queue_size must be divisible by the global batch (keys enqueued per step)."""
    if config.framework == "simclr":
        return DualVarLoss(config)
    for name, v in (("queue_size", queue_size), ("clip_dim", clip_dim), ("series_dim", series_dim),
                    ("n_series", n_series)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    clip_queue = Queue.random_unit(queue_size, clip_dim, generator=generator, device=device)
    series_queue = Queue.random_series_means(queue_size, n_series, series_dim, generator=generator, device=device)
    return MoCoDualVarLoss(config, clip_queue, series_queue)
