// Shuffle-rank loss: the per-sample math shared by the CPU kernel (csrc/cpu/shuffle_rank.cpp) and the
// CUDA kernel (csrc/cuda/shuffle_rank.cu), and the description of the inputs both take.
// Raw pointers only, no torch headers. Formulation (kernels/shuffle_rank.py, docs/method.md §3 and §9):
// the shuffled rows y_j stay in stored order and anchor row i's counterpart is the y_j with
// perm[j] == i, so the calibration is part of the indexing (no scatter, no copy).
#pragma once
#include <cstdint>

#include "host_device.h"

namespace dualvar {
namespace shuffle_rank {

constexpr int kMaxS = 8;    // series per sample
constexpr int kMaxD = 512;  // series dim

// The inputs of one call: anchor, anchor2 (nullable) and shuffled are (B, s, d) with the given
// (batch, row) strides in elements and unit stride along d; perm is int64 contiguous (B, s).
// The element type is the caller's (the CPU kernel is a template, the CUDA launcher takes a code).
struct Inputs {
  const void* anchor;
  const void* anchor2;
  const void* shuffled;
  const int64_t* perm;
  int64_t B, s, d;
  int64_t anchor_stride_b, anchor_stride_s;
  int64_t anchor2_stride_b, anchor2_stride_s;
  int64_t shuffled_stride_b, shuffled_stride_s;
  double inv_theta, cap;
};

// Gradient outputs: contiguous (B, s, d) buffers of the input dtype; d_anchor2 is nullptr without anchor2.
struct Grads {
  void* d_anchor;
  void* d_anchor2;
  void* d_shuffled;
};

// Normalisation of a shuffled row y without overflow or underflow in its squared norm: with
// mx = max |y_t| and e its binary exponent, the kernels work on y_hat = y * 2^-e (an exact scaling,
// |y_hat| < 1), whose squared norm cannot overflow. p = y / max(|y|, eps) = y_hat / dv with
//   dv = |y_hat|          when |y| >= eps
//   dv = eps * 2^-e       otherwise (p = y / eps, linear in y)
// For inputs whose squared norm does not overflow, every Gram entry and gradient coefficient is
// bit-identical to the unscaled computation (the scaling is by a power of two).
template <typename T>
DUALVAR_HD int scale_exponent(T max_abs) {
  int e = hd::exponent_of(max_abs);
  const int lim = hd::ScaleRange<T>::kMax;
  return e > lim ? lim : (e < -lim ? -lim : e);
}

template <typename T>
struct RowNorm {
  T dv;           // divisor of y_hat: p = y_hat / dv
  T nu;           // max(|y|, eps) in the input's own scale (inf when |y| overflows T: 1/nu is then 0)
  bool above_eps; // |y| > eps: the normalisation's own gradient term applies
};

// sum_sq_hat = y_hat . y_hat, e = the scaling exponent of the row.
template <typename T>
DUALVAR_HD RowNorm<T> row_norm(T sum_sq_hat, int e, T eps) {
  const T nhat = hd::sqrt_rn(sum_sq_hat);
  const T n = nhat * hd::pow2(T(0), e);  // true norm; exact unless it overflows T
  RowNorm<T> r;
  if (!(n == n)) {  // NaN input: keep it NaN
    r.dv = r.nu = n;
    r.above_eps = false;
  } else if (n >= eps) {
    r.dv = nhat;
    r.nu = n;
    r.above_eps = n > eps;
  } else {
    r.dv = eps * hd::pow2(T(0), -e);
    r.nu = eps;
    r.above_eps = false;
  }
  return r;
}

// softplus(min(x, cap)), NaN for a NaN x (a plain min would turn NaN into cap).
template <typename Acc>
DUALVAR_HD Acc capped_softplus(Acc x, Acc cap) {
  const Acc z = (x < cap || x != x) ? x : cap;
  return (z > Acc(0) ? z : Acc(0)) + std::log1p(std::exp(-std::fabs(z)));
}

template <typename Acc>
DUALVAR_HD Acc sigmoid(Acc x) {
  if (x >= Acc(0)) return Acc(1) / (Acc(1) + std::exp(-x));
  const Acc e = std::exp(x);
  return e / (Acc(1) + e);
}

// One ranking term x = (negative - positive) / theta. Forward (!grad): adds its capped
// softplus to loss. Backward: adds g = gscale * sigmoid(x) [x <= cap] to H[idx] and to neg (the
// positive's total); a NaN x gives a NaN g. Both track whether the positive still ranks first (ok;
// a NaN x counts as not first, as torch's comparison does).
template <typename Acc>
DUALVAR_HD void rank_term(bool grad, Acc negative, Acc pos, Acc inv_theta, Acc cap, Acc gscale, Acc* H, int idx,
                          Acc& loss, Acc& neg, bool& ok) {
  const Acc x = (negative - pos) * inv_theta;
  ok = ok && x <= Acc(0);
  if (!grad) {
    loss += capped_softplus(x, cap);
  } else if (x <= cap || x != x) {
    const Acc g = gscale * sigmoid(x);
    H[idx] += g;
    neg += g;
  }
}

// One sample, one anchor set. Inputs (row-major s x s): Gaa = A A^T, Sap[i*s+j] = a_i . p_j,
// Spp = P P^T (p_j = y_j / nu_j, stored order), sigma = perm row (slot of y_j).
// Forward (Haa, Hap, Hpp all nullptr): adds the sum of the capped softplus terms to *loss and the
// number of rows whose counterpart beats every negative (ties count as correct) to *correct. With
// Haa != nullptr also accumulates dL/dS with g = gscale * sigmoid(x) [x <= cap]:
// Haa += dL/dS_AA, Hap += dL/dS_AP, Hpp += dL/dS_PP.
template <typename Acc>
DUALVAR_HD void rank_sample(int s, const Acc* Gaa, const Acc* Sap, const Acc* Spp, const int64_t* sigma,
                            Acc inv_theta, Acc cap, Acc gscale, Acc* loss, Acc* correct, Acc* Haa, Acc* Hap,
                            Acc* Hpp) {
  int cp[kMaxS];  // counterpart (shuffled row) of anchor row i
  int sg[kMaxS];  // slot of shuffled row j; out-of-range values (not a permutation) stay memory-safe
  for (int i = 0; i < s; ++i) cp[i] = 0;
  for (int j = 0; j < s; ++j) {
    sg[j] = (sigma[j] >= 0 && sigma[j] < s) ? (int)sigma[j] : 0;
    cp[sg[j]] = j;
  }
  const bool grad = Haa != nullptr;
  Acc l = 0, c = 0;
  for (int i = 0; i < s; ++i) {  // anchor rows
    const Acc pos = Sap[i * s + cp[i]];
    Acc neg = 0;
    bool ok = true;
    for (int k = 0; k < s; ++k) {
      if (k == i) continue;
      rank_term(grad, Gaa[i * s + k], pos, inv_theta, cap, gscale, Haa, i * s + k, l, neg, ok);
    }
    for (int j = 0; j < s; ++j) {
      if (j == cp[i]) continue;
      rank_term(grad, Sap[i * s + j], pos, inv_theta, cap, gscale, Hap, i * s + j, l, neg, ok);
    }
    if (grad) Hap[i * s + cp[i]] -= neg;
    c += ok ? Acc(1) : Acc(0);
  }
  for (int j = 0; j < s; ++j) {  // shuffled rows
    const int i0 = sg[j];
    const Acc pos = Sap[i0 * s + j];
    Acc neg = 0;
    bool ok = true;
    for (int k = 0; k < s; ++k) {
      if (k == j) continue;
      rank_term(grad, Spp[j * s + k], pos, inv_theta, cap, gscale, Hpp, j * s + k, l, neg, ok);
    }
    for (int i = 0; i < s; ++i) {
      if (i == i0) continue;
      rank_term(grad, Sap[i * s + j], pos, inv_theta, cap, gscale, Hap, i * s + j, l, neg, ok);
    }
    if (grad) Hap[i0 * s + j] -= neg;
    c += ok ? Acc(1) : Acc(0);
  }
  *loss += l;
  *correct += c;
}

}  // namespace shuffle_rank
}  // namespace dualvar
