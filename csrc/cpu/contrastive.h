// Fused contrastive primitive, CPU kernels (declarations): the elementwise work on one similarity
// tile at a time; the tile product itself is a BLAS call made by the binding (csrc/contrastive.cpp),
// which also owns the tile loops. Raw pointers, no torch headers. T is float or double.
//
// A tile holds S[r, c] = q[r0 + r] . k[c0 + c] for r < nr, c < nc, row stride ld. Row r's excluded
// column (self-similarity) is c = r + diag when 0 <= r + diag < nc; pass has_diag = false for none.
// Running row statistics: m[r] (max of scale * S over the columns seen) and l[r] (sum of
// exp(scale * S - m[r])); a NaN similarity makes both NaN for good.
#pragma once
#include <cstdint>

namespace dualvar {
namespace cpu {

// Online log-sum-exp update of the tile's rows.
template <typename T>
void lse_tile_update(const T* S, int64_t ld, int64_t nr, int64_t nc, T scale, bool has_diag, int64_t diag,
                     T* m, T* l);

// Symmetric case (S = Z_I Z_J^T of one matrix Z, I != J, no excluded entry): updates the rows of I
// (m_r, l_r) and the rows of J, i.e. the tile's columns (m_c, l_c), from one pass over the tile and
// one exponential per entry (shared shift: the tile's max). Tiles whose scaled range exceeds what
// one shift covers without underflow, or holding a NaN, take two passes per side instead.
// work: scratch of max(3 * nc, nc + nr) values.
template <typename T>
void lse_tile_symmetric(const T* S, int64_t ld, int64_t nr, int64_t nc, T scale, T* m_r, T* l_r, T* m_c, T* l_c,
                        T* work);

// In place: S[r, c] <- g[r] * scale * exp(scale * S[r, c] - lse[r])   (0 at the excluded column).
template <typename T>
void grad_tile(T* S, int64_t ld, int64_t nr, int64_t nc, T scale, bool has_diag, int64_t diag, const T* lse,
               const T* g);

// Symmetric form for a tile pair (I, J) of one matrix Z: in place
//   S[r, c] <- scale * (g_r[r] exp(scale S - lse_r[r]) + g_c[c] exp(scale S - lse_c[c]))
// i.e. G_IJ + G_JI^T, with the diagonal of a diagonal tile (has_diag, I = J) set to 0. One
// exponential per entry (shared shift, as lse_tile_symmetric) where the tile's range allows.
// work: nc scratch values.
template <typename T>
void grad_tile_symmetric(T* S, int64_t ld, int64_t nr, int64_t nc, T scale, bool has_diag, const T* lse_r,
                         const T* g_r, const T* lse_c, const T* g_c, T* work);

}  // namespace cpu
}  // namespace dualvar
