// Launchers of dualvar's CUDA kernels: raw pointers and a stream, no torch headers, so this
// header and the .cu files compile with plain nvcc. Each returns the launch's cudaError_t as int.
#pragma once
#include <cstdint>

namespace dualvar {
namespace cuda {

// See csrc/cpu/cpu_kernels.h for the meaning of the arguments; all pointers are device pointers.
int permute_frames(const uint8_t* video, const int64_t* frame_index, const uint8_t* hflip,
                   const void* lut, void* out, int64_t B, int64_t T, int64_t T_out, int64_t H,
                   int64_t W, int64_t C, int elem_bytes, void* stream);

}  // namespace cuda
}  // namespace dualvar
