// Shuffle-rank loss kernels (CPU) and the per-sample math shared with the CUDA kernel.
// Raw pointers only, no torch headers. See kernels/shuffle_rank.py for the formulation:
// the shuffled rows y_j stay in stored order and anchor row i's counterpart is the y_j with
// perm[j] == i, so the calibration is part of the indexing (no scatter, no copy).
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SR_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define SR_HD inline __attribute__((always_inline))
#else
#define SR_HD inline
#endif

namespace dualvar {
namespace shuffle_rank {

constexpr int kMaxS = 8;

template <typename Acc>
SR_HD Acc capped_softplus(Acc x, Acc cap) {
  const Acc z = x < cap ? x : cap;
  return (z > Acc(0) ? z : Acc(0)) + std::log1p(std::exp(-std::fabs(z)));
}

template <typename Acc>
SR_HD Acc sigmoid(Acc x) {
  if (x >= Acc(0)) return Acc(1) / (Acc(1) + std::exp(-x));
  const Acc e = std::exp(x);
  return e / (Acc(1) + e);
}

// One ranking term x = (negative - positive) / theta. Forward (!grad): adds its capped
// softplus to loss. Backward: adds g = gscale * sigmoid(x) [x <= cap] to H[idx] and to neg (the
// positive's total). Both track whether the positive still ranks first (ok).
template <typename Acc>
SR_HD void rank_term(bool grad, Acc negative, Acc pos, Acc inv_theta, Acc cap, Acc gscale, Acc* H, int idx,
                     Acc& loss, Acc& neg, bool& ok) {
  const Acc x = (negative - pos) * inv_theta;
  ok = ok && !(x > Acc(0));
  if (!grad) {
    loss += capped_softplus(x, cap);
  } else if (x <= cap) {
    const Acc g = gscale * sigmoid(x);
    H[idx] += g;
    neg += g;
  }
}

// One sample, one anchor set. Inputs (row-major s x s): Gaa = A A^T, Sap[i*s+j] = a_i . p_j,
// Spp = P P^T (p_j = y_j / nu_j, stored order), sigma = perm row (slot of y_j).
// Forward (Haa, Hap, Hpp all nullptr): adds the sum of the capped softplus terms to *loss and the number of rows whose counterpart
// beats every negative (ties count as correct) to *correct. With Haa != nullptr also accumulates
// dL/dS with g = gscale * sigmoid(x) [x <= cap]:  Haa += dL/dS_AA, Hap += dL/dS_AP, Hpp += dL/dS_PP.
template <typename Acc>
SR_HD void rank_sample(int s, const Acc* Gaa, const Acc* Sap, const Acc* Spp, const int64_t* sigma,
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

namespace cpu {

// Forward over samples [b_begin, b_end). anchor, anchor2 (nullable), shuffled: (B, s, d) with
// row strides (stride_b, stride_s) and unit stride along d; perm int64 contiguous (B, s).
// Accumulates into sums[4] = {sum terms anchor, sum terms anchor2, correct rows anchor, anchor2}
// (unscaled; the binding applies the weights).
template <typename T>
void shuffle_rank_fwd(const T* anchor, const T* anchor2, const T* shuffled, const int64_t* perm, int64_t s,
                      int64_t d, int64_t sa_b, int64_t sa_s, int64_t sb_b, int64_t sb_s, int64_t sy_b, int64_t sy_s,
                      T inv_theta, T cap, int64_t b_begin, int64_t b_end, T* sums);

// Backward over samples [b_begin, b_end): writes contiguous (B, s, d) gradients d_anchor,
// d_anchor2 (nullable), d_shuffled. gscale0/gscale2 = upstream grad * weight / (theta * n_terms).
template <typename T>
void shuffle_rank_bwd(const T* anchor, const T* anchor2, const T* shuffled, const int64_t* perm, int64_t s,
                      int64_t d, int64_t sa_b, int64_t sa_s, int64_t sb_b, int64_t sb_s, int64_t sy_b, int64_t sy_s,
                      T inv_theta, T cap, T gscale0, T gscale2, int64_t b_begin, int64_t b_end, T* d_anchor,
                      T* d_anchor2, T* d_shuffled);

}  // namespace cpu
}  // namespace dualvar
