"""Frame permutation: the plain torch chain vs the torch fallback vs the compiled kernels.

One (16, 16, 224, 224, 3) uint8 batch -> (16, 3, 16, 224, 224) normalised. Each provider gets the
same inputs; GB/s counts the bytes the op must move at least (uint8 in + output out); peak memory of
one call is measured in a fresh process beside each time (output included: it is what the call
allocates). The op has no gradient, so its rows are forward only (phase = forward).
"""
import pytest
import torch

import dualvar.kernels as K
from bench_helpers import HAS_CUDA, measure_peak_mb, median_s, peak_mb_in_fresh_process, run_timed

B, T, H, W, C = 16, 16, 224, 224, 3
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def torch_chain(video, index, out_dtype):
    """What people write: gather, permute, to float, normalise, contiguous."""
    mean = torch.tensor(MEAN, device=video.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(STD, device=video.device).view(1, 3, 1, 1, 1)
    x = video[torch.arange(video.shape[0], device=video.device).view(-1, 1), index]
    x = x.permute(0, 4, 1, 2, 3).float().div(255).sub(mean).div(std)
    return x.to(out_dtype).contiguous()


def inputs(device):
    """The same batch for every provider: a segment shuffle of each clip (no flip, which the chain lacks)."""
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (B, T, H, W, C), dtype=torch.uint8, generator=g).to(device)
    index = K.segment_shuffle_index(K.identity_index(B, T, device),
                                    K.random_segment_permutation(B, 2, generator=g).to(device))
    return video, index


def call(provider, video, index, out_dtype):
    if provider == "torch_chain":
        return lambda: torch_chain(video, index, out_dtype)
    return lambda: K.permute_frames(video, index, MEAN, STD, out_dtype=out_dtype, backend=provider)


def memory_factory(provider, device, dtype_name):
    """For bench_helpers.measure_peak_mb: (setup, step, device, warmup) of one call."""
    video, index = inputs(device)
    warm = call(provider, video[:1, :2, :8, :8].contiguous(), index[:1, :2] % 2, DTYPES[dtype_name])
    return (lambda: ()), call(provider, video, index, DTYPES[dtype_name]), device, warm


CASES = [("cpu", "torch_chain"), ("cpu", "torch"), ("cpu", "cpu")]
if HAS_CUDA:
    CASES += [("cuda", "torch_chain"), ("cuda", "torch"), ("cuda", "triton"), ("cuda", "cuda")]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("device,provider", CASES)
def test_permute_frames(benchmark, device, provider, dtype_name):
    out_dtype = DTYPES[dtype_name]
    video, index = inputs(device)
    fn = call(provider, video, index, out_dtype)
    # Three warm-up calls: on a VM with free-page reporting the first calls after a pause re-fault
    # memory the host took back (bench/results/permute_cpu.md shows the series).
    out = run_timed(benchmark, fn, device, rounds=10 if device == "cuda" else 15, warmup=3)
    if provider != "torch_chain":
        assert K.last_backend("permute_frames") == provider
        assert torch.equal(out, K.permute_frames_reference(video, index, MEAN, STD, out_dtype=out_dtype))
    t = median_s(benchmark)
    if t is None:
        return
    moved = video.numel() + out.numel() * out.element_size()
    benchmark.extra_info.update(provider=provider, device=device, dtype=str(out_dtype), phase="forward",
                                bytes=moved, GBps=moved / t / 1e9,
                                peak_extra_MB=peak_mb(provider, device, dtype_name))


def peak_mb(provider, device, dtype_name):
    """CPU: the peak RSS of a fresh process (no earlier allocation hides it); CUDA: the allocator's peak."""
    if device == "cpu":
        return peak_mb_in_fresh_process("test_bench_permute_frames", "memory_factory", provider, device, dtype_name)
    return round(measure_peak_mb(*memory_factory(provider, device, dtype_name)), 1)
