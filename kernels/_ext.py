"""Loading the compiled extension `dualvar.kernels._C` and Triton, and saying why either is missing.

A missing extension is never an ImportError of the package: it is a warning at first use and a
clear message wherever a compiled backend is explicitly requested.
"""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def load_ext():
    """Return (module, None) when the compiled extension imports, else (None, reason)."""
    try:
        from dualvar.kernels import _C  # noqa: F401  (registers torch.ops.dualvar.*)
    except ImportError as exc:  # not built, or built against another torch
        reason = f"compiled extension dualvar.kernels._C not importable ({exc}); build it with `pip install -e .`"
        return None, reason
    _register_fakes()
    return _C, None


def _register_fakes() -> None:
    """Shape functions of the compiled ops, so torch.compile and FakeTensor tracing can see through them."""
    import torch

    register = getattr(torch.library, "register_fake", None)
    if register is None:  # torch < 2.4
        return

    def acc(x):
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def permute_frames(video, frame_index, lut, hflip):
        B, _, H, W, C = video.shape
        return video.new_empty((B, C, frame_index.shape[1], H, W), dtype=lut.dtype)

    def lse_fwd(q, k, temperature, exclude_offset):
        return q.new_empty((q.shape[0],), dtype=acc(q))

    def lse_bwd(q, k, lse, grad, temperature, exclude_offset, need_q, need_k):
        return q.new_empty(q.shape, dtype=acc(q)), k.new_empty(k.shape, dtype=acc(k))

    def lse_bwd_sym(z, lse, grad, temperature):
        return z.new_empty(z.shape, dtype=acc(z))

    for name, fn in (("permute_frames", permute_frames), ("lse_fwd", lse_fwd), ("lse_bwd", lse_bwd),
                     ("lse_bwd_sym", lse_bwd_sym)):
        try:
            register(f"dualvar::{name}", fn)
        except RuntimeError:  # already registered (module reloaded)
            pass


def build_info() -> dict:
    mod, reason = load_ext()
    if mod is None:
        return {"built": False, "reason": reason}
    return {"built": True, **mod.build_info()}


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
