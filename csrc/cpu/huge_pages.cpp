// Transparent huge pages for fresh CPU outputs (see huge_pages.h). No torch headers.
#include "huge_pages.h"

#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dualvar {
namespace cpu {

namespace {
bool huge_pages_wanted() {
  static const bool wanted = [] {
    const char* v = std::getenv("DUALVAR_HUGEPAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return wanted;
}
}  // namespace

int64_t advise_huge_pages(void* ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!huge_pages_wanted() || ptr == nullptr || bytes < int64_t(2 * kHuge)) return 0;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + uintptr_t(bytes)) & ~(kHuge - 1);
  if (end <= begin) return 0;
  // Fails harmlessly (EINVAL) where THP is compiled out; the memory then keeps small pages.
  if (madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) != 0) return 0;
  return int64_t(end - begin);
#else
  (void)ptr;
  (void)bytes;
  return 0;
#endif
}

}  // namespace cpu
}  // namespace dualvar
