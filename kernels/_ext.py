"""Loading the compiled extension `dualvar.kernels._C` and Triton, and saying why either is missing.

A missing extension is never an ImportError of the package: it is a warning at first use and a
clear message wherever a compiled backend is explicitly requested. An extension built from older
sources (it lacks an op the Python side calls) is reported the same way by `compiled_op_reason`.

Each op module registers the shape (fake/meta) functions of its compiled ops with `register_fakes`,
so torch.compile and FakeTensor tracing can see through them.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Mapping, Optional

REBUILD = "rebuild it with `pip install --no-build-isolation -e .`"

_FAKES: dict[str, Callable] = {}      # op name (no namespace) -> fake function, registered or pending
_REGISTERED: set[str] = set()
_LOADED = False


@functools.lru_cache(maxsize=None)
def load_ext():
    """Return (module, None) when the compiled extension imports, else (None, reason)."""
    global _LOADED
    try:
        from dualvar.kernels import _C  # noqa: F401  (registers torch.ops.dualvar.*)
    except ImportError as exc:  # not built, or built against another torch
        return None, f"compiled extension dualvar.kernels._C not importable ({exc}); {REBUILD}"
    _LOADED = True
    _register_pending()
    return _C, None


def register_fakes(fakes: Mapping[str, Callable]) -> None:
    """Register fake (meta) functions of compiled ops: {"contrastive_fwd": fn, ...}, names without the
    `dualvar::` namespace. Applied when the extension loads, or at once if it already has; ops the
    loaded extension lacks (a stale build) are skipped, `compiled_op_reason` reports them."""
    _FAKES.update(fakes)
    if _LOADED:
        _register_pending()


def _register_pending() -> None:
    import torch

    register = getattr(torch.library, "register_fake", None)
    if register is None:  # torch < 2.4
        return
    for name, fn in _FAKES.items():
        if name in _REGISTERED or not hasattr(torch.ops.dualvar, name):
            continue
        try:
            register(f"dualvar::{name}", fn)
        except RuntimeError:  # already registered (module reloaded)
            pass
        _REGISTERED.add(name)


@functools.lru_cache(maxsize=None)
def compiled_op_reason(*names: str) -> Optional[str]:
    """None when the extension loads and defines torch.ops.dualvar.<name> for every name, else why not."""
    mod, reason = load_ext()
    if mod is None:
        return reason
    import torch

    missing = [n for n in names if not hasattr(torch.ops.dualvar, n)]
    if missing:
        return (f"the compiled extension is stale: it lacks {', '.join('torch.ops.dualvar.' + n for n in missing)} "
                f"(built from older sources); {REBUILD}")
    return None


def build_info() -> dict:
    mod, reason = load_ext()
    if mod is None:
        return {"built": False, "reason": reason}
    return {"built": True, **mod.build_info()}


def device_guard(x):
    """Context that makes x's CUDA device current for a kernel launch (Triton launches on the current
    device and stream); a no-op for CPU tensors (the Triton interpreter)."""
    import torch

    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def load_triton():
    """Return (triton module, None) or (None, reason)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as exc:
        return None, f"triton not importable ({exc})"
    return triton, None
