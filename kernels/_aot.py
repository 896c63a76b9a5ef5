"""Ahead-of-time compilation of Triton kernels for a GPU that is not here.

`triton.compile(..., target=GPUTarget("cuda", 90, 32))` produces PTX and a cubin on a CPU-only
machine; `ptxas -v` on that PTX reports registers, spills and static shared memory, and the
compiled kernel's metadata reports the dynamic shared memory it needs. Tests use this to assert
every kernel configuration compiles for sm_90 and sm_80 within the chip's limits.

The variant that runs: `compile_launchers` calls a package launcher (e.g.
`dualvar.kernels.contrastive_triton:forward`) on CPU tensors of the shapes a real call has, with
Triton's launch replaced by a recorder, and compiles each recorded launch through Triton's own
runtime specialisation (the binder a GPU launch uses): the same signature, constexprs and
divisibility hints (16-byte aligned pointers, integers divisible by 16) as on the GPU, hence the
same shared memory and registers. `compile_for` compiles one hand-written signature (no hints
unless given).

Both run in one fresh process with the interpreter off (`python -m dualvar.kernels._aot`): under
TRITON_INTERPRET=1, set for CPU test runs, triton's own helpers are interpreter objects and cannot
be compiled in that process.
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
    hints: int = 0  # arguments compiled with a divisibility-by-16 hint

    def within_limits(self) -> bool:
        return self.shared_bytes <= SMEM_LIMIT[self.arch] and self.registers <= MAX_REGS


def _ptxas() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else "ptxas"


def _report(kernel, name: str, arch: int, num_warps: int, hints: int) -> CompileReport:
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
    return CompileReport(name=name, arch=arch, shared_bytes=shared, registers=regs,
                         spill_stores=int(spills.group(1)) if spills else 0,
                         spill_loads=int(spills.group(2)) if spills else 0, num_warps=num_warps, hints=hints)


def compile_for(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4,
                num_stages: int = 3, attrs: dict | None = None) -> CompileReport:
    """Compile one specialisation of a @triton.jit `fn` for sm_<arch> and report its resource use.

    signature: argument name -> Triton type string ("*fp32", "i32", "fp32", ...) for runtime args.
    constexprs: argument name -> value for tl.constexpr args. attrs: {(arg index,): [["tt.divisibility",
    16]]} hints; the runtime adds them for aligned pointers and integers divisible by 16, so prefer
    `compile_launchers`, which derives them as the runtime does.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    return _report(kernel, fn.__name__, arch, num_warps, len([a for a in (attrs or {}).values() if a]))


# ------------------------------------------------------------------------ compiling real launches
def _build_args(args: list) -> list:
    """JSON argument descriptions -> values: {"zeros": shape, "dtype": "float16"} a CPU tensor (values
    do not matter: nothing runs), {"same_as": i} the very object of argument i, anything else itself."""
    import torch

    built = []
    for a in args:
        if isinstance(a, dict) and "zeros" in a:
            built.append(torch.zeros(a["zeros"], dtype=getattr(torch, a.get("dtype", "float32"))))
        elif isinstance(a, dict) and "same_as" in a:
            built.append(built[a["same_as"]])
        else:
            built.append(a)
    return built


def capture_launches(launcher, *args, **kwargs) -> list:
    """Run `launcher(*args, **kwargs)` with every Triton launch recorded instead of run:
    [(JITFunction, args, kwargs), ...] in launch order."""
    from triton.runtime.jit import JITFunction

    calls = []

    def record(self, *a, grid, warmup, **kw):
        calls.append((self, a, kw))

    run = JITFunction.run
    JITFunction.run = record
    try:
        launcher(*args, **kwargs)
    finally:
        JITFunction.run = run
    return calls


def compile_launch(kernel, args: tuple, kwargs: dict, arch: int, _cache: dict | None = None) -> CompileReport:
    """Compile one recorded launch for sm_<arch> exactly as the runtime would specialise it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (kernel.__name__, arch, repr(signature), repr(constexprs), repr(attrs), repr(options))
    if _cache is not None and key in _cache:
        return _cache[key]
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    rep = _report(compiled, kernel.__name__, arch, options.num_warps, len([a for a in attrs.values() if a]))
    if _cache is not None:
        _cache[key] = rep
    return rep


def _run_in_fresh_process(specs: list) -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "dualvar.kernels._aot"], input=json.dumps(specs), env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ahead-of-time compilation failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compile_launchers(specs: list[dict]) -> list[list[CompileReport]]:
    """Compile what launchers launch, in one fresh process; one list of reports per spec.

    Each spec: {"launcher": "dualvar.kernels.contrastive_triton:forward", "args": [...],
    "kwargs": {...}, "arch": 90}; args as `_build_args` reads them. Each spec's list holds one report
    per kernel launch the call makes, in launch order.
    """
    out = _run_in_fresh_process([dict(spec, mode="launcher") for spec in specs])
    return [[CompileReport(**r) for r in reps] for reps in out]


def compile_many(specs: list[dict]) -> list[CompileReport]:
    """Compile hand-written kernel signatures (see compile_for) in one fresh process.

    Each spec: {"module": "dualvar.kernels.contrastive_triton", "kernel": "_contrastive_fwd_kernel",
    "signature": {...}, "constexprs": {...}, "arch": 90, "num_warps": 4, "num_stages": 3, "attrs": ...}.
    """
    return [CompileReport(**r) for r in _run_in_fresh_process([dict(spec, mode="kernel") for spec in specs])]


def _main() -> None:
    specs = json.load(sys.stdin)
    results, cache = [], {}
    for spec in specs:
        if spec["mode"] == "launcher":
            module, name = spec["launcher"].split(":")
            launcher = getattr(importlib.import_module(module), name)
            calls = capture_launches(launcher, *_build_args(spec.get("args", [])), **spec.get("kwargs", {}))
            results.append([dataclasses.asdict(compile_launch(k, a, kw, spec["arch"], cache)) for k, a, kw in calls])
        else:
            fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
            attrs = {tuple(k) if isinstance(k, list) else (k,): v for k, v in spec.get("attrs", [])} or None
            rep = compile_for(fn, spec["signature"], spec["constexprs"], spec["arch"], spec.get("num_warps", 4),
                              spec.get("num_stages", 3), attrs)
            results.append(dataclasses.asdict(rep))
    print(json.dumps(results))


if __name__ == "__main__":
    _main()
