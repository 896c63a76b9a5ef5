// Frame permutation, CPU kernel (declaration). Plain C++ on raw pointers, no torch headers; bound to
// torch.ops.dualvar.permute_frames in csrc/permute_frames.cpp.
#pragma once
#include <cstdint>

#include "../common/permute_frames.h"

namespace dualvar {
namespace cpu {

// Output rows [row_begin, row_end) of p.out, a row being one (b, t', h) triple of the (B, C, T', H, W)
// output (all C channel planes of it). Rows are independent: the binding splits them across threads.
void permute_frames_rows(const permute_frames::Params& p, int64_t row_begin, int64_t row_end);

}  // namespace cpu
}  // namespace dualvar
