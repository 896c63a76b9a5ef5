// Shuffle-rank loss, CUDA kernels: one warp per sample. Lanes stride over d to accumulate the raw
// Gram blocks (A A^T, A Y^T, Y Y^T, and A2 ...) with warp-shuffle reductions into shared memory;
// lane 0 ranks the sample (the math shared with the CPU kernel, csrc/cpu/shuffle_rank.h); in the
// backward, lanes then write each gradient row as a linear combination of input rows.
// The forward reduces per block in shared memory and issues 4 atomics per block.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../cpu/shuffle_rank.h"
#include "shuffle_rank.h"

namespace dualvar {
namespace cuda {
namespace {

constexpr int S = shuffle_rank::kMaxS;
constexpr int kWarps = 4;  // samples per block
constexpr float kEps = 1e-12f;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct Smem {
  float Gaa[S * S], Gbb[S * S], Sap[S * S], Sbp[S * S], Spp[S * S], nu[S], n[S];
  float Haa[S * S], Hbb[S * S], Hap[S * S], Hbp[S * S], Hpp[S * S], r[S];
};

// Gram blocks of sample b into sm (all lanes participate; lane 0 writes).
template <typename T>
__device__ void grams(const T* a, const T* a2, const T* y, int64_t b, int s, int64_t d, int64_t sa_b,
                      int64_t sa_s, int64_t sb_b, int64_t sb_s, int64_t sy_b, int64_t sy_s, Smem& sm, int lane) {
  const T* A = a + b * sa_b;
  const T* A2 = a2 ? a2 + b * sb_b : nullptr;
  const T* Y = y + b * sy_b;
  auto dot = [&](const T* u, int64_t su, int i, const T* v, int64_t sv, int j) {
    float acc = 0.f;
    for (int64_t t = lane; t < d; t += 32) acc += to_f(u[i * su + t]) * to_f(v[j * sv + t]);
    return warp_sum(acc);
  };
  for (int j = 0; j < s; ++j) {
    const float n = sqrtf(dot(Y, sy_s, j, Y, sy_s, j));
    if (lane == 0) {
      sm.n[j] = n;
      sm.nu[j] = fmaxf(n, kEps);
    }
  }
  __syncwarp();
  for (int i = 0; i < s; ++i)
    for (int j = 0; j < s; ++j) {
      const float gaa = j >= i ? dot(A, sa_s, i, A, sa_s, j) : 0.f;
      const float gyy = j >= i ? dot(Y, sy_s, i, Y, sy_s, j) : 0.f;
      const float gay = dot(A, sa_s, i, Y, sy_s, j);
      float gbb = 0.f, gby = 0.f;
      if (A2) {
        gbb = j >= i ? dot(A2, sb_s, i, A2, sb_s, j) : 0.f;
        gby = dot(A2, sb_s, i, Y, sy_s, j);
      }
      if (lane == 0) {
        if (j >= i) {
          sm.Gaa[i * s + j] = sm.Gaa[j * s + i] = gaa;
          sm.Spp[i * s + j] = sm.Spp[j * s + i] = gyy / (sm.nu[i] * sm.nu[j]);
          sm.Gbb[i * s + j] = sm.Gbb[j * s + i] = gbb;
        }
        sm.Sap[i * s + j] = gay / sm.nu[j];
        sm.Sbp[i * s + j] = gby / sm.nu[j];
      }
    }
  __syncwarp();
}

template <typename T>
__global__ void shuffle_rank_fwd_kernel(const T* __restrict__ a, const T* __restrict__ a2, const T* __restrict__ y,
                           const int64_t* __restrict__ perm, float* __restrict__ out, int64_t B, int s, int64_t d,
                           int64_t sa_b, int64_t sa_s, int64_t sb_b, int64_t sb_s, int64_t sy_b, int64_t sy_s,
                           float inv_theta, float cap, float coef0, float coef2, float acc_scale) {
  __shared__ Smem smem[kWarps];
  __shared__ float part[kWarps][4];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  Smem& sm = smem[warp];
  float sums[4] = {0.f, 0.f, 0.f, 0.f};
  // grid-stride over samples, one warp per sample
  for (int64_t b = (int64_t)blockIdx.x * kWarps + warp; b < B; b += (int64_t)gridDim.x * kWarps) {
    grams(a, a2, y, b, s, d, sa_b, sa_s, sb_b, sb_s, sy_b, sy_s, sm, lane);
    if (lane == 0) {
      shuffle_rank::rank_sample<float>(s, sm.Gaa, sm.Sap, sm.Spp, perm + b * s, inv_theta, cap, 0.f, &sums[0],
                                       &sums[2], nullptr, nullptr, nullptr);
      if (a2)
        shuffle_rank::rank_sample<float>(s, sm.Gbb, sm.Sbp, sm.Spp, perm + b * s, inv_theta, cap, 0.f, &sums[1],
                                         &sums[3], nullptr, nullptr, nullptr);
    }
    __syncwarp();
  }
  if (lane == 0)
    for (int k = 0; k < 4; ++k) part[warp][k] = sums[k];
  __syncthreads();
  if (threadIdx.x == 0) {
    float tot[4] = {0.f, 0.f, 0.f, 0.f};
    for (int w = 0; w < kWarps; ++w)
      for (int k = 0; k < 4; ++k) tot[k] += part[w][k];
    atomicAdd(out + 0, tot[0] * coef0);
    atomicAdd(out + 2, tot[2] * acc_scale);
    if (a2) {
      atomicAdd(out + 1, tot[1] * coef2);
      atomicAdd(out + 3, tot[3] * acc_scale);
    }
  }
}

template <typename T>
__global__ void shuffle_rank_bwd_kernel(const T* __restrict__ a, const T* __restrict__ a2, const T* __restrict__ y,
                           const int64_t* __restrict__ perm, const float* __restrict__ grad, int64_t grad_stride,
                           T* __restrict__ da, T* __restrict__ da2, T* __restrict__ dy, int64_t B, int s, int64_t d,
                           int64_t sa_b, int64_t sa_s, int64_t sb_b, int64_t sb_s, int64_t sy_b, int64_t sy_s,
                           float inv_theta, float cap, float gcoef0, float gcoef2) {
  __shared__ Smem smem[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  Smem& sm = smem[warp];
  const float gs0 = grad[0] * gcoef0;
  const float gs2 = a2 ? grad[grad_stride] * gcoef2 : 0.f;
  for (int64_t b = (int64_t)blockIdx.x * kWarps + warp; b < B; b += (int64_t)gridDim.x * kWarps) {
    grams(a, a2, y, b, s, d, sa_b, sa_s, sb_b, sb_s, sy_b, sy_s, sm, lane);
    if (lane == 0) {
      for (int k = 0; k < s * s; ++k) sm.Haa[k] = sm.Hbb[k] = sm.Hap[k] = sm.Hbp[k] = sm.Hpp[k] = 0.f;
      float l = 0.f, c = 0.f;
      shuffle_rank::rank_sample<float>(s, sm.Gaa, sm.Sap, sm.Spp, perm + b * s, inv_theta, cap, gs0, &l, &c,
                                       sm.Haa, sm.Hap, sm.Hpp);
      if (a2)
        shuffle_rank::rank_sample<float>(s, sm.Gbb, sm.Sbp, sm.Spp, perm + b * s, inv_theta, cap, gs2, &l, &c,
                                         sm.Hbb, sm.Hbp, sm.Hpp);
      for (int j = 0; j < s; ++j) {  // p_j . dL/dp_j from the Gram blocks
        float acc = 0.f;
        for (int k = 0; k < s; ++k) acc += (sm.Hpp[j * s + k] + sm.Hpp[k * s + j]) * sm.Spp[j * s + k];
        for (int i = 0; i < s; ++i) acc += sm.Hap[i * s + j] * sm.Sap[i * s + j] + sm.Hbp[i * s + j] * sm.Sbp[i * s + j];
        sm.r[j] = acc;
      }
    }
    __syncwarp();
    const T* A = a + b * sa_b;
    const T* A2 = a2 ? a2 + b * sb_b : nullptr;
    const T* Y = y + b * sy_b;
    for (int64_t t = lane; t < d; t += 32) {
      float av[S], bv[S], yv[S];
      for (int k = 0; k < s; ++k) {
        av[k] = to_f(A[k * sa_s + t]);
        bv[k] = A2 ? to_f(A2[k * sb_s + t]) : 0.f;
        yv[k] = to_f(Y[k * sy_s + t]);
      }
      for (int i = 0; i < s; ++i) {
        float ga = 0.f, gb = 0.f, gy = 0.f;
        for (int k = 0; k < s; ++k) {
          ga += (sm.Haa[i * s + k] + sm.Haa[k * s + i]) * av[k] + sm.Hap[i * s + k] / sm.nu[k] * yv[k];
          gb += (sm.Hbb[i * s + k] + sm.Hbb[k * s + i]) * bv[k] + sm.Hbp[i * s + k] / sm.nu[k] * yv[k];
          gy += (sm.Hpp[i * s + k] + sm.Hpp[k * s + i]) / (sm.nu[i] * sm.nu[k]) * yv[k] +
                (sm.Hap[k * s + i] * av[k] + sm.Hbp[k * s + i] * bv[k]) / sm.nu[i];
        }
        if (sm.n[i] > kEps) gy -= sm.r[i] / (sm.nu[i] * sm.nu[i]) * yv[i];
        const int64_t o = (b * s + i) * d + t;
        da[o] = from_f<T>(ga);
        if (da2) da2[o] = from_f<T>(gb);
        dy[o] = from_f<T>(gy);
      }
    }
    __syncwarp();
  }
}

int blocks_for(int64_t B) {
  const int64_t need = (B + kWarps - 1) / kWarps;
  return (int)(need < 4096 ? need : 4096);
}

template <typename T>
int launch_fwd(const void* a, const void* a2, const void* y, const int64_t* perm, float* out, int64_t B, int64_t s,
               int64_t d, int64_t sa_b, int64_t sa_s, int64_t sb_b, int64_t sb_s, int64_t sy_b, int64_t sy_s,
               float inv_theta, float cap, float coef0, float coef2, float acc_scale, cudaStream_t st) {
  shuffle_rank_fwd_kernel<T><<<blocks_for(B), kWarps * 32, 0, st>>>((const T*)a, (const T*)a2, (const T*)y, perm, out, B, (int)s,
                                                       d, sa_b, sa_s, sb_b, sb_s, sy_b, sy_s, inv_theta, cap, coef0,
                                                       coef2, acc_scale);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_bwd(const void* a, const void* a2, const void* y, const int64_t* perm, const float* grad,
               int64_t grad_stride, void* da, void* da2, void* dy, int64_t B, int64_t s, int64_t d, int64_t sa_b,
               int64_t sa_s, int64_t sb_b, int64_t sb_s, int64_t sy_b, int64_t sy_s, float inv_theta, float cap,
               float gcoef0, float gcoef2, cudaStream_t st) {
  shuffle_rank_bwd_kernel<T><<<blocks_for(B), kWarps * 32, 0, st>>>((const T*)a, (const T*)a2, (const T*)y, perm, grad,
                                                       grad_stride, (T*)da, (T*)da2, (T*)dy, B, (int)s, d, sa_b, sa_s,
                                                       sb_b, sb_s, sy_b, sy_s, inv_theta, cap, gcoef0, gcoef2);
  return (int)cudaGetLastError();
}

}  // namespace

int shuffle_rank_fwd(const void* anchor, const void* anchor2, const void* shuffled, const int64_t* perm,
                     float* out, int64_t B, int64_t s, int64_t d, int64_t sa_b, int64_t sa_s, int64_t sb_b,
                     int64_t sb_s, int64_t sy_b, int64_t sy_s, float inv_theta, float cap, float coef0,
                     float coef2, float acc_scale, int dtype, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch_fwd<float>(anchor, anchor2, shuffled, perm, out, B, s, d, sa_b, sa_s, sb_b, sb_s, sy_b, sy_s, inv_theta, cap, coef0, coef2, acc_scale, st);
    case 1: return launch_fwd<__half>(anchor, anchor2, shuffled, perm, out, B, s, d, sa_b, sa_s, sb_b, sb_s, sy_b, sy_s, inv_theta, cap, coef0, coef2, acc_scale, st);
    case 2: return launch_fwd<__nv_bfloat16>(anchor, anchor2, shuffled, perm, out, B, s, d, sa_b, sa_s, sb_b, sb_s, sy_b, sy_s, inv_theta, cap, coef0, coef2, acc_scale, st);
    default: return (int)cudaErrorInvalidValue;
  }
}

int shuffle_rank_bwd(const void* anchor, const void* anchor2, const void* shuffled, const int64_t* perm,
                     const float* grad, int64_t grad_stride, void* d_anchor, void* d_anchor2, void* d_shuffled,
                     int64_t B, int64_t s, int64_t d, int64_t sa_b, int64_t sa_s, int64_t sb_b, int64_t sb_s,
                     int64_t sy_b, int64_t sy_s, float inv_theta, float cap, float gcoef0, float gcoef2, int dtype,
                     void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch_bwd<float>(anchor, anchor2, shuffled, perm, grad, grad_stride, d_anchor, d_anchor2, d_shuffled, B, s, d, sa_b, sa_s, sb_b, sb_s, sy_b, sy_s, inv_theta, cap, gcoef0, gcoef2, st);
    case 1: return launch_bwd<__half>(anchor, anchor2, shuffled, perm, grad, grad_stride, d_anchor, d_anchor2, d_shuffled, B, s, d, sa_b, sa_s, sb_b, sb_s, sy_b, sy_s, inv_theta, cap, gcoef0, gcoef2, st);
    case 2: return launch_bwd<__nv_bfloat16>(anchor, anchor2, shuffled, perm, grad, grad_stride, d_anchor, d_anchor2, d_shuffled, B, s, d, sa_b, sa_s, sb_b, sb_s, sy_b, sy_s, inv_theta, cap, gcoef0, gcoef2, st);
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace dualvar
