// Plain C++ CPU kernels of dualvar: raw pointers, no torch headers (they compile in seconds).
// The torch-facing checks, allocation and the parallel loop live in csrc/bindings.cpp.
#pragma once
#include <cstdint>

namespace dualvar {
namespace cpu {

// Frame permutation + normalisation for output rows [row_begin, row_end), a row being one
// (b, t', h) triple of the (B, C, T', H, W) output.
//   video       uint8, contiguous (B, T, H, W, C)
//   frame_index int64 (B, T'), already range-checked
//   hflip       uint8 (B,) or nullptr
//   lut         C x 256 table of output values (element size elem_bytes: 2 or 4), lut[c*256 + x]
//   out         contiguous (B, C, T', H, W), element size elem_bytes
void permute_frames_rows(const uint8_t* video, const int64_t* frame_index, const uint8_t* hflip,
                         const void* lut, void* out, int64_t B, int64_t T, int64_t T_out, int64_t H,
                         int64_t W, int64_t C, int elem_bytes, int64_t row_begin, int64_t row_end);

// Asks Linux to back the whole 2 MiB pages inside [ptr, ptr + bytes) with transparent huge pages
// (madvise MADV_HUGEPAGE). Call on a fresh output before its first touch: faulting 154 MB in 4 KiB
// pages costs ~37,000 page faults, which on a VM is more than the kernel's own work. A no-op (returns
// 0) off Linux, below 4 MiB, when THP is "never", or with DUALVAR_HUGEPAGES=0; returns bytes advised.
int64_t advise_huge_pages(void* ptr, int64_t bytes);

}  // namespace cpu
}  // namespace dualvar
