"""Backend dispatch: one small function that picks which implementation of an op runs.

Backends, in order of preference:
  on CUDA tensors: triton, cuda, torch
  on CPU tensors:  cpu, torch          (triton too when TRITON_INTERPRET=1 and asked for explicitly)

`backend="auto"` (the default, or the value of DUALVAR_BACKEND) takes the first that can run and
warns once per process and op when it had to fall back. An explicit backend that cannot run
raises `BackendUnavailable` listing why. The backend that actually ran is recorded per op
(`last_backend(op)`), so tests and benchmarks can assert that a kernel, not a fallback, ran.

Every op keeps one implementation table `_IMPLS: dict[str, OpImpl]`, backend name -> the pair of
callables (forward, backward) with one signature across that op's backends, so callers never branch
on the backend.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, Mapping, NamedTuple, Optional

import torch

from ._ext import load_ext, load_triton, triton_interpret

BACKENDS = ("triton", "cuda", "cpu", "torch")
_LAST: dict[str, str] = {}
_WARNED: set[tuple[str, str]] = set()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call."""


class OpImpl(NamedTuple):
    """One backend of one op: its forward and its backward (None for an op without a gradient)."""
    forward: Callable
    backward: Optional[Callable] = None


def impl_table(torch_impl: OpImpl, compiled: OpImpl,
               triton: Optional[Callable[[], OpImpl]] = None) -> dict[str, OpImpl]:
    """The implementation table of one op, the same shape for every op: the pure-torch fallback, the
    compiled extension's launcher (one for the cpu and cuda backends: the op's schema dispatches on the
    device), and the Triton launchers when triton imports (`triton()` imports them and returns the OpImpl)."""
    table = {"torch": torch_impl, "cpu": compiled, "cuda": compiled}
    if triton is not None and load_triton()[0] is not None:
        table["triton"] = triton()
    return table


def triton_impl(module: str) -> Callable[[], OpImpl]:
    """`triton` argument of impl_table for a module kernels/<module>.py exposing forward (and backward)."""
    def load() -> OpImpl:
        import importlib
        mod = importlib.import_module(f"dualvar.kernels.{module}")
        return OpImpl(mod.forward, getattr(mod, "backward", None))
    return load


class _SecondOrderRefused(torch.autograd.Function):
    """Identity on a first-order gradient whose own backward raises, naming the op."""

    @staticmethod
    def forward(ctx, op, grad, *deps):
        ctx.op = op
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(f"{ctx.op}: cannot differentiate twice: its fused backward is differentiable once "
                           f"(no double backward, e.g. gradient penalties or Hessian-vector products)")


def once_differentiable(op: str):
    """Decorator for the backward of an op's autograd.Function whose backward is a fused kernel.

    The backward runs without building a graph. When the caller builds one (create_graph=True) and
    anything it depends on requires grad (incoming gradients or saved inputs), the gradients come back
    attached to a node that raises on a second differentiation. torch's own @once_differentiable looks
    only at the incoming gradients, which usually do not require grad (a loss's mean), so the kernel's
    second-order part would silently be left out; here it fails loudly, alike on every backend.
    """
    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outs
            deps = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not deps:
                return outs
            single = not isinstance(outs, tuple)
            outs = tuple(_SecondOrderRefused.apply(op, o, *deps) if isinstance(o, torch.Tensor) else o
                         for o in ((outs,) if single else outs))
            return outs[0] if single else outs
        return wrapper
    return decorate


def backend_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run on `device` in this process (None when it can)."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend needs CPU tensors, got {device.type}"
        return load_ext()[1]
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type}"
        mod, reason = load_ext()
        if mod is None:
            return reason
        if not mod.build_info()["cuda"]:
            return "the extension was built without CUDA kernels (see `dualvar info`)"
        return None
    if backend == "triton":
        _, reason = load_triton()
        if reason:
            return reason
        if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
            return None
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {device.type}"
    return f"unknown backend {backend!r}; choose from {('auto',) + BACKENDS}"


def _auto_order(device: torch.device) -> tuple[str, ...]:
    return ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")


def select(op: str, impls: Mapping[str, OpImpl], device: torch.device, backend: str = "auto",
           veto: Optional[Callable[[str], Optional[str]]] = None) -> str:
    """Choose the backend for one call of `op` on `device`.

    impls: the op's implementation table (backend -> OpImpl). veto(backend) may refuse a backend for
    this call's arguments (a dtype or size a kernel does not support, a stale extension) and says why.
    """
    if backend == "auto":
        backend = os.environ.get("DUALVAR_BACKEND", "auto") or "auto"

    def reason(b: str) -> Optional[str]:
        if b not in impls:
            return f"{op} has no {b} implementation" if b in BACKENDS else backend_reason(b, device)
        return backend_reason(b, device) or (veto(b) if veto else None)

    if backend != "auto":
        why = reason(backend)
        if why:
            raise BackendUnavailable(f"{op}: backend {backend!r} cannot run: {why}")
        chosen = backend
    else:
        order = _auto_order(device)
        reasons = {b: reason(b) for b in order}
        chosen = next(b for b in order if reasons[b] is None)  # torch never refuses
        skipped = {b: r for b, r in reasons.items() if r is not None and order.index(b) < order.index(chosen)}
        if skipped and (op, device.type) not in _WARNED:
            _WARNED.add((op, device.type))
            detail = "; ".join(f"{b}: {r}" for b, r in skipped.items())
            warnings.warn(f"dualvar: {op} on {device.type} falls back to the {chosen} backend ({detail})",
                          RuntimeWarning, stacklevel=3)
    _LAST[op] = chosen
    return chosen


def last_backend(op: str) -> Optional[str]:
    """The backend that ran the most recent call of `op` in this process."""
    return _LAST.get(op)


def available_backends(device: torch.device | str) -> dict[str, Optional[str]]:
    """backend -> None if it can run on `device`, else the reason it cannot."""
    device = torch.device(device)
    return {b: backend_reason(b, device) for b in BACKENDS}
