// Fused exponentials and sums over similarity tiles (see contrastive.h). The float path uses a
// branch-free exp that the compiler vectorises (AVX-512 / AVX2 clones chosen at load time); the
// double path (tests, gradcheck) uses std::exp.
#include "contrastive.h"

#include <cmath>
#include <cstring>
#include <limits>

namespace dualvar {
namespace cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DUALVAR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DUALVAR_CLONES
#endif

// exp(x) for x <= 0 (the only range the loss needs: logits minus their row max or lse; larger x
// only occur at excluded columns, whose value is discarded), relative error ~2e-7. Written so that
// GCC vectorises it (no roundf: the 1.5*2^23 trick rounds to nearest): x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n through the exponent bits.
inline float exp_neg(float x) {
  x = x < -87.0f ? -87.0f : (x > 0.0f ? 0.0f : x);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_neg(double x) { return std::exp(x); }

template <typename T>
inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
DUALVAR_CLONES void row_max_sum(const T* s, int64_t nc, T scale, int64_t skip, T* m_io, T* l_io) {
  if (std::isnan(*m_io)) return;  // an earlier tile held a NaN: the row stays NaN
  T mx = neg_inf<T>();
  int64_t nans = 0;
#pragma omp simd reduction(max : mx) reduction(+ : nans)
  for (int64_t c = 0; c < nc; ++c) {
    const T v = c == skip ? neg_inf<T>() : s[c] * scale;
    nans += v != v;
    mx = v > mx ? v : mx;
  }
  if (nans) {  // a max-reduction skips NaN: make it explicit so the row's lse is NaN, never finite
    *m_io = *l_io = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  if (mx == neg_inf<T>()) return;  // every column excluded
  const T m_new = mx > *m_io ? mx : *m_io;
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < nc; ++c) {
    const T e = exp_neg(s[c] * scale - m_new);
    sum += c == skip ? T(0) : e;
  }
  *l_io = (*m_io == neg_inf<T>() ? T(0) : *l_io * exp_neg(*m_io - m_new)) + sum;
  *m_io = m_new;
}

template <typename T>
DUALVAR_CLONES void row_grad(T* s, int64_t nc, T scale, int64_t skip, T lse, T gs) {
#pragma omp simd
  for (int64_t c = 0; c < nc; ++c) s[c] = gs * exp_neg(s[c] * scale - lse);
  if (skip >= 0 && skip < nc) s[skip] = 0;
}

template <typename T>
DUALVAR_CLONES void row_grad_symmetric(T* s, int64_t nc, T scale, int64_t skip, T lse_r, T gs_r, const T* lse_c,
                                       const T* g_c) {
#pragma omp simd
  for (int64_t c = 0; c < nc; ++c) {
    const T x = s[c] * scale;
    s[c] = gs_r * exp_neg(x - lse_r) + scale * g_c[c] * exp_neg(x - lse_c[c]);
  }
  if (skip >= 0 && skip < nc) s[skip] = 0;
}

}  // namespace

template <typename T>
void lse_tile_update(const T* S, int64_t ld, int64_t nr, int64_t nc, T scale, bool has_diag, int64_t diag, T* m,
                     T* l) {
  for (int64_t r = 0; r < nr; ++r)
    row_max_sum<T>(S + r * ld, nc, scale, has_diag ? r + diag : -1, m + r, l + r);
}

template <typename T>
void grad_tile(T* S, int64_t ld, int64_t nr, int64_t nc, T scale, bool has_diag, int64_t diag, const T* lse,
               const T* g) {
  for (int64_t r = 0; r < nr; ++r) row_grad<T>(S + r * ld, nc, scale, has_diag ? r + diag : -1, lse[r], g[r] * scale);
}

template <typename T>
void grad_tile_symmetric(T* S, int64_t ld, int64_t nr, int64_t nc, T scale, bool has_diag, const T* lse_r,
                         const T* g_r, const T* lse_c, const T* g_c) {
  for (int64_t r = 0; r < nr; ++r)
    row_grad_symmetric<T>(S + r * ld, nc, scale, has_diag ? r : -1, lse_r[r], g_r[r] * scale, lse_c, g_c);
}

template void lse_tile_update<float>(const float*, int64_t, int64_t, int64_t, float, bool, int64_t, float*, float*);
template void lse_tile_update<double>(const double*, int64_t, int64_t, int64_t, double, bool, int64_t, double*, double*);
template void grad_tile<float>(float*, int64_t, int64_t, int64_t, float, bool, int64_t, const float*, const float*);
template void grad_tile<double>(double*, int64_t, int64_t, int64_t, double, bool, int64_t, const double*, const double*);
template void grad_tile_symmetric<float>(float*, int64_t, int64_t, int64_t, float, bool, const float*, const float*,
                                         const float*, const float*);
template void grad_tile_symmetric<double>(double*, int64_t, int64_t, int64_t, double, bool, const double*,
                                          const double*, const double*, const double*);

}  // namespace cpu
}  // namespace dualvar
