// Fused contrastive primitive, CPU kernels: exponentials and sums over similarity tiles (see
// contrastive.h). The float path uses a branch-free exp that the compiler vectorises (AVX-512 / AVX2
// clones chosen at load time); the double path (tests, gradcheck) uses std::exp.
//
// Shared shift: where every scaled similarity of a tile lies within kRange of the tile's max Mt,
// exp(x - Mt) neither underflows nor loses precision, so one exponential per entry serves both the
// entry's row and its column (forward: both running sums; backward: both softmax weights, rescaled
// per row and per column by exp(Mt - lse)). Other tiles (NaN, or a range wider than kRange, which
// unit-norm features at temperature >= 0.025 never have) take the per-row / per-column path.
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
// GCC vectorises it (no roundf: the 1.5*2^23 trick rounds to nearest): x = n ln2 + r, |r| <= ln2/2,
// e^r by a degree-6 polynomial, 2^n through the exponent bits.
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

// Widest scaled range (max - min) of a tile that one shared shift covers: exp(-kRange) stays a
// normal number with full precision, and exp(+kRange) (the per-row / per-column rescale) stays finite.
template <typename T>
struct Shift;
template <>
struct Shift<float> {
  static constexpr float kRange = 80.0f;
};
template <>
struct Shift<double> {
  static constexpr double kRange = 700.0;
};

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

// The column counterpart of row_max_sum over a whole tile (no excluded entry): work holds 3 * nc.
template <typename T>
DUALVAR_CLONES void col_max_sum(const T* S, int64_t ld, int64_t nr, int64_t nc, T scale, T* m_c, T* l_c, T* work) {
  T* mx = work;
  T* nans = work + nc;
  T* sum = work + 2 * nc;
  for (int64_t c = 0; c < nc; ++c) mx[c] = neg_inf<T>(), nans[c] = 0, sum[c] = 0;
  for (int64_t r = 0; r < nr; ++r) {
    const T* s = S + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) {
      const T v = s[c] * scale;
      nans[c] += v != v ? T(1) : T(0);
      mx[c] = v > mx[c] ? v : mx[c];
    }
  }
  for (int64_t c = 0; c < nc; ++c) {
    if (std::isnan(m_c[c]) || nans[c] != 0) {
      m_c[c] = l_c[c] = std::numeric_limits<T>::quiet_NaN();
      mx[c] = 0;  // any finite shift; the column is done
    } else {
      mx[c] = mx[c] > m_c[c] ? mx[c] : m_c[c];  // the new running max
    }
  }
  for (int64_t r = 0; r < nr; ++r) {
    const T* s = S + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) sum[c] += exp_neg(s[c] * scale - mx[c]);
  }
  for (int64_t c = 0; c < nc; ++c) {
    if (std::isnan(m_c[c])) continue;
    l_c[c] = (m_c[c] == neg_inf<T>() ? T(0) : l_c[c] * exp_neg(m_c[c] - mx[c])) + sum[c];
    m_c[c] = mx[c];
  }
}

// max, min and NaN count of scale * S over the tile, the diagonal excluded when has_diag.
template <typename T>
DUALVAR_CLONES void tile_range(const T* S, int64_t ld, int64_t nr, int64_t nc, T scale, bool has_diag, T* max_out,
                               T* min_out, int64_t* nan_out) {
  T mx = neg_inf<T>(), mn = std::numeric_limits<T>::infinity();
  int64_t nans = 0;
  for (int64_t r = 0; r < nr; ++r) {
    const T* s = S + r * ld;
    const int64_t skip = has_diag ? r : -1;
#pragma omp simd reduction(max : mx) reduction(min : mn) reduction(+ : nans)
    for (int64_t c = 0; c < nc; ++c) {
      const T v = s[c] * scale;
      const bool keep = c != skip;
      nans += v != v;
      mx = (keep && v > mx) ? v : mx;
      mn = (keep && v < mn) ? v : mn;
    }
  }
  *max_out = mx;
  *min_out = mn;
  *nan_out = nans;
}

// Adds a block (shift, sum) to a running (m, l); NaN stays NaN.
template <typename T>
inline void merge(T* m, T* l, T shift, T sum) {
  if (std::isnan(*m)) return;
  if (*m == neg_inf<T>()) {
    *m = shift;
    *l = sum;
  } else if (shift > *m) {
    *l = *l * std::exp(*m - shift) + sum;
    *m = shift;
  } else {
    *l += sum * std::exp(shift - *m);
  }
}

// One pass, one exponential per entry: row sums and column sums under the shared shift.
template <typename T>
DUALVAR_CLONES void shared_shift_sums(const T* S, int64_t ld, int64_t nr, int64_t nc, T scale, T shift, T* row_sum,
                                      T* col_sum) {
  for (int64_t c = 0; c < nc; ++c) col_sum[c] = 0;
  for (int64_t r = 0; r < nr; ++r) {
    const T* s = S + r * ld;
    T rs = 0;
#pragma omp simd reduction(+ : rs)
    for (int64_t c = 0; c < nc; ++c) {
      const T e = exp_neg(s[c] * scale - shift);
      rs += e;
      col_sum[c] += e;
    }
    row_sum[r] = rs;
  }
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

// s[c] <- exp(scale s[c] - shift) * (a + b[c]), the shared-shift form of row_grad_symmetric.
template <typename T>
DUALVAR_CLONES void row_grad_shared(T* s, int64_t nc, T scale, int64_t skip, T shift, T a, const T* b) {
#pragma omp simd
  for (int64_t c = 0; c < nc; ++c) s[c] = exp_neg(s[c] * scale - shift) * (a + b[c]);
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
void lse_tile_symmetric(const T* S, int64_t ld, int64_t nr, int64_t nc, T scale, T* m_r, T* l_r, T* m_c, T* l_c,
                        T* work) {
  T mx, mn;
  int64_t nans;
  tile_range<T>(S, ld, nr, nc, scale, false, &mx, &mn, &nans);
  if (nans != 0 || !(mx - mn <= Shift<T>::kRange)) {
    lse_tile_update<T>(S, ld, nr, nc, scale, false, 0, m_r, l_r);
    col_max_sum<T>(S, ld, nr, nc, scale, m_c, l_c, work);
    return;
  }
  T* col_sum = work;
  T* row_sum = work + nc;
  shared_shift_sums<T>(S, ld, nr, nc, scale, mx, row_sum, col_sum);
  for (int64_t r = 0; r < nr; ++r) merge(m_r + r, l_r + r, mx, row_sum[r]);
  for (int64_t c = 0; c < nc; ++c) merge(m_c + c, l_c + c, mx, col_sum[c]);
}

template <typename T>
void grad_tile(T* S, int64_t ld, int64_t nr, int64_t nc, T scale, bool has_diag, int64_t diag, const T* lse,
               const T* g) {
  for (int64_t r = 0; r < nr; ++r) row_grad<T>(S + r * ld, nc, scale, has_diag ? r + diag : -1, lse[r], g[r] * scale);
}

template <typename T>
void grad_tile_symmetric(T* S, int64_t ld, int64_t nr, int64_t nc, T scale, bool has_diag, const T* lse_r,
                         const T* g_r, const T* lse_c, const T* g_c, T* work) {
  T mx, mn;
  int64_t nans;
  tile_range<T>(S, ld, nr, nc, scale, has_diag, &mx, &mn, &nans);
  bool shared = nans == 0 && mx - mn <= Shift<T>::kRange;
  // Column factors b[c] = scale g_c[c] exp(Mt - lse_c[c]); the row factor likewise, per row below.
  // Both are finite and non-NaN for any lse the forward produced (lse >= every logit of its row);
  // anything else (a NaN or inf lse or grad) takes the two-exponential path, entry by entry.
  T* b = work;
  for (int64_t c = 0; shared && c < nc; ++c) {
    b[c] = scale * g_c[c] * std::exp(mx - lse_c[c]);
    shared = std::isfinite(b[c]);
  }
  for (int64_t r = 0; shared && r < nr; ++r) shared = std::isfinite(g_r[r] * scale * std::exp(mx - lse_r[r]));
  if (!shared) {
    for (int64_t r = 0; r < nr; ++r)
      row_grad_symmetric<T>(S + r * ld, nc, scale, has_diag ? r : -1, lse_r[r], g_r[r] * scale, lse_c, g_c);
    return;
  }
  for (int64_t r = 0; r < nr; ++r)
    row_grad_shared<T>(S + r * ld, nc, scale, has_diag ? r : -1, mx, g_r[r] * scale * std::exp(mx - lse_r[r]), b);
}

template void lse_tile_update<float>(const float*, int64_t, int64_t, int64_t, float, bool, int64_t, float*, float*);
template void lse_tile_update<double>(const double*, int64_t, int64_t, int64_t, double, bool, int64_t, double*,
                                      double*);
template void lse_tile_symmetric<float>(const float*, int64_t, int64_t, int64_t, float, float*, float*, float*, float*,
                                        float*);
template void lse_tile_symmetric<double>(const double*, int64_t, int64_t, int64_t, double, double*, double*, double*,
                                         double*, double*);
template void grad_tile<float>(float*, int64_t, int64_t, int64_t, float, bool, int64_t, const float*, const float*);
template void grad_tile<double>(double*, int64_t, int64_t, int64_t, double, bool, int64_t, const double*,
                                const double*);
template void grad_tile_symmetric<float>(float*, int64_t, int64_t, int64_t, float, bool, const float*, const float*,
                                         const float*, const float*, float*);
template void grad_tile_symmetric<double>(double*, int64_t, int64_t, int64_t, double, bool, const double*,
                                          const double*, const double*, const double*, double*);

}  // namespace cpu
}  // namespace dualvar
