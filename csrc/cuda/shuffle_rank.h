// Shuffle-rank loss, CUDA launchers (declarations): raw device pointers and a stream, no torch headers;
// bound to torch.ops.dualvar.shuffle_rank_fwd / shuffle_rank_bwd in csrc/shuffle_rank.cpp. Each
// launcher takes one parameter struct and returns the launch's cudaError_t as int. Accumulation is
// float32; the per-sample math is shared with the CPU kernel (csrc/common/shuffle_rank.h).
#pragma once
#include <cstdint>

#include "../common/shuffle_rank.h"
#include "dtype.h"

namespace dualvar {
namespace cuda {

struct ShuffleRankFwdParams {
  shuffle_rank::Inputs in;  // device pointers; element type `dtype`
  DType dtype;
  float coef0, coef2, acc_scale;
  // out (float32, 4 entries) = {coef0 * sum terms(anchor), coef2 * sum terms(anchor2),
  //                             acc_scale * correct rows(anchor), acc_scale * correct rows(anchor2)}
  float* out;
  // shuffle_rank_fwd_workspace(B) floats, zero-filled by the caller: per-block partial sums and a
  // counter. The last block to finish adds the partials in block order, so the result is the same
  // bits on every run (no float atomics).
  float* workspace;
};

struct ShuffleRankBwdParams {
  shuffle_rank::Inputs in;  // device pointers; element type `dtype`
  DType dtype;
  const float* grad;  // upstream gradient of the terms, element k at grad[k * grad_stride]
  int64_t grad_stride;
  float gcoef0, gcoef2;  // gscale_k = grad[k] * gcoef_k
  shuffle_rank::Grads grads;  // contiguous (B, s, d) buffers of the input dtype
};

int64_t shuffle_rank_fwd_workspace(int64_t B);
int shuffle_rank_fwd(const ShuffleRankFwdParams& p, void* stream);
int shuffle_rank_bwd(const ShuffleRankBwdParams& p, void* stream);

}  // namespace cuda
}  // namespace dualvar
