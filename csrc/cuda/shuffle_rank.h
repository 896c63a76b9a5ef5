// Launchers of the shuffle-rank CUDA kernels: raw device pointers and a stream, no torch headers.
// Each returns the launch's cudaError_t as int. dtype: 0 = float32, 1 = float16, 2 = bfloat16
// (inputs and gradients); accumulation is float32.
#pragma once
#include <cstdint>

namespace dualvar {
namespace cuda {

// out (float32, 4 entries, zeroed by the caller) += {coef0 * sum terms(anchor), coef2 * sum
// terms(anchor2), acc_scale * correct rows(anchor), acc_scale * correct rows(anchor2)}.
// anchor2 may be nullptr. Inputs (B, s, d) with row strides and unit stride along d.
int shuffle_rank_fwd(const void* anchor, const void* anchor2, const void* shuffled, const int64_t* perm,
                     float* out, int64_t B, int64_t s, int64_t d, int64_t sa_b, int64_t sa_s, int64_t sb_b,
                     int64_t sb_s, int64_t sy_b, int64_t sy_s, float inv_theta, float cap, float coef0,
                     float coef2, float acc_scale, int dtype, void* stream);

// Gradients into contiguous (B, s, d) buffers of the input dtype. grad: upstream gradient of the
// terms (float32, element k at grad[k * grad_stride]); gscale_k = grad[k] * gcoef_k.
int shuffle_rank_bwd(const void* anchor, const void* anchor2, const void* shuffled, const int64_t* perm,
                     const float* grad, int64_t grad_stride, void* d_anchor, void* d_anchor2, void* d_shuffled,
                     int64_t B, int64_t s, int64_t d, int64_t sa_b, int64_t sa_s, int64_t sb_b, int64_t sb_s,
                     int64_t sy_b, int64_t sy_s, float inv_theta, float cap, float gcoef0, float gcoef2, int dtype,
                     void* stream);

}  // namespace cuda
}  // namespace dualvar
