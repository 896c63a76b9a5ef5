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
