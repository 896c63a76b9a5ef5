"""The package, the compiled extension, and the CUDA sources compiled standalone. (Each op's Triton
kernels are compiled ahead of time in that op's test file.)"""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dualvar.kernels as K

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# torch's extension build passes these; the standalone compiles use them too so they match the real build
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr", "--use_fast_math"]
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def test_namespace_has_no_top_level_engine_or_kernels(tmp_path):
    # Ask a fresh interpreter started outside the checkout: `python -m pytest` puts the working directory
    # on sys.path, so an in-process lookup would find the source folders, not what pip installed.
    probe = ("import importlib.util, json; "
             "print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) "
             "for n in ('dualvar.engine', 'dualvar.kernels', 'engine', 'kernels')}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout
    origins = json.loads(out)
    assert origins["dualvar.engine"] and origins["dualvar.kernels"], origins
    for name in ("engine", "kernels"):
        assert origins[name] is None or not origins[name].startswith(ROOT), f"top-level {name} is installed: {origins}"


@pytest.mark.gpu  # on a GPU machine: the CUDA kernels must have been built
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
    assert "ops           all" in out, "the extension is stale (see `dualvar info`)"


def test_kernel_sources_include_no_torch_headers():
    paths = [p for d in ("common", "cpu", "cuda") for p in glob.glob(os.path.join(ROOT, "csrc", d, "*"))]
    assert paths
    for path in paths:
        text = open(path).read()
        assert "torch/" not in text and "ATen/" not in text and "c10/" not in text, path


@pytest.mark.skipif(NVCC is None, reason="needs a GPU toolchain (nvcc)")
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))),
                         ids=os.path.basename)
def test_cuda_sources_compile_standalone(source, tmp_path):
    """Plain nvcc, no torch include paths: proves the .cu files are torch-free and valid for sm_90."""
    subprocess.run([NVCC, "-std=c++17", "-O3", "-arch=sm_90", *TORCH_NVCC_FLAGS, "-c", source,
                    "-o", str(tmp_path / "k.o")], check=True, capture_output=True)


@pytest.mark.skipif(NVCC is None, reason="needs a GPU toolchain (nvcc)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_contrastive_uses_tensor_cores_for_16_bit(arch, tmp_path):
    """The fp16 and bf16 similarity tiles are WMMA matrix products with fp32 accumulators."""
    ptx = tmp_path / "c.ptx"
    source = os.path.join(ROOT, "csrc", "cuda", "contrastive.cu")
    subprocess.run([NVCC, "-std=c++17", "-O3", f"-arch={arch}", *TORCH_NVCC_FLAGS, "-ptx", source, "-o", str(ptx)],
                   check=True, capture_output=True)
    text = ptx.read_text()
    assert "wmma.mma.sync.aligned.row.col.m16n16k16.f32.bf16.bf16.f32" in text
    assert "wmma.mma.sync.aligned.row.col.m16n16k16.f32.f32" in text  # the fp16 form (f16 inputs, f32 accumulate)
    # two kernels (forward, backward) per 16-bit dtype, none for fp32
    assert text.count("wmma.mma.sync") == 4
