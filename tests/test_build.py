"""The package, the compiled extension and the ahead-of-time compilation of the GPU kernels."""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dualvar.kernels as K
from dualvar.kernels import _aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def test_namespace_has_no_top_level_engine_or_kernels():
    assert importlib.util.find_spec("dualvar.engine") and importlib.util.find_spec("dualvar.kernels")
    for name in ("engine", "kernels"):
        spec = importlib.util.find_spec(name)
        assert spec is None or not (spec.origin or "").startswith(ROOT), f"top-level {name} is installed from the repo"


def test_extension_is_built_with_expected_parts():
    info = K.build_info()
    assert info["built"], info.get("reason")
    assert info["openmp"]
    if torch.version.cuda and NVCC:
        assert info["cuda"], "a CUDA build of torch and nvcc are present, so the CUDA kernels must be built"


def test_cli_info_runs():
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "dualvar"), "info"],
                         capture_output=True, text=True, check=True).stdout
    assert "extension     built" in out and "torch" in out and "cpu   cpu     available" in out


def test_kernel_sources_include_no_torch_headers():
    for path in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*")):
        text = open(path).read()
        assert "torch/" not in text and "ATen/" not in text and "c10/" not in text, path


@pytest.mark.skipif(NVCC is None, reason="needs a GPU toolchain (nvcc)")
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))),
                         ids=os.path.basename)
def test_cuda_sources_compile_standalone(source, tmp_path):
    """Plain nvcc, no torch include paths: proves the .cu files are torch-free and valid for sm_90."""
    subprocess.run([NVCC, "-std=c++17", "-O3", "-arch=sm_90", "-c", source, "-o", str(tmp_path / "k.o")],
                   check=True, capture_output=True)


PERMUTE_SIG = {"video_ptr": "*u8", "index_ptr": "*i64", "flip_ptr": "*u8", "lut_ptr": "*fp32", "out_ptr": "*fp32",
               "T_out": "i32", "H": "i32", "W": "i32", "s_vb": "i64", "s_vt": "i64", "s_vh": "i64", "s_vw": "i64"}


PERMUTE_CASES = [(arch, dtype, C, flip) for arch in (80, 90) for dtype in ("fp32", "bf16", "fp16")
                 for C, flip in ((3, True), (3, False), (1, True))]


@pytest.fixture(scope="module")
def permute_reports():
    specs = [{"module": "dualvar.kernels.permute", "kernel": "_permute_frames_kernel",
              "signature": dict(PERMUTE_SIG, lut_ptr=f"*{dtype}", out_ptr=f"*{dtype}"),
              "constexprs": {"C": C, "HAS_FLIP": flip, "BLOCK_W": 256}, "arch": arch}
             for arch, dtype, C, flip in PERMUTE_CASES]
    return dict(zip(PERMUTE_CASES, _aot.compile_many(specs)))


@pytest.mark.parametrize("arch,dtype,C,flip", PERMUTE_CASES)
def test_permute_triton_compiles_for_gpu(permute_reports, arch, dtype, C, flip):
    rep = permute_reports[(arch, dtype, C, flip)]
    assert rep.within_limits(), rep
    assert rep.spill_stores == 0 and rep.spill_loads == 0, rep
