"""Gradient caching: a contrastive batch as large as the loss's memory allows, not the backbone's.

The fused losses need O(M) memory for M rows, but the backbone's activations grow with the batch. Gradient
caching (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021) cuts
the batch into chunks for the backbone and keeps the loss global:

    gc = GradCache(model, chunk=64, autocast=autocast_factory)
    emb = gc.embed(n, inputs)                  # pass 1: every chunk without a graph; emb fields are leaves
    out = objective(emb)                       # every loss once, on the whole batch (fused kernels)
    out.total.backward()                       # d loss / d embeddings, cached in emb.*.grad
    gc.backward(emb)                           # pass 2: each chunk again with a graph, backward of its
                                               # slice of the cached gradient; parameter grads accumulate

`inputs(lo, hi) -> (views, perm)` builds samples lo..hi-1 of this process's batch (the trainer slices the
uint8 batch and runs make_views on it with the batch's permutations), so not even the float views of the
whole batch are held at once. Under DDP, `model` is the DDP wrapper: pass 2 runs every chunk but the last
under `no_sync()`, so the gradients are all-reduced once per step; the losses' cross-rank gathers run once,
in `out.total.backward()`.

What is exact and what is not (docs/method.md §4, §8.8):
- The parameter gradient equals the unchunked step's when every sample's embedding depends on that sample
  alone: backbones without batch statistics (model.norm=frozen_bn or group) or in eval mode. That holds to
  rounding (tests: 1e-5 relative), for SimCLR and MoCo, on one process and under DDP.
- RNG-dependent layers (dropout, stochastic depth) replay the same randomness in both passes: the CPU
  and CUDA generator states are saved before each chunk's first pass and restored before its second (as
  torch.utils.checkpoint does), and set to their post-pass-1 state afterwards.
- BatchNorm in train mode normalises each chunk with the chunk's own statistics, not the batch's (SimCLR:
  each chunk's views 0-2 together and its shuffled views alone; MoCo: as the framework batches them). This
  is the same as training with a smaller per-device batch and changes the model's training dynamics; the
  running statistics are updated once per chunk (only in pass 2; pass 1 leaves them alone), i.e. n/chunk
  momentum updates per step instead of one. Use frozen-statistics BN or GroupNorm for exact equivalence.
- MoCo: the key encoder moves (EMA) once per step, before pass 1; keys are computed in pass 1 only (no
  gradient), and pass 2 reuses them. Its BatchNorm statistics come from pass 1, per chunk (with batch-shuffle
  BN the shuffle mixes each chunk across ranks).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ContextManager, Iterator, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import distributed as dist

InputsFn = Callable[[int, int], tuple]  # (lo, hi) -> (views (hi - lo, 4, C, T, H, W), perm (hi - lo, s) or None)


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """[(lo, hi), ...] covering 0..n-1 in chunks of `chunk` (the last may be shorter)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    return [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]


def _is_moco(module: nn.Module) -> bool:
    return hasattr(module, "key_backbone") and hasattr(module, "momentum_update")


def _key_modules(module: nn.Module) -> list[nn.Module]:
    if not _is_moco(module):
        return []
    return [m for m in (module.key_backbone, module.key_clip_head, getattr(module, "key_series_head", None))
            if m is not None]


@contextlib.contextmanager
def _running_stats_frozen(modules: list[_BatchNorm]) -> Iterator[None]:
    """Train-mode BatchNorms normalise with batch statistics but leave their running statistics (and
    num_batches_tracked) untouched: torch's BatchNorm does so when track_running_stats is False."""
    flipped = [m for m in modules if m.training and m.track_running_stats]
    for m in flipped:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in flipped:
            m.track_running_stats = True


@contextlib.contextmanager
def _moco_hooks(module: nn.Module, device: Optional[torch.device], *, record: Optional[list] = None,
                replay: Optional[tuple] = None) -> Iterator[None]:
    """MoCo forward without its per-call EMA step (the caller moves the key encoder once per step), and
    pass 1 (`record`: a list that receives the RNG state right after each key computation) or pass 2
    (`replay`: (keys, rng state): the key encoder is not run again, its keys are returned and the RNG
    jumps to where the key encoder left it in pass 1, so the query layers draw the same numbers)."""
    if not _is_moco(module):
        yield
        return
    module.momentum_update = _no_op  # instance attributes shadow the methods for this block only
    if record is not None:
        def keys_recorded(x):
            out = type(module)._keys(module, x)
            record.append(_rng_state(device))
            return out
        module._keys = keys_recorded
    elif replay is not None:
        def keys_replayed(x):
            _set_rng_state(replay[1], device)
            return replay[0]
        module._keys = keys_replayed
    try:
        yield
    finally:
        del module.momentum_update
        if record is not None or replay is not None:
            del module._keys


def _no_op() -> None:
    return None


def _rng_state(device: Optional[torch.device]) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: Optional[torch.device]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _fields(emb) -> list[str]:
    return [f.name for f in dataclasses.fields(emb)]


def concat_embeddings(pieces: list):
    """One Embeddings record from per-chunk records (every field concatenated along the batch)."""
    first = pieces[0]
    values = {}
    for name in _fields(first):
        parts = [getattr(p, name) for p in pieces]
        values[name] = None if parts[0] is None else torch.cat(parts, dim=0)
    return type(first)(**values)


class GradCache:
    """Two-pass chunked embedding for one training step (see the module docstring).

    model: the framework, or its DDP wrapper (forward(views, perm) -> Embeddings). chunk: samples per
    backbone pass. autocast: a factory of the context every forward runs under (e.g. bf16 autocast).
    """

    def __init__(self, model: nn.Module, chunk: int, *,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext):
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
        self.model, self.chunk, self.autocast = model, chunk, autocast
        self._state: Optional[dict] = None

    @property
    def inner(self) -> nn.Module:
        return dist.unwrap(self.model)

    def _rerun_batchnorms(self) -> list[_BatchNorm]:
        keys = {id(m) for km in _key_modules(self.inner) for m in km.modules()}
        return [m for m in self.inner.modules() if isinstance(m, _BatchNorm) and id(m) not in keys]

    def embed(self, n: int, inputs: InputsFn):
        """Pass 1: embed samples 0..n-1 chunk by chunk without a graph. Returns the Embeddings record of the
        whole batch whose floating fields are leaf tensors requiring grad (back-propagate the loss into
        them, then call `backward`). MoCo: the key encoder's EMA step runs here, once."""
        inner = self.inner
        if _is_moco(inner) and inner.training:
            inner.momentum_update()
        bounds = chunk_bounds(n, self.chunk)
        device = next(inner.parameters()).device
        pieces, states, key_states = [], [], []
        with torch.no_grad(), _running_stats_frozen(self._rerun_batchnorms()), \
                _moco_hooks(inner, device, record=key_states):
            for lo, hi in bounds:
                states.append(_rng_state(device))
                views, perm = inputs(lo, hi)
                with self.autocast():
                    pieces.append(self.model(views, perm))
        emb = concat_embeddings(pieces)
        if emb.z0.shape[0] != n:
            raise ValueError(f"inputs(lo, hi) must give hi - lo samples: the chunks hold {emb.z0.shape[0]}, not {n}")
        keys = (emb.z1, emb.u1) if _is_moco(inner) else None
        for name in _fields(emb):
            t = getattr(emb, name)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                setattr(emb, name, t.detach().requires_grad_())
        self._state = dict(bounds=bounds, rng=states, after=_rng_state(device), device=device, inputs=inputs,
                           keys=keys, key_rng=key_states, emb=emb)
        return emb

    def backward(self, emb) -> None:
        """Pass 2: re-embed each chunk with a graph and back-propagate its slice of the gradients that the
        loss left in `emb` (the record `embed` returned). Parameter gradients accumulate (under DDP:
        all-reduced once, with the last chunk)."""
        st = self._state
        if st is None or emb is not st["emb"]:
            raise RuntimeError("GradCache.backward needs the record returned by this cache's last embed()")
        grads = {name: getattr(emb, name).grad for name in _fields(emb)
                 if isinstance(getattr(emb, name), torch.Tensor) and getattr(emb, name).grad is not None}
        if not grads:
            raise RuntimeError("no gradient reached the embeddings: back-propagate the loss of the record "
                               "embed() returned before GradCache.backward")
        device, inner = st["device"], self.inner
        n_chunks = len(st["bounds"])
        try:
            for i, ((lo, hi), rng) in enumerate(zip(st["bounds"], st["rng"])):
                _set_rng_state(rng, device)
                replay = None
                if st["keys"] is not None:
                    z1, u1 = st["keys"]
                    replay = ((z1[lo:hi].detach(), None if u1 is None else u1[lo:hi].detach()), st["key_rng"][i])
                sync = contextlib.nullcontext() if i == n_chunks - 1 else dist.no_sync(self.model)
                with sync, _moco_hooks(inner, device, replay=replay):
                    views, perm = st["inputs"](lo, hi)
                    with self.autocast():
                        e = self.model(views, perm)
                    outs, gs = [], []
                    for name, g in grads.items():
                        t = getattr(e, name)
                        if t is not None and t.requires_grad:
                            outs.append(t)
                            gs.append(g[lo:hi])
                    if outs:
                        torch.autograd.backward(outs, gs)
        finally:
            _set_rng_state(st["after"], device)
            self._state = None


def probe_pass(model: nn.Module, views: torch.Tensor, perm: Optional[torch.Tensor], *,
               autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
    """One forward with a graph and a backward of the (unwrapped) framework on `views`, as a chunk of the
    second pass costs, leaving the model as it was: no EMA step, BatchNorm running statistics untouched
    (batch statistics are still used), random generators restored. Parameter gradients are left for the
    caller to clear. The memory probe of automatic batch planning (dualvar.engine.batch_plan)."""
    inner = dist.unwrap(model)
    device = next(inner.parameters()).device
    bns = [m for m in inner.modules() if isinstance(m, _BatchNorm)]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            _running_stats_frozen(bns), _moco_hooks(inner, device):
        with autocast():
            emb = inner(views, perm)
        outs = [t for t in (getattr(emb, f) for f in _fields(emb))
                if isinstance(t, torch.Tensor) and t.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
