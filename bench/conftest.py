"""Shared bench helpers: device selection and synchronisation inside the timed function."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_timed(benchmark, fn, device, rounds=5, warmup=1):
    """pytest-benchmark pedantic run with a device sync inside the timed function."""
    def timed():
        out = fn()
        sync(device)
        return out
    return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)


def devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
