// Launchers of the fused contrastive primitive on CUDA (raw pointers, no torch headers).
// dtype: 0 = float32, 1 = float16, 2 = bfloat16 (inputs); lse, grad and outputs are float32.
// Return the launch's cudaError_t as int.
#pragma once
#include <cstdint>

namespace dualvar {
namespace cuda {

// lse[r] = log sum_{c != r + offset} exp(q[r] . k[c] * scale)
int lse_forward(const void* q, const void* k, float* lse, int64_t R, int64_t C, int64_t D, int64_t stride_q,
                int64_t stride_k, int dtype, float scale, bool has_offset, int64_t offset, void* stream);

// out[r] = sum_c H[r, c] y[c],  H = scale * (row_term: g_r[r] exp(s*scale - lse_r[r])
//                                            + col_term: g_c[c] exp(s*scale - lse_c[c])), s = x[r] . y[c]
// excluded column c = r + offset gets H = 0. Pass nullptr for lse_r/g_r or lse_c/g_c to drop a term.
int lse_backward(const void* x, const void* y, const float* lse_r, const float* g_r, const float* lse_c,
                 const float* g_c, float* out, int64_t R, int64_t C, int64_t D, int64_t stride_x, int64_t stride_y,
                 int dtype, float scale, bool has_offset, int64_t offset, void* stream);

}  // namespace cuda
}  // namespace dualvar
