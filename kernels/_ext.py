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
    return _C, None


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
