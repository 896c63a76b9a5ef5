"""Helpers shared by the test files (importable: `from helpers import ...`; conftest.py only sets up)."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Tests that need a GPU also get the `gpu` marker (tests/conftest.py adds it), so `make gpu-check`
# (`pytest -m gpu`) runs every one of them.
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
needs_two_gpus = pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")


def cpu_backends(op_backends=("torch", "cpu", "triton")):
    """Backends that can run on this machine's CPU (triton only under the interpreter)."""
    return [b for b in op_backends if b != "triton" or os.environ.get("TRITON_INTERPRET") == "1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP barrier waits (up to 10x).
    Import it into a test module (`from helpers import one_thread`) to apply it there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# 4 classes x 4 videos of 12 frames at 16x21 -> 12 training videos; batch 4 -> 3 steps per epoch
TINY_SYNTH = dict(synthetic_classes=4, synthetic_videos_per_class=4, synthetic_frames=12, synthetic_height=16,
                  synthetic_width=21)


def tiny_run_config(root: str, name: str = "tiny", **sections) -> dict:
    """A pretraining config (as a dict) of the tiny backbone on a tiny synthetic set at `root`, on the CPU;
    `sections` update its sections key by key (e.g. train=dict(epochs=1))."""
    cfg = {
        "name": name,
        "data": dict(dataset="synthetic", root=root, holdout=0, frames=4, stride=2, crop=16, size=16, long=21,
                     batch_size=4, num_workers=0, **TINY_SYNTH),
        "model": dict(backbone="tiny", framework="simclr", mode="clip-sr-tc"),
        "loss": dict(queue_size=16),
        "optim": dict(name="sgd", lr=0.05, schedule="multistep", milestones=[2]),
        "train": dict(epochs=3, device="cpu", log_every=1, progress=False, tensorboard=False),
        "checkpoint": dict(every_steps=4, keep=2),
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg
