// Small helpers shared by the torch-facing binding files (csrc/*.cpp).
#pragma once
#include <torch/extension.h>
#ifdef DUALVAR_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace dualvar {

#ifdef DUALVAR_WITH_CUDA
// Launchers in csrc/cuda return cudaError_t as int; turn a failure into a Python RuntimeError.
inline void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}
#endif

}  // namespace dualvar
