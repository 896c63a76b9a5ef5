// Shuffle-rank loss, CPU kernels: per sample, accumulate the raw Gram blocks over d, rescale by the
// shuffled rows' norms (normalisation folded into the Gram entries), rank, and for the backward
// write each gradient row as a short linear combination of input rows. Plain C++, no torch headers.
#include "shuffle_rank.h"

#include <algorithm>
#include <cmath>

namespace dualvar {
namespace cpu {
namespace {

constexpr int S = shuffle_rank::kMaxS;
constexpr double kEps = 1e-12;

// Eight independent partial sums: the compiler vectorises this without -ffast-math.
template <typename T>
T dot(const T* x, const T* y, int64_t d) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= d; k += 8)
    for (int l = 0; l < 8; ++l) acc[l] += x[k + l] * y[k + l];
  T tail = 0;
  for (; k < d; ++k) tail += x[k] * y[k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// out[0:d] = sum_k coef[k] * rows[k][0:d] over n rows (row-wise axpy, vectorised along d).
template <typename T>
void combine(T* out, const T* coef, const T* const* rows, int64_t n, int64_t d, bool first) {
  for (int64_t k = 0; k < n; ++k) {
    const T c = coef[k];
    const T* r = rows[k];
    if (first && k == 0) {
      for (int64_t t = 0; t < d; ++t) out[t] = c * r[t];
    } else {
      for (int64_t t = 0; t < d; ++t) out[t] += c * r[t];
    }
  }
}

// Per-sample Gram blocks: Gaa = A A^T, Gbb = A2 A2^T, Sap = A P^T, Sbp = A2 P^T, Spp = P P^T, and
// nu (clamped norms) and n (raw norms) of the shuffled rows.
template <typename T>
struct Sample {
  T Gaa[S * S], Gbb[S * S], Sap[S * S], Sbp[S * S], Spp[S * S], nu[S], n[S];
  const T* a[S];
  const T* a2[S];
  const T* y[S];

  void load(const T* anchor, const T* anchor2, const T* shuffled, int64_t b, int64_t s, int64_t d, int64_t sa_b,
            int64_t sa_s, int64_t sb_b, int64_t sb_s, int64_t sy_b, int64_t sy_s) {
    for (int64_t i = 0; i < s; ++i) {
      a[i] = anchor + b * sa_b + i * sa_s;
      a2[i] = anchor2 ? anchor2 + b * sb_b + i * sb_s : nullptr;
      y[i] = shuffled + b * sy_b + i * sy_s;
    }
    for (int64_t j = 0; j < s; ++j) {
      n[j] = std::sqrt(dot(y[j], y[j], d));
      nu[j] = std::max(n[j], T(kEps));
    }
    for (int64_t i = 0; i < s; ++i)
      for (int64_t j = 0; j < s; ++j) {
        Gaa[i * s + j] = j >= i ? dot(a[i], a[j], d) : Gaa[j * s + i];
        Spp[i * s + j] = j >= i ? dot(y[i], y[j], d) / (nu[i] * nu[j]) : Spp[j * s + i];
        Sap[i * s + j] = dot(a[i], y[j], d) / nu[j];
        if (anchor2) {
          Gbb[i * s + j] = j >= i ? dot(a2[i], a2[j], d) : Gbb[j * s + i];
          Sbp[i * s + j] = dot(a2[i], y[j], d) / nu[j];
        }
      }
  }
};

}  // namespace

template <typename T>
void shuffle_rank_fwd(const T* anchor, const T* anchor2, const T* shuffled, const int64_t* perm, int64_t s,
                      int64_t d, int64_t sa_b, int64_t sa_s, int64_t sb_b, int64_t sb_s, int64_t sy_b, int64_t sy_s,
                      T inv_theta, T cap, int64_t b_begin, int64_t b_end, T* sums) {
  Sample<T> m;
  for (int64_t b = b_begin; b < b_end; ++b) {
    m.load(anchor, anchor2, shuffled, b, s, d, sa_b, sa_s, sb_b, sb_s, sy_b, sy_s);
    shuffle_rank::rank_sample<T>((int)s, m.Gaa, m.Sap, m.Spp, perm + b * s, inv_theta, cap, T(0), &sums[0],
                                 &sums[2], nullptr, nullptr, nullptr);
    if (anchor2)
      shuffle_rank::rank_sample<T>((int)s, m.Gbb, m.Sbp, m.Spp, perm + b * s, inv_theta, cap, T(0), &sums[1],
                                   &sums[3], nullptr, nullptr, nullptr);
  }
}

template <typename T>
void shuffle_rank_bwd(const T* anchor, const T* anchor2, const T* shuffled, const int64_t* perm, int64_t s,
                      int64_t d, int64_t sa_b, int64_t sa_s, int64_t sb_b, int64_t sb_s, int64_t sy_b, int64_t sy_s,
                      T inv_theta, T cap, T gscale0, T gscale2, int64_t b_begin, int64_t b_end, T* d_anchor,
                      T* d_anchor2, T* d_shuffled) {
  Sample<T> m;
  T Haa[S * S], Hap[S * S], Hbb[S * S], Hbp[S * S], Hpp[S * S], r[S], coef[3 * S];
  for (int64_t b = b_begin; b < b_end; ++b) {
    m.load(anchor, anchor2, shuffled, b, s, d, sa_b, sa_s, sb_b, sb_s, sy_b, sy_s);
    std::fill(Haa, Haa + S * S, T(0));
    std::fill(Hap, Hap + S * S, T(0));
    std::fill(Hbb, Hbb + S * S, T(0));
    std::fill(Hbp, Hbp + S * S, T(0));
    std::fill(Hpp, Hpp + S * S, T(0));
    T unused_l = 0, unused_c = 0;
    shuffle_rank::rank_sample<T>((int)s, m.Gaa, m.Sap, m.Spp, perm + b * s, inv_theta, cap, gscale0, &unused_l,
                                 &unused_c, Haa, Hap, Hpp);
    if (anchor2)
      shuffle_rank::rank_sample<T>((int)s, m.Gbb, m.Sbp, m.Spp, perm + b * s, inv_theta, cap, gscale2, &unused_l,
                                   &unused_c, Hbb, Hbp, Hpp);
    // p_j . dL/dp_j, read off the Gram blocks (normalisation backward)
    for (int64_t j = 0; j < s; ++j) {
      T acc = 0;
      for (int64_t k = 0; k < s; ++k) acc += (Hpp[j * s + k] + Hpp[k * s + j]) * m.Spp[j * s + k];
      for (int64_t i = 0; i < s; ++i) acc += Hap[i * s + j] * m.Sap[i * s + j];
      if (anchor2)
        for (int64_t i = 0; i < s; ++i) acc += Hbp[i * s + j] * m.Sbp[i * s + j];
      r[j] = acc;
    }
    // dA_i = sum_k (Haa + Haa^T)[i,k] a_k + sum_j Hap[i,j] y_j / nu_j      (same for A2)
    for (int64_t i = 0; i < s; ++i) {
      for (int64_t k = 0; k < s; ++k) coef[k] = Haa[i * s + k] + Haa[k * s + i];
      for (int64_t j = 0; j < s; ++j) coef[s + j] = Hap[i * s + j] / m.nu[j];
      T* out = d_anchor + (b * s + i) * d;
      combine(out, coef, m.a, s, d, true);
      combine(out, coef + s, m.y, s, d, false);
      if (anchor2) {
        for (int64_t k = 0; k < s; ++k) coef[k] = Hbb[i * s + k] + Hbb[k * s + i];
        for (int64_t j = 0; j < s; ++j) coef[s + j] = Hbp[i * s + j] / m.nu[j];
        T* out2 = d_anchor2 + (b * s + i) * d;
        combine(out2, coef, m.a2, s, d, true);
        combine(out2, coef + s, m.y, s, d, false);
      }
    }
    // dy_j = (dp_j - p_j (p_j . dp_j)) / nu_j with dp_j = sum_k (Hpp + Hpp^T)[j,k] p_k + sum_i Hap[i,j] a_i
    for (int64_t j = 0; j < s; ++j) {
      const T nj = m.nu[j];
      for (int64_t k = 0; k < s; ++k) coef[k] = (Hpp[j * s + k] + Hpp[k * s + j]) / (nj * m.nu[k]);
      if (m.n[j] > T(kEps)) coef[j] -= r[j] / (nj * nj);  // below eps, p = y / eps is linear in y
      for (int64_t i = 0; i < s; ++i) coef[s + i] = Hap[i * s + j] / nj;
      for (int64_t i = 0; i < s; ++i) coef[2 * s + i] = anchor2 ? Hbp[i * s + j] / nj : T(0);
      T* out = d_shuffled + (b * s + j) * d;
      combine(out, coef, m.y, s, d, true);
      combine(out, coef + s, m.a, s, d, false);
      if (anchor2) combine(out, coef + 2 * s, m.a2, s, d, false);
    }
  }
}

#define DUALVAR_SR_INSTANTIATE(T)                                                                           \
  template void shuffle_rank_fwd<T>(const T*, const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, \
                                    int64_t, int64_t, int64_t, int64_t, int64_t, T, T, int64_t, int64_t, T*); \
  template void shuffle_rank_bwd<T>(const T*, const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, \
                                    int64_t, int64_t, int64_t, int64_t, int64_t, T, T, T, T, int64_t, int64_t, \
                                    T*, T*, T*);
DUALVAR_SR_INSTANTIATE(float)
DUALVAR_SR_INSTANTIATE(double)
#undef DUALVAR_SR_INSTANTIATE

}  // namespace cpu
}  // namespace dualvar
