// Frame permutation + normalisation: the description of one call, taken alike by the CPU kernel
// (csrc/cpu/permute_frames.h) and the CUDA launcher (csrc/cuda/permute_frames.h). No torch headers.
#pragma once
#include <cstdint>

namespace dualvar {
namespace permute_frames {

// out[b, c, t', h, w] = lut[c][video[b, frame_index[b, t'], h, w', c]] with w' = W - 1 - w where
// hflip[b], else w. All buffers are contiguous; frame_index is already range-checked.
struct Params {
  const uint8_t* video;        // (B, T, H, W, C) uint8
  const int64_t* frame_index;  // (B, T_out) int64
  const uint8_t* hflip;        // (B,) 0/1, or nullptr for no flip
  const void* lut;             // (C, 256) output values, element size elem_bytes
  void* out;                   // (B, C, T_out, H, W), element size elem_bytes
  int64_t B, T, T_out, H, W, C;
  int elem_bytes;              // 2 (float16, bfloat16) or 4 (float32)
};

}  // namespace permute_frames
}  // namespace dualvar
