// Shuffle-rank loss, CPU kernels: per sample, scale each shuffled row by a power of two (its squared
// norm cannot overflow), accumulate the raw Gram blocks over d, rescale by the shuffled rows' norms
// (normalisation folded into the Gram entries), rank, and for the backward write each gradient row as
// a short linear combination of input rows. Plain C++, no torch headers.
#include "shuffle_rank.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace dualvar {
namespace cpu {
namespace {

constexpr int S = shuffle_rank::kMaxS;
constexpr int kMaxD = shuffle_rank::kMaxD;
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

// True when every x[0:d] is finite (x * 0 is NaN exactly for NaN and +-inf).
template <typename T>
bool all_finite(const T* x, int64_t d) {
  T acc = 0;
  for (int64_t t = 0; t < d; ++t) acc += x[t] * T(0);
  return acc == acc;
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

// Per-sample Gram blocks: Gaa = A A^T, Gbb = A2 A2^T, Sap = A P^T, Sbp = A2 P^T, Spp = P P^T, with
// p_j = y_hat_j / dv_j (y_hat_j = y_j * 2^-e_j, see shuffle_rank::row_norm), the norms, and whether
// any input row holds a NaN or inf (bad).
template <typename T>
struct Sample {
  T Gaa[S * S], Gbb[S * S], Sap[S * S], Sbp[S * S], Spp[S * S];
  shuffle_rank::RowNorm<T> norm[S];
  T yh[S * kMaxD];
  const T* a[S];
  const T* a2[S];
  const T* y[S];  // rows of yh
  bool bad;

  void load(const shuffle_rank::Inputs& in, int64_t b) {
    const int64_t s = in.s, d = in.d;
    const T* anchor = static_cast<const T*>(in.anchor);
    const T* anchor2 = static_cast<const T*>(in.anchor2);
    const T* shuffled = static_cast<const T*>(in.shuffled);
    bad = false;
    for (int64_t i = 0; i < s; ++i) {
      a[i] = anchor + b * in.anchor_stride_b + i * in.anchor_stride_s;
      a2[i] = anchor2 ? anchor2 + b * in.anchor2_stride_b + i * in.anchor2_stride_s : nullptr;
      bad = bad || !all_finite(a[i], d) || (anchor2 && !all_finite(a2[i], d));
    }
    for (int64_t j = 0; j < s; ++j) {
      const T* row = shuffled + b * in.shuffled_stride_b + j * in.shuffled_stride_s;
      bad = bad || !all_finite(row, d);
      T mx = 0;
      for (int64_t t = 0; t < d; ++t) mx = std::max(mx, std::fabs(row[t]));
      const int e = shuffle_rank::scale_exponent<T>(mx);
      const T f = hd::pow2(T(0), -e);
      T* out = yh + j * d;
      for (int64_t t = 0; t < d; ++t) out[t] = row[t] * f;
      y[j] = out;
      norm[j] = shuffle_rank::row_norm<T>(dot(out, out, d), e, T(kEps));
    }
    for (int64_t i = 0; i < s; ++i)
      for (int64_t j = 0; j < s; ++j) {
        Gaa[i * s + j] = j >= i ? dot(a[i], a[j], d) : Gaa[j * s + i];
        Spp[i * s + j] = j >= i ? dot(y[i], y[j], d) / (norm[i].dv * norm[j].dv) : Spp[j * s + i];
        Sap[i * s + j] = dot(a[i], y[j], d) / norm[j].dv;
        if (anchor2) {
          Gbb[i * s + j] = j >= i ? dot(a2[i], a2[j], d) : Gbb[j * s + i];
          Sbp[i * s + j] = dot(a2[i], y[j], d) / norm[j].dv;
        }
      }
  }
};

}  // namespace

template <typename T>
void shuffle_rank_fwd(const shuffle_rank::Inputs& in, int64_t b_begin, int64_t b_end, T sums[4]) {
  const int s = (int)in.s;
  const T inv_theta = (T)in.inv_theta, cap = (T)in.cap;
  const bool two = in.anchor2 != nullptr;
  Sample<T> m;
  for (int64_t b = b_begin; b < b_end; ++b) {
    m.load(in, b);
    shuffle_rank::rank_sample<T>(s, m.Gaa, m.Sap, m.Spp, in.perm + b * s, inv_theta, cap, T(0), &sums[0], &sums[2],
                                 nullptr, nullptr, nullptr);
    if (two)
      shuffle_rank::rank_sample<T>(s, m.Gbb, m.Sbp, m.Spp, in.perm + b * s, inv_theta, cap, T(0), &sums[1],
                                   &sums[3], nullptr, nullptr, nullptr);
    if (m.bad) {  // NaN in, NaN out (an inf can otherwise cancel into finite, capped terms)
      sums[0] = std::numeric_limits<T>::quiet_NaN();
      if (two) sums[1] = std::numeric_limits<T>::quiet_NaN();
    }
  }
}

template <typename T>
void shuffle_rank_bwd(const shuffle_rank::Inputs& in, T gscale0, T gscale2, const shuffle_rank::Grads& grads,
                      int64_t b_begin, int64_t b_end) {
  const int64_t s = in.s, d = in.d;
  const T inv_theta = (T)in.inv_theta, cap = (T)in.cap;
  const bool two = in.anchor2 != nullptr;
  T* d_anchor = static_cast<T*>(grads.d_anchor);
  T* d_anchor2 = static_cast<T*>(grads.d_anchor2);
  T* d_shuffled = static_cast<T*>(grads.d_shuffled);
  Sample<T> m;
  T Haa[S * S], Hap[S * S], Hbb[S * S], Hbp[S * S], Hpp[S * S], r[S], coef[3 * S];
  for (int64_t b = b_begin; b < b_end; ++b) {
    m.load(in, b);
    if (m.bad) {
      const T nan = std::numeric_limits<T>::quiet_NaN();
      std::fill(d_anchor + b * s * d, d_anchor + (b + 1) * s * d, nan);
      if (two) std::fill(d_anchor2 + b * s * d, d_anchor2 + (b + 1) * s * d, nan);
      std::fill(d_shuffled + b * s * d, d_shuffled + (b + 1) * s * d, nan);
      continue;
    }
    std::fill(Haa, Haa + S * S, T(0));
    std::fill(Hap, Hap + S * S, T(0));
    std::fill(Hbb, Hbb + S * S, T(0));
    std::fill(Hbp, Hbp + S * S, T(0));
    std::fill(Hpp, Hpp + S * S, T(0));
    T unused_l = 0, unused_c = 0;
    shuffle_rank::rank_sample<T>((int)s, m.Gaa, m.Sap, m.Spp, in.perm + b * s, inv_theta, cap, gscale0, &unused_l,
                                 &unused_c, Haa, Hap, Hpp);
    if (two)
      shuffle_rank::rank_sample<T>((int)s, m.Gbb, m.Sbp, m.Spp, in.perm + b * s, inv_theta, cap, gscale2,
                                   &unused_l, &unused_c, Hbb, Hbp, Hpp);
    // p_j . dL/dp_j, read off the Gram blocks (normalisation backward)
    for (int64_t j = 0; j < s; ++j) {
      T acc = 0;
      for (int64_t k = 0; k < s; ++k) acc += (Hpp[j * s + k] + Hpp[k * s + j]) * m.Spp[j * s + k];
      for (int64_t i = 0; i < s; ++i) acc += Hap[i * s + j] * m.Sap[i * s + j];
      if (two)
        for (int64_t i = 0; i < s; ++i) acc += Hbp[i * s + j] * m.Sbp[i * s + j];
      r[j] = acc;
    }
    // dA_i = sum_k (Haa + Haa^T)[i,k] a_k + sum_j Hap[i,j] p_j, p_j = y_hat_j / dv_j      (same for A2)
    for (int64_t i = 0; i < s; ++i) {
      for (int64_t k = 0; k < s; ++k) coef[k] = Haa[i * s + k] + Haa[k * s + i];
      for (int64_t j = 0; j < s; ++j) coef[s + j] = Hap[i * s + j] / m.norm[j].dv;
      T* out = d_anchor + (b * s + i) * d;
      combine(out, coef, m.a, s, d, true);
      combine(out, coef + s, m.y, s, d, false);
      if (two) {
        for (int64_t k = 0; k < s; ++k) coef[k] = Hbb[i * s + k] + Hbb[k * s + i];
        for (int64_t j = 0; j < s; ++j) coef[s + j] = Hbp[i * s + j] / m.norm[j].dv;
        T* out2 = d_anchor2 + (b * s + i) * d;
        combine(out2, coef, m.a2, s, d, true);
        combine(out2, coef + s, m.y, s, d, false);
      }
    }
    // dy_j = (dp_j - p_j (p_j . dp_j)) / nu_j with dp_j = sum_k (Hpp + Hpp^T)[j,k] p_k + sum_i Hap[i,j] a_i,
    // written on the scaled rows: p_k = y_hat_k / dv_k.
    for (int64_t j = 0; j < s; ++j) {
      const T nj = m.norm[j].nu;
      for (int64_t k = 0; k < s; ++k) coef[k] = (Hpp[j * s + k] + Hpp[k * s + j]) / (nj * m.norm[k].dv);
      if (m.norm[j].above_eps) coef[j] -= r[j] / (nj * m.norm[j].dv);  // below eps, p = y / eps is linear in y
      for (int64_t i = 0; i < s; ++i) coef[s + i] = Hap[i * s + j] / nj;
      for (int64_t i = 0; i < s; ++i) coef[2 * s + i] = two ? Hbp[i * s + j] / nj : T(0);
      T* out = d_shuffled + (b * s + j) * d;
      combine(out, coef, m.y, s, d, true);
      combine(out, coef + s, m.a, s, d, false);
      if (two) combine(out, coef + 2 * s, m.a2, s, d, false);
    }
  }
}

#define DUALVAR_SR_INSTANTIATE(T)                                                                           \
  template void shuffle_rank_fwd<T>(const shuffle_rank::Inputs&, int64_t, int64_t, T*);                    \
  template void shuffle_rank_bwd<T>(const shuffle_rank::Inputs&, T, T, const shuffle_rank::Grads&, int64_t, \
                                    int64_t);
DUALVAR_SR_INSTANTIATE(float)
DUALVAR_SR_INSTANTIATE(double)
#undef DUALVAR_SR_INSTANTIATE

}  // namespace cpu
}  // namespace dualvar
