// Shuffle-rank loss, CPU kernels (declarations). Plain C++ on raw pointers, no torch headers; bound
// to torch.ops.dualvar.shuffle_rank_fwd / shuffle_rank_bwd in csrc/shuffle_rank.cpp. The per-sample
// math shared with the CUDA kernel is in csrc/common/shuffle_rank.h.
#pragma once
#include <cstdint>

#include "../common/shuffle_rank.h"

namespace dualvar {
namespace cpu {

// Forward over samples [b_begin, b_end); T (float or double) is the element type of the inputs.
// Adds to sums[4] = {sum of terms (anchor), sum of terms (anchor2), correct rows (anchor), (anchor2)},
// unscaled (the binding applies the weights). A sample with a NaN or inf in any input row adds NaN.
template <typename T>
void shuffle_rank_fwd(const shuffle_rank::Inputs& in, int64_t b_begin, int64_t b_end, T sums[4]);

// Backward over samples [b_begin, b_end): writes the sample's rows of out (contiguous (B, s, d), T).
// gscale0 / gscale2 = upstream grad * weight / (theta * n_terms) of each anchor set. A sample with a
// NaN or inf in any input row gets NaN gradients.
template <typename T>
void shuffle_rank_bwd(const shuffle_rank::Inputs& in, T gscale0, T gscale2, const shuffle_rank::Grads& out,
                      int64_t b_begin, int64_t b_end);

}  // namespace cpu
}  // namespace dualvar
