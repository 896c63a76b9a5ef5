"""Test set-up. On a machine without a CUDA GPU, Triton kernels run under the interpreter: the flag
must be set before triton decorates any kernel, i.e. before dualvar.kernels is imported."""
import os
import shutil

if not shutil.which("nvidia-smi") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")


def cpu_backends(op_backends=("torch", "cpu", "triton")):
    """Backends that can run on this machine's CPU (triton only under the interpreter)."""
    out = [b for b in op_backends if b != "triton" or os.environ.get("TRITON_INTERPRET") == "1"]
    return out


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
