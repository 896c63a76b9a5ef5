// Shuffle-rank loss, CUDA kernels: one warp per sample. Lanes stride over d: first the max-abs of each
// shuffled row (its power-of-two scale, so the squared norm cannot overflow) and a finiteness check of
// every input row, then the raw Gram blocks (A A^T, A Y^T, Y Y^T, and A2 ...) with warp-shuffle
// reductions into shared memory; lane 0 ranks the sample (the math shared with the CPU kernel,
// csrc/common/shuffle_rank.h). The normalisation uses correctly rounded sqrt and division even under
// --use_fast_math, so that with d = 1 every similarity is exactly +-1 and ties stay ties.
// Forward: per-warp sums in sample order, per-block sums in warp order, and the last block to finish
// adds the blocks' partials in block order: deterministic, no float atomics.
// Backward: lanes turn dL/dS into coefficient matrices, then write each gradient row as a linear
// combination of input rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "shuffle_rank.h"

namespace dualvar {
namespace cuda {
namespace {

constexpr int S = shuffle_rank::kMaxS;
constexpr int kWarps = 4;        // samples per block
constexpr int kMaxBlocks = 4096;
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
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Per-warp shared memory: the Gram blocks of the warp's current sample (forward and backward) ...
struct Smem {
  float Gaa[S * S], Gbb[S * S], Sap[S * S], Sbp[S * S], Spp[S * S];
  float f[S];  // 2^-e of each shuffled row: y_hat = y * f
  shuffle_rank::RowNorm<float> norm[S];
};
// ... and, in the backward only, dL/dS and the coefficients of the gradient rows
// (gradient row i = sum_k C[i*s+k] * input row k, see shuffle_rank_bwd_kernel).
struct GradSmem {
  float Haa[S * S], Hbb[S * S], Hap[S * S], Hbp[S * S], Hpp[S * S], r[S];
  float CA[S * S], CAY[S * S], CB[S * S], CBY[S * S], CY[S * S], CYA[S * S], CYB[S * S];
};

// Scales, norms and Gram blocks of sample b into sm (all lanes participate; lane 0 writes).
// Returns true (on every lane) when any input row of the sample holds a NaN or inf.
template <typename T>
__device__ bool grams(const shuffle_rank::Inputs& in, int64_t b, Smem& sm, int lane) {
  const int s = (int)in.s;
  const int64_t d = in.d;
  const T* A = static_cast<const T*>(in.anchor) + b * in.anchor_stride_b;
  const T* A2 = in.anchor2 ? static_cast<const T*>(in.anchor2) + b * in.anchor2_stride_b : nullptr;
  const T* Y = static_cast<const T*>(in.shuffled) + b * in.shuffled_stride_b;
  const int64_t sa = in.anchor_stride_s, sb = in.anchor2_stride_s, sy = in.shuffled_stride_s;
  bool finite = true;
  for (int i = 0; i < s; ++i)
    for (int64_t t = lane; t < d; t += 32) {
      finite = finite && hd::is_finite(to_f(A[i * sa + t]));
      if (A2) finite = finite && hd::is_finite(to_f(A2[i * sb + t]));
    }
  for (int j = 0; j < s; ++j) {
    float mx = 0.f;
    for (int64_t t = lane; t < d; t += 32) {
      const float v = to_f(Y[j * sy + t]);
      finite = finite && hd::is_finite(v);
      mx = fmaxf(mx, fabsf(v));
    }
    mx = warp_max(mx);
    const int e = shuffle_rank::scale_exponent<float>(mx);
    const float f = hd::pow2(0.f, -e);
    float acc = 0.f;
    for (int64_t t = lane; t < d; t += 32) {
      const float v = to_f(Y[j * sy + t]) * f;
      acc += v * v;
    }
    const shuffle_rank::RowNorm<float> nrm = shuffle_rank::row_norm<float>(warp_sum(acc), e, kEps);
    if (lane == 0) {
      sm.f[j] = f;
      sm.norm[j] = nrm;
    }
  }
  const bool bad = __any_sync(0xffffffffu, !finite);
  __syncwarp();
  auto dot = [&](const T* u, int64_t su, int i, float fu, const T* v, int64_t sv, int j, float fv) {
    float acc = 0.f;
    for (int64_t t = lane; t < d; t += 32) acc += (to_f(u[i * su + t]) * fu) * (to_f(v[j * sv + t]) * fv);
    return warp_sum(acc);
  };
  for (int i = 0; i < s; ++i)
    for (int j = 0; j < s; ++j) {
      const float fi = sm.f[i], fj = sm.f[j];
      const float gaa = j >= i ? dot(A, sa, i, 1.f, A, sa, j, 1.f) : 0.f;
      const float gyy = j >= i ? dot(Y, sy, i, fi, Y, sy, j, fj) : 0.f;
      const float gay = dot(A, sa, i, 1.f, Y, sy, j, fj);
      float gbb = 0.f, gby = 0.f;
      if (A2) {
        gbb = j >= i ? dot(A2, sb, i, 1.f, A2, sb, j, 1.f) : 0.f;
        gby = dot(A2, sb, i, 1.f, Y, sy, j, fj);
      }
      if (lane == 0) {
        const float dvi = sm.norm[i].dv, dvj = sm.norm[j].dv;
        if (j >= i) {
          sm.Gaa[i * s + j] = sm.Gaa[j * s + i] = gaa;
          sm.Spp[i * s + j] = sm.Spp[j * s + i] = hd::div_rn(gyy, dvi * dvj);
          sm.Gbb[i * s + j] = sm.Gbb[j * s + i] = gbb;
        }
        sm.Sap[i * s + j] = hd::div_rn(gay, dvj);
        sm.Sbp[i * s + j] = hd::div_rn(gby, dvj);
      }
    }
  __syncwarp();
  return bad;
}

template <typename T>
__global__ void shuffle_rank_fwd_kernel(ShuffleRankFwdParams p) {
  __shared__ Smem smem[kWarps];
  __shared__ float part[kWarps][4];
  __shared__ double total[kWarps * 32][4];
  __shared__ bool last_block;
  const shuffle_rank::Inputs& in = p.in;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int s = (int)in.s;
  const float inv_theta = (float)in.inv_theta, cap = (float)in.cap;
  Smem& sm = smem[warp];
  float sums[4] = {0.f, 0.f, 0.f, 0.f};
  // grid-stride over samples, one warp per sample
  for (int64_t b = (int64_t)blockIdx.x * kWarps + warp; b < in.B; b += (int64_t)gridDim.x * kWarps) {
    const bool bad = grams<T>(in, b, sm, lane);
    if (lane == 0) {
      shuffle_rank::rank_sample<float>(s, sm.Gaa, sm.Sap, sm.Spp, in.perm + b * s, inv_theta, cap, 0.f, &sums[0],
                                       &sums[2], nullptr, nullptr, nullptr);
      if (in.anchor2)
        shuffle_rank::rank_sample<float>(s, sm.Gbb, sm.Sbp, sm.Spp, in.perm + b * s, inv_theta, cap, 0.f, &sums[1],
                                         &sums[3], nullptr, nullptr, nullptr);
      if (bad) sums[0] = sums[1] = __int_as_float(0x7fc00000);  // NaN in, NaN out
    }
    __syncwarp();
  }
  if (lane == 0)
    for (int k = 0; k < 4; ++k) part[warp][k] = sums[k];
  __syncthreads();
  unsigned int* counter = reinterpret_cast<unsigned int*>(p.workspace);
  float* partials = p.workspace + 4;
  if (threadIdx.x == 0) {
    for (int k = 0; k < 4; ++k) {
      float tot = 0.f;
      for (int w = 0; w < kWarps; ++w) tot += part[w][k];
      partials[blockIdx.x * 4 + k] = tot;
    }
    __threadfence();  // the partials are visible device-wide before the counter says so
    last_block = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  // The last block: each thread adds a fixed, strided subset of the blocks in order, then a fixed tree.
  const volatile float* vp = partials;
  for (int k = 0; k < 4; ++k) {
    double acc = 0.0;
    for (unsigned int blk = threadIdx.x; blk < gridDim.x; blk += blockDim.x) acc += (double)vp[blk * 4 + k];
    total[threadIdx.x][k] = acc;
  }
  __syncthreads();
  for (int stride = kWarps * 16; stride > 0; stride >>= 1) {
    if ((int)threadIdx.x < stride)
      for (int k = 0; k < 4; ++k) total[threadIdx.x][k] += total[threadIdx.x + stride][k];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const bool two = in.anchor2 != nullptr;
    p.out[0] = (float)(total[0][0] * (double)p.coef0);
    p.out[1] = two ? (float)(total[0][1] * (double)p.coef2) : 0.f;
    p.out[2] = (float)(total[0][2] * (double)p.acc_scale);
    p.out[3] = two ? (float)(total[0][3] * (double)p.acc_scale) : 0.f;
    *counter = 0u;  // reusable by a later launch
  }
}

template <typename T>
__global__ void shuffle_rank_bwd_kernel(ShuffleRankBwdParams p) {
  __shared__ Smem smem[kWarps];
  __shared__ GradSmem gsmem[kWarps];
  const shuffle_rank::Inputs& in = p.in;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int s = (int)in.s;
  const int64_t d = in.d;
  const float inv_theta = (float)in.inv_theta, cap = (float)in.cap;
  const bool two = in.anchor2 != nullptr;
  Smem& sm = smem[warp];
  GradSmem& gm = gsmem[warp];
  const float gs0 = p.grad[0] * p.gcoef0;
  const float gs2 = two ? p.grad[p.grad_stride] * p.gcoef2 : 0.f;
  T* da = static_cast<T*>(p.grads.d_anchor);
  T* da2 = static_cast<T*>(p.grads.d_anchor2);
  T* dy = static_cast<T*>(p.grads.d_shuffled);
  for (int64_t b = (int64_t)blockIdx.x * kWarps + warp; b < in.B; b += (int64_t)gridDim.x * kWarps) {
    const bool bad = grams<T>(in, b, sm, lane);
    if (bad) {  // NaN in, NaN out: the sample's gradient rows are NaN
      const T nan = from_f<T>(__int_as_float(0x7fc00000));
      for (int64_t o = lane; o < s * d; o += 32) {
        da[b * s * d + o] = nan;
        if (da2) da2[b * s * d + o] = nan;
        dy[b * s * d + o] = nan;
      }
      __syncwarp();
      continue;
    }
    if (lane == 0) {
      for (int k = 0; k < s * s; ++k) gm.Haa[k] = gm.Hbb[k] = gm.Hap[k] = gm.Hbp[k] = gm.Hpp[k] = 0.f;
      float l = 0.f, c = 0.f;
      shuffle_rank::rank_sample<float>(s, sm.Gaa, sm.Sap, sm.Spp, in.perm + b * s, inv_theta, cap, gs0, &l, &c,
                                       gm.Haa, gm.Hap, gm.Hpp);
      if (two)
        shuffle_rank::rank_sample<float>(s, sm.Gbb, sm.Sbp, sm.Spp, in.perm + b * s, inv_theta, cap, gs2, &l, &c,
                                         gm.Hbb, gm.Hbp, gm.Hpp);
      for (int j = 0; j < s; ++j) {  // p_j . dL/dp_j from the Gram blocks
        float acc = 0.f;
        for (int k = 0; k < s; ++k) acc += (gm.Hpp[j * s + k] + gm.Hpp[k * s + j]) * sm.Spp[j * s + k];
        for (int i = 0; i < s; ++i) acc += gm.Hap[i * s + j] * sm.Sap[i * s + j];
        if (two)
          for (int i = 0; i < s; ++i) acc += gm.Hbp[i * s + j] * sm.Sbp[i * s + j];
        gm.r[j] = acc;
      }
    }
    __syncwarp();
    // Coefficients (the CPU kernel's, csrc/cpu/shuffle_rank.cpp), one entry per lane:
    //   dA_i  = sum_k CA[i,k] a_k  + CAY[i,k] y_hat_k           CA = Haa + Haa^T, CAY = Hap / dv_k
    //   dA2_i = sum_k CB[i,k] b_k  + CBY[i,k] y_hat_k
    //   dy_i  = sum_k CY[i,k] y_hat_k + CYA[i,k] a_k + CYB[i,k] b_k
    //           CY = (Hpp + Hpp^T)[i,k] / (nu_i dv_k) - [k = i, |y_i| > eps] r_i / (nu_i dv_i), CYA = Hap[k,i] / nu_i
    for (int idx = lane; idx < s * s; idx += 32) {
      const int i = idx / s, k = idx % s;
      const float nu_i = sm.norm[i].nu, dv_k = sm.norm[k].dv;
      gm.CA[idx] = gm.Haa[i * s + k] + gm.Haa[k * s + i];
      gm.CAY[idx] = hd::div_rn(gm.Hap[i * s + k], dv_k);
      gm.CB[idx] = gm.Hbb[i * s + k] + gm.Hbb[k * s + i];
      gm.CBY[idx] = hd::div_rn(gm.Hbp[i * s + k], dv_k);
      float cy = hd::div_rn(gm.Hpp[i * s + k] + gm.Hpp[k * s + i], nu_i * dv_k);
      if (k == i && sm.norm[i].above_eps) cy -= hd::div_rn(gm.r[i], nu_i * sm.norm[i].dv);
      gm.CY[idx] = cy;
      gm.CYA[idx] = hd::div_rn(gm.Hap[k * s + i], nu_i);
      gm.CYB[idx] = hd::div_rn(gm.Hbp[k * s + i], nu_i);
    }
    __syncwarp();
    const T* A = static_cast<const T*>(in.anchor) + b * in.anchor_stride_b;
    const T* A2 = two ? static_cast<const T*>(in.anchor2) + b * in.anchor2_stride_b : nullptr;
    const T* Y = static_cast<const T*>(in.shuffled) + b * in.shuffled_stride_b;
    for (int64_t t = lane; t < d; t += 32) {
      float av[S], bv[S], yv[S];
      for (int k = 0; k < s; ++k) {
        av[k] = to_f(A[k * in.anchor_stride_s + t]);
        bv[k] = A2 ? to_f(A2[k * in.anchor2_stride_s + t]) : 0.f;
        yv[k] = to_f(Y[k * in.shuffled_stride_s + t]) * sm.f[k];
      }
      for (int i = 0; i < s; ++i) {
        float ga = 0.f, gb = 0.f, gy = 0.f;
        for (int k = 0; k < s; ++k) {
          const int idx = i * s + k;
          ga += gm.CA[idx] * av[k] + gm.CAY[idx] * yv[k];
          gb += gm.CB[idx] * bv[k] + gm.CBY[idx] * yv[k];
          gy += gm.CY[idx] * yv[k] + gm.CYA[idx] * av[k] + gm.CYB[idx] * bv[k];
        }
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
  return (int)(need < kMaxBlocks ? need : kMaxBlocks);
}

template <typename T>
int launch_fwd(const ShuffleRankFwdParams& p, cudaStream_t st) {
  shuffle_rank_fwd_kernel<T><<<blocks_for(p.in.B), kWarps * 32, 0, st>>>(p);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_bwd(const ShuffleRankBwdParams& p, cudaStream_t st) {
  shuffle_rank_bwd_kernel<T><<<blocks_for(p.in.B), kWarps * 32, 0, st>>>(p);
  return (int)cudaGetLastError();
}

}  // namespace

int64_t shuffle_rank_fwd_workspace(int64_t B) { return 4 + 4 * (int64_t)blocks_for(B); }

int shuffle_rank_fwd(const ShuffleRankFwdParams& p, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (p.in.B <= 0) return (int)cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return launch_fwd<float>(p, st);
    case DType::kFloat16: return launch_fwd<__half>(p, st);
    case DType::kBFloat16: return launch_fwd<__nv_bfloat16>(p, st);
  }
  return (int)cudaErrorInvalidValue;
}

int shuffle_rank_bwd(const ShuffleRankBwdParams& p, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (p.in.B <= 0) return (int)cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return launch_bwd<float>(p, st);
    case DType::kFloat16: return launch_bwd<__half>(p, st);
    case DType::kBFloat16: return launch_bwd<__nv_bfloat16>(p, st);
  }
  return (int)cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dualvar
