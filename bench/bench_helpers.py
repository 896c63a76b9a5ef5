"""Helpers shared by the benchmark files: device selection, synchronisation inside the timed function,
peak memory of one step measured in a fresh process, and the machine's own sgemm rate."""
import functools
import os
import resource
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
PHASES = ("forward", "backward", "forward+backward")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_timed(benchmark, fn, device, rounds=5, warmup=1, setup=None):
    """pytest-benchmark pedantic run with a device sync inside the timed function. setup (untimed, before
    each round) returns the argument tuple of fn, e.g. a fresh forward pass whose backward is timed."""
    def timed(*args):
        out = fn(*args)
        sync(device)
        return out

    if setup is None:
        return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)

    def setup_round():
        args = setup()
        sync(device)
        return args, {}
    return benchmark.pedantic(timed, setup=setup_round, rounds=rounds, warmup_rounds=warmup, iterations=1)


def median_s(benchmark):
    """The median round time in seconds, or None under --benchmark-disable (one plain run, no statistics:
    `pytest tests bench --benchmark-disable` smoke-runs every benchmark)."""
    return None if benchmark.disabled else benchmark.stats.stats.median


def devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


# ------------------------------------------------------------------------------------ peak memory
def _status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def peak_rss_mb():
    """This process's peak resident set (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        return _status_mb("VmHWM")
    except (OSError, StopIteration):  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0); returns the baseline, or None where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except (OSError, StopIteration):
        return None


def measure_peak_mb(setup, step, device, warmup=None):
    """Peak memory (MB) that step(*setup()) adds beyond what exists when it starts: inputs, and for a
    backward the forward's saved tensors, are not counted. CPU: the peak resident set reset just before
    the step (VmHWM - VmRSS), else its growth; CUDA: torch.cuda.max_memory_allocated beyond the start."""
    if warmup is not None:  # loads the extension, BLAS and thread pools before the baseline
        warmup()
    state = setup()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(*state)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _reset_peak_rss()
    if base is None:
        base = peak_rss_mb()
    step(*state)
    return peak_rss_mb() - base


def peak_mb_in_fresh_process(module, factory, *args, env=None):
    """measure_peak_mb(*module.factory(*args)) in a fresh interpreter (no earlier allocation in play).
    factory returns (setup, step, device, warmup). Returns MB, or "failed: ..." (e.g. out of memory)."""
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import importlib, bench_helpers; "
            f"f = getattr(importlib.import_module({module!r}), {factory!r}); "
            f"print(bench_helpers.measure_peak_mb(*f(*{args!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        return f"failed: {out.stderr.strip().splitlines()[-1][-200:] if out.stderr.strip() else out.returncode}"
    return round(float(out.stdout.strip().splitlines()[-1]), 1)


# ---------------------------------------------------------------------------------- machine rates
@functools.lru_cache(maxsize=None)
def sgemm_gflops(device="cpu", n=2048, rounds=5):
    """The machine's own float32 matrix-product rate (torch.mm, n x n x n), median of `rounds`, GFLOP/s."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
    torch.mm(a, b)
    sync(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[rounds // 2] / 1e9
