"""Fused NT-Xent forward+backward: plain torch (full matrix) vs the torch fallback vs the kernels.

Same inputs for every provider; peak memory of one step measured in a fresh process beside each
time. On a GPU also triton, cuda and Inf-CL (cross-view InfoNCE, the form it supports) in bf16, with
TFLOP/s counted as 6 M^2 D (forward 2 M^2 D, backward 4 M^2 D) and the share of the lower bound of
PERFORMANCE.md (bf16 tensor cores at 790 TFLOP/s measured; exponentials at 3.9 T/s, 2 M^2 of them).
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dualvar.kernels as K
from conftest import HAS_CUDA, run_timed

HERE = os.path.dirname(os.path.abspath(__file__))
D = 128
CPU_CASES = [(M, p) for M in (1024, 4096, 8192, 16384) for p in ("reference", "torch", "cpu")]
GPU_PROVIDERS = ["reference", "triton", "cuda"] + (["infcl"] if importlib.util.find_spec("inf_cl") else [])
GPU_CASES = [(M, p) for M in (1024, 8192, 32768, 65536, 131072) for p in GPU_PROVIDERS
             if not (p == "reference" and M > 65536)]


def peak_mb(provider, M, device, dtype):
    out = subprocess.run([sys.executable, os.path.join(HERE, "contrastive_memory.py"), provider, str(M), str(D),
                          device, dtype], capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else f"failed: {out.stderr[-200:]}"


def bench(benchmark, provider, M, device, dtype):
    from contrastive_memory import loss_fn
    g = torch.Generator(device=device).manual_seed(M)
    z0 = F.normalize(torch.randn(M, D, device=device, generator=g), dim=1).to(getattr(torch, dtype))
    fn = loss_fn(provider)

    def step():
        z = z0.detach().requires_grad_()
        fn(z).backward()
        return z.grad

    rounds = 5 if (device == "cpu" and M >= 16384) else 7
    run_timed(benchmark, step, device, rounds=rounds)
    if provider not in ("reference", "infcl"):
        assert K.last_backend("contrastive") == provider
    t = benchmark.stats.stats.median
    flops = 6 * M * M * D
    benchmark.extra_info.update(provider=provider, M=M, D=D, dtype=dtype, TFLOPs=flops / t / 1e12,
                                peak_extra_MB=peak_mb(provider, M, device, dtype))
    if device == "cuda":
        floor = max(flops / 790e12, 2 * M * M / 3.9e12)
        benchmark.extra_info["share_of_lower_bound"] = floor / t


sys.path.insert(0, HERE)


@pytest.mark.parametrize("M,provider", CPU_CASES)
def test_nt_xent_cpu(benchmark, M, provider):
    bench(benchmark, provider, M, "cpu", "float32")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("M,provider", GPU_CASES)
def test_nt_xent_cuda(benchmark, M, provider):
    bench(benchmark, provider, M, "cuda", "bfloat16")
