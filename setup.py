"""Build and install dualvar.

Build switches (environment variables):
  DUALVAR_SKIP_EXT=1      pure-Python install; every op runs through the torch fallback.
  DUALVAR_FORCE_CUDA=1    build the CUDA sources even if torch or the toolkit looks CPU-only.
  DUALVAR_SKIP_CUDA=1     build only the C++ CPU kernels.
  MAX_JOBS=N              parallel compile jobs (torch's ninja builder honours it).
  TORCH_CUDA_ARCH_LIST    CUDA architectures; default "8.0;9.0" (A100, H100/H200).

With your own torch:  pip install --no-build-isolation -e .
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _write_build_config(summary, with_cuda):
    """Record what was built, for `dualvar info` (kernels/_build_config.py, not tracked by git)."""
    import torch

    config = {
        "summary": summary,
        "cuda": with_cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "torch_at_build": torch.__version__,
        "max_jobs": os.environ.get("MAX_JOBS"),
    }
    with open(os.path.join(ROOT, "kernels", "_build_config.py"), "w") as f:
        f.write(f"# written by setup.py\nBUILD = {config!r}\n")


def _ext_modules():
    if _flag("DUALVAR_SKIP_EXT"):
        print("dualvar: DUALVAR_SKIP_EXT=1, building no extension (torch fallback only)")
        return [], {}
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch guesses CUDA_HOME from `which nvcc`, which can be a symlink outside the toolkit.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils import cpp_extension

    # csrc/<op>.cpp + csrc/module.cpp (torch-facing), csrc/cpu and csrc/common (plain C++), csrc/cuda (.cu)
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/common/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    cuda_home = cpp_extension.CUDA_HOME
    want_cuda = not _flag("DUALVAR_SKIP_CUDA") and (
        _flag("DUALVAR_FORCE_CUDA") or (torch.version.cuda is not None and cuda_home is not None)
    )
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-std=c++20", *omp]  # torch >= 2.13 headers need C++20
    macros = []
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        macros.append(("DUALVAR_WITH_CUDA", None))
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            "dualvar.kernels._C",
            cpu_sources + cuda_sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx + ["-DDUALVAR_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=omp,
        )
        built = (f"C++ CPU kernels + CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
                 f"(CUDA_HOME={cuda_home})")
    else:
        ext = cpp_extension.CppExtension(
            "dualvar.kernels._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=omp,
        )
        why = "DUALVAR_SKIP_CUDA=1" if _flag("DUALVAR_SKIP_CUDA") else (
            "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit found (set CUDA_HOME)")
        built = f"C++ CPU kernels only ({why})"
    print(f"dualvar: building {built}")
    _write_build_config(built, want_cuda)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def _packages():
    """dualvar.engine.* <- engine/, dualvar.kernels.* <- kernels/ (every folder with an __init__.py)."""
    found = []
    for top in ("engine", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files:
                rel = os.path.relpath(dirpath, ROOT).split(os.sep)
                found.append(".".join(["dualvar"] + rel))
    return sorted(found)


ext_modules, cmdclass = _ext_modules()

setup(
    name="dualvar",
    version="0.1.0",
    description="DualVar self-supervised video representation learning with fused contrastive kernels",
    python_requires=">=3.10",
    # `dualvar` is a namespace package: no top-level `engine` or `kernels` module is ever installed.
    package_dir={"dualvar.engine": "engine", "dualvar.kernels": "kernels"},
    packages=_packages(),
    package_data={"dualvar.engine": ["configs/*.yaml", "configs/*/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "torchvision", "numpy", "pyyaml", "tqdm", "safetensors", "tensorboard",
                      "matplotlib"],
    extras_require={
        "video": ["decord", "av"],
        "dev": ["pytest", "pytest-benchmark", "numpy", "decord", "av", "ninja"],
    },
    entry_points={"console_scripts": ["dualvar = dualvar.engine.cli:main"]},
    zip_safe=False,
)
