// check_launch: turns the cudaError_t (as int) returned by a launcher in csrc/cuda into a Python
// RuntimeError naming the op. Used by the binding files (csrc/<op>.cpp) in CUDA builds.
#pragma once
#ifdef DUALVAR_WITH_CUDA
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace dualvar {

inline void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace dualvar
#endif
