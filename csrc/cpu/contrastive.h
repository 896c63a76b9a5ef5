// Elementwise parts of the fused contrastive loss on CPU, applied to one similarity tile at a time
// (the tile product itself is a BLAS call made by the binding, csrc/contrastive.cpp).
// Raw pointers, no torch headers. T is float or double.
//
// A tile holds S[r, c] = q[r0 + r] . k[c0 + c] for r < nr, c < nc, row stride ld. Row r's excluded
// column (self-similarity) is c = r + diag when 0 <= r + diag < nc; pass has_diag = false for none.
#pragma once
#include <cstdint>

namespace dualvar {
namespace cpu {

// Online log-sum-exp update of rows: m[r], l[r] hold the running max and sum of exp(scale*S - m).
template <typename T>
void lse_tile_update(const T* S, int64_t ld, int64_t nr, int64_t nc, T scale, bool has_diag, int64_t diag,
                     T* m, T* l);

// In place: S[r, c] <- g[r] * scale * exp(scale * S[r, c] - lse[r])   (0 at the excluded column).
template <typename T>
void grad_tile(T* S, int64_t ld, int64_t nr, int64_t nc, T scale, bool has_diag, int64_t diag, const T* lse,
               const T* g);

// Symmetric form for a tile pair (I, J) of one matrix Z: in place
//   S[r, c] <- scale * (g_r[r] exp(scale S - lse_r[r]) + g_c[c] exp(scale S - lse_c[c]))
// i.e. G_IJ + G_JI^T, with the diagonal of a diagonal tile (diag = 0) set to 0.
template <typename T>
void grad_tile_symmetric(T* S, int64_t ld, int64_t nr, int64_t nc, T scale, bool has_diag, const T* lse_r,
                         const T* g_r, const T* lse_c, const T* g_c);

}  // namespace cpu
}  // namespace dualvar
