"""`python -m dualvar.kernels.info`: what is built, what can run here, and why not."""
from __future__ import annotations

import os
import platform

import torch

from ._dispatch import available_backends
from ._ext import build_info, compiled_op_reason, load_triton
from .contrastive import COMPILED_OPS as CONTRASTIVE_OPS

# every torch.ops.dualvar op the Python side calls
COMPILED_OPS = ("permute_frames", *CONTRASTIVE_OPS, "shuffle_rank_fwd", "shuffle_rank_bwd")


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode (always / madvise / never), or why it is unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return "unknown (no /sys/kernel/mm/transparent_hugepage)"


def report() -> str:
    lines = [
        f"python        {platform.python_version()} ({platform.machine()})",
        f"torch         {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
    ]
    triton, why = load_triton()
    interpret = "  [TRITON_INTERPRET=1]" if os.environ.get("TRITON_INTERPRET") == "1" else ""
    lines.append(f"triton        {triton.__version__ if triton else 'unavailable: ' + why}{interpret}")
    if torch.cuda.is_available():
        sm = "".join(map(str, torch.cuda.get_device_capability()))
        lines.append(f"device        cuda: {torch.cuda.get_device_name()} (sm_{sm})")
    else:
        lines.append(f"device        cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads); "
                     f"no CUDA device")
    info = build_info()
    if info["built"]:
        lines.append(f"extension     built; CUDA kernels: {'yes' if info['cuda'] else 'no'}; OpenMP: {info['openmp']}; "
                     f"compiler {info['compiler']}")
        try:
            from ._build_config import BUILD
            lines.append(f"build         {BUILD['summary']} (torch {BUILD['torch_at_build']} at build time)")
            lines.append(f"arch list     {BUILD['cuda_arch_list'] or 'none (no CUDA kernels)'}")
        except ImportError:
            lines.append("build         no record (kernels/_build_config.py missing)")
        stale = compiled_op_reason(*COMPILED_OPS)
        lines.append(f"ops           {'all ' + str(len(COMPILED_OPS)) + ' present' if stale is None else stale}")
    else:
        lines.append(f"extension     not built: {info['reason']}")
    lines.append(f"huge pages    THP {thp_mode()}; cpu permute_frames output advice "
                 f"{'off (DUALVAR_HUGEPAGES=0)' if os.environ.get('DUALVAR_HUGEPAGES') == '0' else 'on'}")
    lines.append(f"DUALVAR_BACKEND={os.environ.get('DUALVAR_BACKEND', '(unset: auto)')}")
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for backend, reason in available_backends(dev).items():
            lines.append(f"  {dev:5s} {backend:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
