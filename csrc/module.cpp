// The Python module dualvar.kernels._C and the op library (namespace `dualvar`), nothing else.
// Each op registers its schemas and its CPU and CUDA implementations in its own binding file
// (csrc/permute_frames.cpp, csrc/contrastive.cpp, csrc/shuffle_rank.cpp) with TORCH_LIBRARY_FRAGMENT;
// the kernels they call live in csrc/cpu, csrc/cuda and csrc/common. Autograd is in Python
// (kernels/<op>.py).
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(dualvar, m) {}

namespace {
pybind11::dict build_info() {
  pybind11::dict d;
#ifdef DUALVAR_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["parallel"] = at::get_parallel_info();
  d["compiler"] = __VERSION__;
  return d;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dualvar compiled kernels (ops are registered under torch.ops.dualvar)";
  m.def("build_info", &build_info, "What this extension was built with.");
}
