"""Fused NT-Xent: plain torch (full matrix) vs the torch fallback vs the kernels; forward, backward and
forward+backward rows.

Same inputs for every provider; peak memory of each phase measured in a fresh process beside its time
(bench/contrastive_memory.py). Work counted as the math's nominal FLOPs: forward 2 M^2 D, backward
4 M^2 D (6 M^2 D for both), whatever a kernel skips (the symmetric backward multiplies each tile pair
once). On the CPU, `GFLOPs` stands beside `sgemm_GFLOPs`, this machine's own float32 torch.mm rate
measured in the same run, and `share_of_sgemm` is their ratio: how close the loss runs to the matrix
product's limit. On a GPU also triton, cuda and Inf-CL (cross-view InfoNCE, the form it supports) in
bf16, with the share of the lower bound (bf16 tensor cores at 790 TFLOP/s measured on a lent H200;
exponentials at 3.9 T/s, 2 M^2 of them per pass; docs/benchmarks.md).
"""
import importlib.util

import pytest
import torch

import dualvar.kernels as K
from bench_helpers import (HAS_CUDA, PHASES, measure_peak_mb, median_s, peak_mb_in_fresh_process, run_timed,
                           sgemm_gflops)
from contrastive_memory import embeddings, factory, phase_fns

D = 128
FLOPS = {"forward": 2, "backward": 4, "forward+backward": 6}  # x M^2 D
# Every phase at the headline sizes; 16384 forward+backward for the kernels only (the reference alone takes
# ~7 s and 5 GB there). Short on a 2-core VM: about three minutes in all.
CPU_CASES = ([(M, p, ph) for M in (1024, 4096, 8192) for p in ("reference", "torch", "cpu") for ph in PHASES]
             + [(16384, p, "forward+backward") for p in ("torch", "cpu")])
GPU_PROVIDERS = ["reference", "triton", "cuda"] + (["infcl"] if importlib.util.find_spec("inf_cl") else [])
GPU_CASES = [(M, p, ph) for M in (1024, 8192, 32768, 65536, 131072) for p in GPU_PROVIDERS for ph in PHASES
             if not (p == "reference" and M > 65536) and (ph == "forward+backward" or M == 65536)]


def bench(benchmark, provider, M, phase, device, dtype):
    setup, step = phase_fns(provider, embeddings(M, D, device, dtype), phase)
    rounds = 3 if (device == "cpu" and M >= 8192) else 5
    run_timed(benchmark, step, device, rounds=rounds, setup=setup)
    if provider not in ("reference", "infcl"):
        assert K.last_backend("contrastive") == provider
    t = median_s(benchmark)
    if t is None:
        return
    flops = FLOPS[phase] * M * M * D
    if device == "cpu":  # the process's peak RSS: a fresh process, so that no earlier allocation hides it
        peak = peak_mb_in_fresh_process("contrastive_memory", "factory", provider, M, D, device, dtype, phase)
    else:  # the allocator's own peak counter: exact in this process
        peak = round(measure_peak_mb(*factory(provider, M, D, device, dtype, phase)), 1)
    benchmark.extra_info.update(provider=provider, phase=phase, M=M, D=D, dtype=dtype, GFLOPs=flops / t / 1e9,
                                peak_extra_MB=peak)
    if device == "cpu":
        sgemm = sgemm_gflops("cpu")
        benchmark.extra_info.update(sgemm_GFLOPs=sgemm, share_of_sgemm=flops / t / 1e9 / sgemm)
    else:
        passes = {"forward": 1, "backward": 1, "forward+backward": 2}[phase]
        floor = max(flops / 790e12, passes * M * M / 3.9e12)
        benchmark.extra_info["share_of_lower_bound"] = floor / t


def test_sgemm_cpu(benchmark):
    """The ceiling the loss is read against: this machine's float32 torch.mm, as its own row."""
    n = 2048
    a, b = (torch.randn(n, n, generator=torch.Generator().manual_seed(i)) for i in range(2))
    run_timed(benchmark, lambda: torch.mm(a, b), "cpu", rounds=7)
    t = median_s(benchmark)
    if t is not None:
        benchmark.extra_info.update(provider="torch.mm", M=n, D=n, dtype="float32", GFLOPs=2 * n**3 / t / 1e9)


@pytest.mark.parametrize("M,provider,phase", CPU_CASES)
def test_nt_xent_cpu(benchmark, M, provider, phase):
    bench(benchmark, provider, M, phase, "cpu", "float32")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("M,provider,phase", GPU_CASES)
def test_nt_xent_cuda(benchmark, M, provider, phase):
    bench(benchmark, provider, M, phase, "cuda", "bfloat16")
