// Frame permutation, CUDA launcher (declaration): device pointers and a stream, no torch headers;
// bound to torch.ops.dualvar.permute_frames in csrc/permute_frames.cpp. Returns the launch's
// cudaError_t as int.
#pragma once

#include "../common/permute_frames.h"

namespace dualvar {
namespace cuda {

// p: see csrc/common/permute_frames.h; every pointer is a device pointer.
int permute_frames(const permute_frames::Params& p, void* stream);

}  // namespace cuda
}  // namespace dualvar
