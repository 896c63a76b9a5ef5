// Fused contrastive primitive on CUDA: tiled in shared memory, fp32 accumulation, the similarity
// tile recomputed in backward from the saved lse, never a rows x columns buffer in global memory.
// Tiles are 32 rows x 32 columns, 256 threads. Similarities of fp16/bf16 inputs run on tensor cores
// (WMMA, fp32 accumulation, sm_80+); fp32 inputs on CUDA cores in fp32. The backward's H @ y product
// stays on CUDA cores in fp32 so that the softmax weights are not rounded to 16 bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cfloat>
#include <cmath>
#include <type_traits>

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
// torch builds with __CUDA_NO_HALF_CONVERSIONS__: no implicit float -> half/bf16 constructors.
template <typename T>
__device__ __forceinline__ T zero_of();
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16(0.f); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Tensor cores (WMMA 16x16x16, fp32 accumulators) for fp16/bf16 inputs on sm_80 and newer; fp32
// inputs, and older chips, use the CUDA-core tile below. Only device code looks at this.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define DUALVAR_WMMA 1
#else
#define DUALVAR_WMMA 0
#endif

template <typename T>
struct UseTensorCores {
  static constexpr bool value = DUALVAR_WMMA && !std::is_same<T, float>::value;
};

// Shared-memory staging for one similarity tile and the code that fills and multiplies it.
// compute() leaves acc[j] = x[row0 + r] . y[col0 + c + j] for r = t/8, c = (t%8)*4 (thread t);
// rows/columns past the end read zeros. Every thread must call it (it synchronises the block).
template <typename T, bool TC = UseTensorCores<T>::value>
struct SimilarityTile;

// CUDA cores: inputs widened to fp32 when staged; each thread computes 4 dot products.
template <typename T>
struct SimilarityTile<T, false> {
  float xs[kTile][kTile + 1], ys[kTile][kTile + 1];

  __device__ void compute(const T* __restrict__ x, const T* __restrict__ y, int64_t row0, int64_t col0, int64_t R,
                          int64_t C, int64_t D, int64_t sx, int64_t sy, float acc[4]) {
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
};

#if DUALVAR_WMMA
// Tensor cores: the 32 x 32 tile is four 16 x 16 fragments; each D chunk of 32 is two k-steps of 16.
// Warp w owns fragment w % 4 and k-step w / 4, so all 8 warps issue an MMA per chunk; the two k-step
// partial sums meet in shared memory. Leading dimensions are multiples of 8 (16-bit) and 4 (fp32)
// elements and every fragment pointer is 32-byte aligned, as WMMA requires.
template <typename T>
struct SimilarityTile<T, true> {
  static constexpr int kLd = kTile + 8;   // 16-bit staging row, 80 bytes
  static constexpr int kLdAcc = kTile + 4;  // fp32 partial-sum row, 144 bytes
  alignas(32) T xs[kTile][kLd];
  alignas(32) T ys[kTile][kLd];
  alignas(32) float part[2][kTile][kLdAcc];

  __device__ void compute(const T* __restrict__ x, const T* __restrict__ y, int64_t row0, int64_t col0, int64_t R,
                          int64_t C, int64_t D, int64_t sx, int64_t sy, float acc[4]) {
    namespace wmma = nvcuda::wmma;
    const int t = threadIdx.x, warp = t / 32;
    const int fr = (warp & 3) >> 1, fc = warp & 1, ks = warp >> 2;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> s;
    wmma::fill_fragment(s, 0.f);
    const T zero = zero_of<T>();
    for (int64_t d0 = 0; d0 < D; d0 += kTile) {
      for (int i = t; i < kTile * kTile; i += kThreads) {
        const int rr = i / kTile, dd = i % kTile;
        const int64_t d = d0 + dd;
        xs[rr][dd] = (row0 + rr < R && d < D) ? x[(row0 + rr) * sx + d] : zero;
        ys[rr][dd] = (col0 + rr < C && d < D) ? y[(col0 + rr) * sy + d] : zero;
      }
      __syncthreads();
      // A = x rows (row-major, 16 x 16 at rows fr*16, dims ks*16); B[k][n] = y[col n][dim k], i.e. the
      // staged y rows read column-major.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
      wmma::load_matrix_sync(a, &xs[fr * 16][ks * 16], kLd);
      wmma::load_matrix_sync(b, &ys[fc * 16][ks * 16], kLd);
      wmma::mma_sync(s, a, b, s);
      __syncthreads();
    }
    wmma::store_matrix_sync(&part[ks][fr * 16][fc * 16], s, kLdAcc, wmma::mem_row_major);
    __syncthreads();
    const int r = t / 8, c = (t % 8) * 4;
    for (int j = 0; j < 4; ++j) acc[j] = part[0][r][c + j] + part[1][r][c + j];
    // The next compute() writes part only after its first barrier, which every thread reaches
    // after these reads, so no trailing barrier is needed.
  }
};
#endif

template <typename T>
__global__ void __launch_bounds__(kThreads) contrastive_fwd_kernel(ContrastiveFwdParams p) {
  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ k = static_cast<const T*>(p.k);
  float* __restrict__ lse = p.lse;
  const int64_t R = p.R, C = p.C, D = p.D, sq = p.stride_q, sk = p.stride_k, offset = p.offset;
  const float scale = p.scale;
  const bool has_offset = p.has_offset;
  __shared__ SimilarityTile<T> tile;
  __shared__ float S[kTile][kTile + 1];
  const int64_t row0 = (int64_t)blockIdx.x * kTile;
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  float m[4], l[4];  // rows warp*4 + i, replicated across the warp's lanes
  for (int i = 0; i < 4; ++i) m[i] = -INFINITY, l[i] = 0.f;
  for (int64_t col0 = 0; col0 < C; col0 += kTile) {
    float acc[4];
    tile.compute(q, k, row0, col0, R, C, D, sq, sk, acc);
    const int r = t / 8, c = (t % 8) * 4;
    for (int j = 0; j < 4; ++j) {
      const int64_t col = col0 + c + j;
      const bool valid = col < C && !(has_offset && col == row0 + r + offset);
      S[r][c + j] = valid ? acc[j] * scale : -INFINITY;
    }
    __syncthreads();
    for (int i = 0; i < 4; ++i) {
      const float v = S[warp * 4 + i][lane];
      // fmaxf drops NaN: make a NaN similarity stick to the row (all values here are warp-uniform)
      if (__any_sync(0xffffffffu, v != v)) m[i] = l[i] = NAN;
      if (m[i] != m[i]) continue;
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
__global__ void __launch_bounds__(kThreads) contrastive_bwd_kernel(ContrastiveBwdParams p) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ y = static_cast<const T*>(p.y);
  const float* __restrict__ lse_r = p.lse_r;
  const float* __restrict__ g_r = p.g_r;
  const float* __restrict__ lse_c = p.lse_c;
  const float* __restrict__ g_c = p.g_c;
  float* __restrict__ out = p.out;
  const int64_t R = p.R, C = p.C, D = p.D, sx = p.stride_x, sy = p.stride_y, offset = p.offset;
  const float scale = p.scale;
  const bool has_offset = p.has_offset;
  __shared__ SimilarityTile<T> tile;
  __shared__ float H[kTile][kTile + 1];
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
    tile.compute(x, y, row0, col0, R, C, D, sx, sy, acc);
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
cudaError_t forward_t(const ContrastiveFwdParams& p, cudaStream_t s) {
  if (p.R == 0) return cudaSuccess;
  dim3 grid((unsigned)((p.R + kTile - 1) / kTile));
  contrastive_fwd_kernel<T><<<grid, kThreads, 0, s>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const ContrastiveBwdParams& p, cudaStream_t s) {
  if (p.R == 0 || p.D == 0) return cudaSuccess;  // nothing to write; D = 0 would be an empty grid
  dim3 grid((unsigned)((p.R + kTile - 1) / kTile), (unsigned)((p.D + kOutChunk - 1) / kOutChunk));
  contrastive_bwd_kernel<T><<<grid, kThreads, 0, s>>>(p);
  return cudaGetLastError();
}

}  // namespace

int contrastive_fwd(const ContrastiveFwdParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: return (int)forward_t<float>(p, s);
    case DType::kFloat16: return (int)forward_t<__half>(p, s);
    case DType::kBFloat16: return (int)forward_t<__nv_bfloat16>(p, s);
  }
  return (int)cudaErrorInvalidValue;
}

int contrastive_bwd(const ContrastiveBwdParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: return (int)backward_t<float>(p, s);
    case DType::kFloat16: return (int)backward_t<__half>(p, s);
    case DType::kBFloat16: return (int)backward_t<__nv_bfloat16>(p, s);
  }
  return (int)cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dualvar
