"""Frame permutation: the plain torch chain vs the torch fallback vs the compiled kernels.

One (16, 16, 224, 224, 3) uint8 batch -> (16, 3, 16, 224, 224) normalised. Each provider gets the
same inputs; GB/s counts the bytes the op must move at least (uint8 in + output out).
"""
import pytest
import torch

import dualvar.kernels as K
from conftest import HAS_CUDA, run_timed

B, T, H, W, C = 16, 16, 224, 224, 3
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def torch_chain(video, index, out_dtype):
    """What people write: gather, permute, to float, normalise, contiguous."""
    mean = torch.tensor(MEAN, device=video.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(STD, device=video.device).view(1, 3, 1, 1, 1)
    x = video[torch.arange(video.shape[0], device=video.device).view(-1, 1), index]
    x = x.permute(0, 4, 1, 2, 3).float().div(255).sub(mean).div(std)
    return x.to(out_dtype).contiguous()


CASES = [("cpu", "torch_chain"), ("cpu", "torch"), ("cpu", "cpu")]
if HAS_CUDA:
    CASES += [("cuda", "torch_chain"), ("cuda", "torch"), ("cuda", "triton"), ("cuda", "cuda")]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device,provider", CASES)
def test_permute_frames(benchmark, device, provider, out_dtype):
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (B, T, H, W, C), dtype=torch.uint8, generator=g).to(device)
    index = K.segment_shuffle_index(K.identity_index(B, T, device),
                                    K.random_segment_permutation(B, 2, generator=g).to(device))
    hflip = None
    if provider == "torch_chain":
        fn = lambda: torch_chain(video, index, out_dtype)
    else:
        fn = lambda: K.permute_frames(video, index, MEAN, STD, out_dtype=out_dtype, hflip=hflip, backend=provider)
    # Three warm-up calls: on a VM with free-page reporting the first calls after a pause re-fault
    # memory the host took back (bench/results/permute_cpu.md shows the series).
    out = run_timed(benchmark, fn, device, rounds=10 if device == "cuda" else 15, warmup=3)
    if provider != "torch_chain":
        assert K.last_backend("permute_frames") == provider
    assert torch.equal(out, torch_chain(video, index, out_dtype)) or provider == "torch_chain"
    moved = video.numel() + out.numel() * out.element_size()
    benchmark.extra_info.update(provider=provider, device=device, dtype=str(out_dtype),
                                bytes=moved, GBps=moved / benchmark.stats.stats.median / 1e9)
