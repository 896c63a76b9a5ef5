"""Ahead-of-time compilation of Triton kernels for a GPU that is not here.

`triton.compile(..., target=GPUTarget("cuda", 90, 32))` produces PTX and a cubin on a CPU-only
machine; `ptxas -v` on that PTX reports registers, spills and static shared memory, and the
compiled kernel's metadata reports the dynamic shared memory it needs. Tests use this to assert
every kernel configuration compiles for sm_90 and sm_80 within the chip's limits.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

# Shared memory per block (opt-in maximum) and registers per thread.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGS = 255


@dataclasses.dataclass
class CompileReport:
    name: str
    arch: int
    shared_bytes: int
    registers: int
    spill_stores: int
    spill_loads: int
    num_warps: int

    def within_limits(self) -> bool:
        return self.shared_bytes <= SMEM_LIMIT[self.arch] and self.registers <= MAX_REGS


def _ptxas() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else "ptxas"


def compile_for(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4,
                num_stages: int = 3) -> CompileReport:
    """Compile one specialisation of a @triton.jit `fn` for sm_<arch> and report its resource use.

    signature: argument name -> Triton type string ("*fp32", "i32", "fp32", ...) for runtime args.
    constexprs: argument name -> value for tl.constexpr args.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    static_smem = re.search(r"(\d+) bytes smem", log)
    shared = int(kernel.metadata.shared) + (int(static_smem.group(1)) if static_smem else 0)
    return CompileReport(name=fn.__name__, arch=arch, shared_bytes=shared, registers=regs,
                         spill_stores=int(spills.group(1)) if spills else 0,
                         spill_loads=int(spills.group(2)) if spills else 0, num_warps=num_warps)


def compile_many(specs: list[dict]) -> list[CompileReport]:
    """Compile many kernel configurations in one fresh process with the interpreter off.

    Each spec: {"module": "dualvar.kernels.permute", "kernel": "_permute_frames_kernel", "signature": {...},
    "constexprs": {...}, "arch": 90, "num_warps": 4, "num_stages": 3}. Needed because under
    TRITON_INTERPRET=1 (set for CPU test runs) triton's own helpers are interpreter objects and
    cannot be compiled in that process.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "dualvar.kernels._aot"], input=json.dumps(specs), env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ahead-of-time compilation failed:\n{out.stderr[-4000:]}")
    return [CompileReport(**r) for r in json.loads(out.stdout.strip().splitlines()[-1])]


def _main() -> None:
    specs = json.load(sys.stdin)
    reports = []
    for spec in specs:
        fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        rep = compile_for(fn, spec["signature"], spec["constexprs"], spec["arch"], spec.get("num_warps", 4),
                          spec.get("num_stages", 3))
        reports.append(dataclasses.asdict(rep))
    print(json.dumps(reports))


if __name__ == "__main__":
    _main()
