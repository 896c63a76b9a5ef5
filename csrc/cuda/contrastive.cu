// Fused contrastive primitive on CUDA: tiled in shared memory, fp32 accumulation, the similarity
// tile recomputed in backward from the saved lse, never a rows x columns buffer in global memory.
// Tiles are 32 rows x 32 columns, 256 threads; each thread computes 4 similarities. Products run
// on CUDA cores in fp32 (inputs of any dtype are widened when staged in shared memory).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>

#include "contrastive.h"

namespace dualvar {
namespace cuda {
namespace {

constexpr int kTile = 32;      // rows and columns per tile; also the D chunk staged per step
constexpr int kThreads = 256;  // 8 warps
constexpr int kOutChunk = 128; // output dims per backward block (grid.y covers the rest)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// S[r][c] = x[row0 + r] . y[col0 + c] for the 32 x 32 tile; thread t computes row t/8, columns
// (t%8)*4 .. +3. Rows/columns past the end read zeros.
template <typename T>
__device__ void similarity_tile(const T* __restrict__ x, const T* __restrict__ y, int64_t row0, int64_t col0,
                                int64_t R, int64_t C, int64_t D, int64_t sx, int64_t sy, float (*xs)[kTile + 1],
                                float (*ys)[kTile + 1], float acc[4]) {
  const int t = threadIdx.x;
  const int r = t / 8, c = (t % 8) * 4;
  acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
  for (int64_t d0 = 0; d0 < D; d0 += kTile) {
    for (int i = t; i < kTile * kTile; i += kThreads) {
      const int rr = i / kTile, dd = i % kTile;
      const int64_t d = d0 + dd;
      xs[rr][dd] = (row0 + rr < R && d < D) ? to_float(x[(row0 + rr) * sx + d]) : 0.f;
      ys[rr][dd] = (col0 + rr < C && d < D) ? to_float(y[(col0 + rr) * sy + d]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int dd = 0; dd < kTile; ++dd) {
      const float a = xs[r][dd];
      acc[0] += a * ys[c][dd];
      acc[1] += a * ys[c + 1][dd];
      acc[2] += a * ys[c + 2][dd];
      acc[3] += a * ys[c + 3][dd];
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lse_forward_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                               float* __restrict__ lse, int64_t R, int64_t C,
                                                               int64_t D, int64_t sq, int64_t sk, float scale,
                                                               bool has_offset, int64_t offset) {
  __shared__ float xs[kTile][kTile + 1], ys[kTile][kTile + 1], S[kTile][kTile + 1];
  const int64_t row0 = (int64_t)blockIdx.x * kTile;
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  float m[4], l[4];  // rows warp*4 + i, replicated across the warp's lanes
  for (int i = 0; i < 4; ++i) m[i] = -INFINITY, l[i] = 0.f;
  for (int64_t col0 = 0; col0 < C; col0 += kTile) {
    float acc[4];
    similarity_tile(q, k, row0, col0, R, C, D, sq, sk, xs, ys, acc);
    const int r = t / 8, c = (t % 8) * 4;
    for (int j = 0; j < 4; ++j) {
      const int64_t col = col0 + c + j;
      const bool valid = col < C && !(has_offset && col == row0 + r + offset);
      S[r][c + j] = valid ? acc[j] * scale : -INFINITY;
    }
    __syncthreads();
    for (int i = 0; i < 4; ++i) {
      const float v = S[warp * 4 + i][lane];
      const float m_new = fmaxf(m[i], warp_max(v));
      if (m_new == -INFINITY) continue;
      const float e = v == -INFINITY ? 0.f : __expf(v - m_new);
      l[i] = l[i] * __expf(m[i] - m_new) + warp_sum(e);
      m[i] = m_new;
    }
    __syncthreads();
  }
  if (lane == 0)
    for (int i = 0; i < 4; ++i) {
      const int64_t row = row0 + warp * 4 + i;
      if (row < R) lse[row] = m[i] + logf(l[i]);
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lse_backward_kernel(const T* __restrict__ x, const T* __restrict__ y,
                                                                const float* __restrict__ lse_r,
                                                                const float* __restrict__ g_r,
                                                                const float* __restrict__ lse_c,
                                                                const float* __restrict__ g_c, float* __restrict__ out,
                                                                int64_t R, int64_t C, int64_t D, int64_t sx,
                                                                int64_t sy, float scale, bool has_offset,
                                                                int64_t offset) {
  __shared__ float xs[kTile][kTile + 1], ys[kTile][kTile + 1], H[kTile][kTile + 1];
  __shared__ float yo[kTile][kOutChunk];
  const int64_t row0 = (int64_t)blockIdx.x * kTile;
  const int64_t dout0 = (int64_t)blockIdx.y * kOutChunk;
  const int t = threadIdx.x;
  const int r = t / 8, c = (t % 8) * 4;      // similarity entries of this thread
  const int orow = t / 8, od = (t % 8) * 16;  // output entries: row orow, dims od .. od+15 of the chunk
  float out_acc[16];
  for (int i = 0; i < 16; ++i) out_acc[i] = 0.f;
  const int64_t row = row0 + r;
  const float lr = (lse_r && row < R) ? lse_r[row] : 0.f;
  const float gr = (g_r && row < R) ? g_r[row] * scale : 0.f;
  for (int64_t col0 = 0; col0 < C; col0 += kTile) {
    float acc[4];
    similarity_tile(x, y, row0, col0, R, C, D, sx, sy, xs, ys, acc);
    for (int j = 0; j < 4; ++j) {
      const int64_t col = col0 + c + j;
      const bool valid = row < R && col < C && !(has_offset && col == row + offset);
      float h = 0.f;
      if (valid) {
        const float s = acc[j] * scale;
        if (lse_r) h += gr * __expf(s - lr);
        if (lse_c) h += g_c[col] * scale * __expf(s - lse_c[col]);
      }
      H[r][c + j] = h;
    }
    for (int i = t; i < kTile * kOutChunk; i += kThreads) {
      const int cc = i / kOutChunk, dd = i % kOutChunk;
      const int64_t d = dout0 + dd;
      yo[cc][dd] = (col0 + cc < C && d < D) ? to_float(y[(col0 + cc) * sy + d]) : 0.f;
    }
    __syncthreads();
    for (int cc = 0; cc < kTile; ++cc) {
      const float h = H[orow][cc];
#pragma unroll
      for (int i = 0; i < 16; ++i) out_acc[i] += h * yo[cc][od + i];
    }
    __syncthreads();
  }
  const int64_t orow_g = row0 + orow;
  if (orow_g < R)
    for (int i = 0; i < 16; ++i) {
      const int64_t d = dout0 + od + i;
      if (d < D) out[orow_g * D + d] = out_acc[i];
    }
}

template <typename T>
cudaError_t forward_t(const void* q, const void* k, float* lse, int64_t R, int64_t C, int64_t D, int64_t sq,
                      int64_t sk, float scale, bool has_offset, int64_t offset, cudaStream_t s) {
  if (R == 0) return cudaSuccess;
  dim3 grid((unsigned)((R + kTile - 1) / kTile));
  lse_forward_kernel<T><<<grid, kThreads, 0, s>>>(static_cast<const T*>(q), static_cast<const T*>(k), lse, R, C,
                                                  D, sq, sk, scale, has_offset, offset);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const void* x, const void* y, const float* lse_r, const float* g_r, const float* lse_c,
                       const float* g_c, float* out, int64_t R, int64_t C, int64_t D, int64_t sx, int64_t sy,
                       float scale, bool has_offset, int64_t offset, cudaStream_t s) {
  if (R == 0) return cudaSuccess;
  dim3 grid((unsigned)((R + kTile - 1) / kTile), (unsigned)((D + kOutChunk - 1) / kOutChunk));
  lse_backward_kernel<T><<<grid, kThreads, 0, s>>>(static_cast<const T*>(x), static_cast<const T*>(y), lse_r, g_r,
                                                   lse_c, g_c, out, R, C, D, sx, sy, scale, has_offset, offset);
  return cudaGetLastError();
}

}  // namespace

int lse_forward(const void* q, const void* k, float* lse, int64_t R, int64_t C, int64_t D, int64_t stride_q,
                int64_t stride_k, int dtype, float scale, bool has_offset, int64_t offset, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return (int)forward_t<float>(q, k, lse, R, C, D, stride_q, stride_k, scale, has_offset, offset, s);
    case 1: return (int)forward_t<__half>(q, k, lse, R, C, D, stride_q, stride_k, scale, has_offset, offset, s);
    case 2:
      return (int)forward_t<__nv_bfloat16>(q, k, lse, R, C, D, stride_q, stride_k, scale, has_offset, offset, s);
  }
  return (int)cudaErrorInvalidValue;
}

int lse_backward(const void* x, const void* y, const float* lse_r, const float* g_r, const float* lse_c,
                 const float* g_c, float* out, int64_t R, int64_t C, int64_t D, int64_t stride_x, int64_t stride_y,
                 int dtype, float scale, bool has_offset, int64_t offset, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0:
      return (int)backward_t<float>(x, y, lse_r, g_r, lse_c, g_c, out, R, C, D, stride_x, stride_y, scale,
                                    has_offset, offset, s);
    case 1:
      return (int)backward_t<__half>(x, y, lse_r, g_r, lse_c, g_c, out, R, C, D, stride_x, stride_y, scale,
                                     has_offset, offset, s);
    case 2:
      return (int)backward_t<__nv_bfloat16>(x, y, lse_r, g_r, lse_c, g_c, out, R, C, D, stride_x, stride_y, scale,
                                            has_offset, offset, s);
  }
  return (int)cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dualvar
