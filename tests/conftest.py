"""Test set-up. On a machine without a CUDA GPU, Triton kernels run under the interpreter: the flag
must be set before triton decorates any kernel, i.e. before dualvar.kernels is imported.
Shared helpers live in tests/helpers.py (importable), not here."""
import os
import shutil

if not shutil.which("nvidia-smi") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import needs_gpu, needs_two_gpus  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before `-m gpu` deselects
def pytest_collection_modifyitems(config, items):
    """Every test that needs a GPU is marked `gpu`, so `pytest -m gpu` (make gpu-check) runs it."""
    gpu_marks = (needs_gpu.mark, needs_two_gpus.mark)
    for item in items:
        if item.get_closest_marker("gpu") is None and any(m in gpu_marks for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
