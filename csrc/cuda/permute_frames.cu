// Frame permutation on the GPU: one thread per output pixel (all C channels), grid-stride loop.
// Reads C bytes per pixel (coalesced across a warp), writes one element to each of the C planes
// (coalesced per plane); the normalisation is a C x 256 lookup table that stays in L1. Offsets are
// int64 throughout. Every buffer is contiguous (the binding, csrc/permute_frames.cpp, makes it so).
#include <cuda_runtime.h>

#include "permute_frames.h"

namespace dualvar {
namespace cuda {
namespace {

template <typename T, int C_STATIC>
__global__ void permute_frames_kernel(permute_frames::Params p, int64_t n_pixels) {
  const uint8_t* __restrict__ video = p.video;
  const int64_t* __restrict__ frame_index = p.frame_index;
  const uint8_t* __restrict__ hflip = p.hflip;
  const T* __restrict__ lut = static_cast<const T*>(p.lut);
  T* __restrict__ out = static_cast<T*>(p.out);
  const int64_t C = C_STATIC > 0 ? C_STATIC : p.C;
  const int64_t T_in = p.T, T_out = p.T_out, H = p.H, W = p.W;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_pixels; i += stride) {
    const int64_t w = i % W;
    const int64_t row = i / W;
    const int64_t h = row % H;
    const int64_t bt = row / H;
    const int64_t t = bt % T_out;
    const int64_t b = bt / T_out;
    const int64_t src_t = __ldg(frame_index + b * T_out + t);
    const int64_t src_w = (hflip != nullptr && __ldg(hflip + b)) ? (W - 1 - w) : w;
    const uint8_t* src = video + (((b * T_in + src_t) * H + h) * W + src_w) * C;
    const int64_t plane = T_out * H * W;
    T* dst = out + b * C * plane + (t * H + h) * W + w;
#pragma unroll
    for (int64_t c = 0; c < C; ++c) dst[c * plane] = __ldg(lut + c * 256 + src[c]);
  }
}

template <typename T>
cudaError_t launch(const permute_frames::Params& p, cudaStream_t stream) {
  const int64_t n_pixels = p.B * p.T_out * p.H * p.W;
  if (n_pixels == 0) return cudaSuccess;
  const int threads = 256;
  int64_t blocks = (n_pixels + threads - 1) / threads;
  if (blocks > 65535LL * 16) blocks = 65535LL * 16;  // grid-stride loop covers the rest
  const unsigned grid = (unsigned)blocks;
  if (p.C == 3)
    permute_frames_kernel<T, 3><<<grid, threads, 0, stream>>>(p, n_pixels);
  else if (p.C == 1)
    permute_frames_kernel<T, 1><<<grid, threads, 0, stream>>>(p, n_pixels);
  else
    permute_frames_kernel<T, 0><<<grid, threads, 0, stream>>>(p, n_pixels);
  return cudaGetLastError();
}

}  // namespace

int permute_frames(const permute_frames::Params& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return (int)(p.elem_bytes == 4 ? launch<uint32_t>(p, s) : launch<uint16_t>(p, s));
}

}  // namespace cuda
}  // namespace dualvar
