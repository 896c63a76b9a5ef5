// Fused contrastive primitive, CUDA launchers (declarations): device pointers and a stream, no torch
// headers; bound to torch.ops.dualvar.contrastive_fwd / contrastive_bwd / contrastive_bwd_sym in
// csrc/contrastive.cpp. Each launcher takes one parameter struct and returns the launch's cudaError_t as int.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace dualvar {
namespace cuda {

// lse[r] = log sum_{c != r + offset} exp(q[r] . k[c] * scale) for r < R, c < C.
struct ContrastiveFwdParams {
  const void* q;  // (R, D) rows of stride stride_q elements, unit stride along D; element type dtype
  const void* k;  // (C, D) rows of stride stride_k
  float* lse;     // (R,) contiguous
  int64_t R, C, D, stride_q, stride_k;
  DType dtype;
  float scale;      // 1 / temperature
  bool has_offset;  // exclude column r + offset of row r (self-similarity)
  int64_t offset;
};

// out[r] = sum_c H[r, c] y[c],  H = scale * (g_r[r] exp(s*scale - lse_r[r]) + g_c[c] exp(s*scale - lse_c[c])),
// s = x[r] . y[c]; the excluded column c = r + offset gets H = 0. lse_r/g_r or lse_c/g_c may be
// nullptr (that term dropped).
struct ContrastiveBwdParams {
  const void* x;  // (R, D) rows of stride stride_x, unit stride along D; element type dtype
  const void* y;  // (C, D) rows of stride stride_y
  const float* lse_r;
  const float* g_r;  // (R,) contiguous, or nullptr
  const float* lse_c;
  const float* g_c;  // (C,) contiguous, or nullptr
  float* out;        // (R, D) contiguous
  int64_t R, C, D, stride_x, stride_y;
  DType dtype;
  float scale;
  bool has_offset;
  int64_t offset;
};

int contrastive_fwd(const ContrastiveFwdParams& p, void* stream);
int contrastive_bwd(const ContrastiveBwdParams& p, void* stream);

}  // namespace cuda
}  // namespace dualvar
