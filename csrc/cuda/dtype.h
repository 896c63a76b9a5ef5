// Element type of the 16/32-bit tensors the CUDA launchers take (their parameter structs carry one).
// No torch headers.
#pragma once

namespace dualvar {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace cuda
}  // namespace dualvar
