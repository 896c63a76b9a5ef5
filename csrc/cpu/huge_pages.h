// Transparent huge pages for fresh CPU outputs (declaration). No torch headers.
#pragma once
#include <cstdint>

namespace dualvar {
namespace cpu {

// Asks Linux to back the whole 2 MiB pages inside [ptr, ptr + bytes) with transparent huge pages
// (madvise MADV_HUGEPAGE). Call on a fresh output before its first touch: faulting 154 MB in 4 KiB
// pages costs ~37,000 page faults, which on a VM is more than the kernel's own work. A no-op (returns
// 0) off Linux, below 4 MiB, when THP is "never", or with DUALVAR_HUGEPAGES=0; returns bytes advised.
int64_t advise_huge_pages(void* ptr, int64_t bytes);

}  // namespace cpu
}  // namespace dualvar
