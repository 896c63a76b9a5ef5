// torch.ops.dualvar.contrastive_fwd / contrastive_bwd / contrastive_bwd_sym: the fused contrastive
// primitive (masked row log-sum-exp of q k^T / tau and its backward): schemas, input checks,
// allocation, the CPU tile loops and the CUDA device guard and stream. Kernels: csrc/cpu/contrastive.cpp
// (the elementwise work on one similarity tile), csrc/cuda/contrastive.cu.
//
// The CPU path tiles the similarity matrix: each tile product is a BLAS call (at::mm_out into a
// per-thread buffer), the exponentials and sums are fused over the tile by csrc/cpu/contrastive.cpp,
// and no rows x columns tensor ever exists. Parallel over row blocks (or tile pairs) with OpenMP;
// BLAS inside a parallel region runs single-threaded.
//
//   contrastive_fwd(q (R,D), k (C,D), temperature, exclude_offset?) -> lse (R,)
//       lse[r] = log sum_{c != r + offset} exp(q[r] . k[c] / temperature); q is k with offset 0: symmetric tiles
//   contrastive_bwd(q, k, lse, grad (R,), temperature, exclude_offset?, need_q, need_k) -> (dq, dk)
//   contrastive_bwd_sym(z (M,D), lse (M,), grad (M,), temperature) -> dz     (q = k = z, self excluded)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <utility>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "check_launch.h"
#include "cpu/contrastive.h"
#ifdef DUALVAR_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/contrastive.h"
#endif

namespace dualvar {
namespace {

constexpr int64_t kRowBlock = 256;   // rows per CPU tile
constexpr int64_t kColBlock = 1024;  // columns per CPU tile
constexpr int64_t kSymBlock = 512;   // square tiles of the symmetric forward and backward

// ------------------------------------------------------------------------------------ input checks
void check_features(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D (rows, dim), got ", x.dim(), "-D ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), op, ": ", name, " must be floating point, got ", x.scalar_type());
}

void check_pair(const at::Tensor& q, const at::Tensor& k, const char* op) {
  check_features(q, "q", op);
  check_features(k, "k", op);
  TORCH_CHECK(q.size(1) == k.size(1), op, ": q and k must have the same dim (columns), got ", q.size(1), " and ",
              k.size(1));
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k is ", k.scalar_type(), " but q is ", q.scalar_type(),
              "; use one dtype");
  TORCH_CHECK(k.device() == q.device(), op, ": k must be on q's device ", q.device(), ", got ", k.device());
}

void check_temperature(double temperature, const char* op) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be positive and finite, got ",
              temperature);
}

void check_rowvec(const at::Tensor& v, int64_t n, const at::Tensor& like, const char* name, const char* op) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, op, ": ", name, " must be 1-D with one value per row, (", n,
              ",), got ", v.sizes());
  TORCH_CHECK(v.is_floating_point(), op, ": ", name, " must be floating point, got ", v.scalar_type());
  TORCH_CHECK(v.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", v.device());
}

// The shared checks of contrastive_bwd (CPU and CUDA): q/k pair, temperature, and lse/grad per row of q.
void check_bwd_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, const at::Tensor& grad,
                      double temperature, const char* op) {
  check_pair(q, k, op);
  check_temperature(temperature, op);
  check_rowvec(lse, q.size(0), q, "lse", op);
  check_rowvec(grad, q.size(0), q, "grad", op);
}

// The shared checks of contrastive_bwd_sym (CPU and CUDA): z, temperature, and lse/grad per row of z.
void check_bwd_sym_inputs(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& grad, double temperature,
                          const char* op) {
  check_features(z, "z", op);
  check_temperature(temperature, op);
  check_rowvec(lse, z.size(0), z, "lse", op);
  check_rowvec(grad, z.size(0), z, "grad", op);
}

// ------------------------------------------------------------------------------------ CPU
int num_threads() {
#ifdef _OPENMP
  return std::max(1, at::get_num_threads());
#else
  return 1;
#endif
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Float and double compute in their own type; half types are widened to float (O(rows x dim) copy).
// Contiguous, so every tile view below is a plain row-major block. Detached: the ATen calls below
// run on OpenMP worker threads, whose grad mode is their own.
at::Tensor compute_view(const at::Tensor& x) {
  auto t = x.detach();
  return (t.scalar_type() == at::kDouble ? t : t.to(at::kFloat)).contiguous();
}

// An exception must not leave an OpenMP region: keep the first one and rethrow after the region.
struct FirstError {
  std::exception_ptr error;
  template <typename F>
  void run(F&& f) {
    try {
      f();
    } catch (...) {
#pragma omp critical(dualvar_first_error)
      if (!error) error = std::current_exception();
    }
  }
  void rethrow() {
    if (error) std::rethrow_exception(error);
  }
};

template <typename T>
T finish_lse(T m, T l) {
  return l > 0 ? m + std::log(l) : m;
}

// General case (any q, k, optional excluded diagonal): parallel over row blocks of kRowBlock rows,
// each streaming column blocks of kColBlock with an online log-sum-exp.
template <typename T>
at::Tensor contrastive_fwd_cpu_impl(const at::Tensor& q, const at::Tensor& k, double temperature,
                                    c10::optional<int64_t> offset) {
  const int64_t R = q.size(0), C = k.size(0);
  auto lse = at::empty({R}, q.options());
  T* lse_p = lse.data_ptr<T>();
  const T scale = T(1.0 / temperature);
  const int64_t bc = std::max<int64_t>(1, std::min(C, kColBlock));
  const int64_t n_blocks = (R + kRowBlock - 1) / kRowBlock;
  FirstError errors;
#pragma omp parallel num_threads(num_threads())
  {
    auto tile_buf = at::empty({kRowBlock * bc}, q.options());
    std::vector<T> m(kRowBlock), l(kRowBlock);
#pragma omp for schedule(dynamic)
    for (int64_t ib = 0; ib < n_blocks; ++ib) errors.run([&] {
      const int64_t r0 = ib * kRowBlock, nr = std::min(kRowBlock, R - r0);
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      auto q_blk = q.narrow(0, r0, nr);
      for (int64_t c0 = 0; c0 < C; c0 += bc) {
        const int64_t nc = std::min(bc, C - c0);
        auto tile = tile_buf.narrow(0, 0, nr * nc).view({nr, nc});
        at::mm_out(tile, q_blk, k.narrow(0, c0, nc).t());
        cpu::lse_tile_update<T>(tile.data_ptr<T>(), nc, nr, nc, scale, offset.has_value(),
                                offset.has_value() ? r0 + *offset - c0 : 0, m.data(), l.data());
      }
      for (int64_t r = 0; r < nr; ++r) lse_p[r0 + r] = finish_lse(m[r], l[r]);
    });
  }
  errors.rethrow();
  return lse;
}

// body(tid, i0, ni, j0, nj, tile, work) for every tile pair I <= J of z z^T (square tiles of kSymBlock
// rows), in parallel over pairs; tile = z[i0 : i0+ni] z[j0 : j0+nj]^T in a per-thread buffer, work a
// per-thread scratch of 4 * kSymBlock values.
template <typename T, typename F>
void for_each_symmetric_tile(const at::Tensor& z, int nt, F&& body) {
  const int64_t M = z.size(0);
  const int64_t bs = std::min(M, kSymBlock);
  const int64_t nb = (M + bs - 1) / bs;
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t j = i; j < nb; ++j) pairs.emplace_back(i, j);
  FirstError errors;
#pragma omp parallel num_threads(nt)
  {
    auto tile_buf = at::empty({bs * bs}, z.options());
    std::vector<T> work(4 * bs);
    const int tid = thread_id();
#pragma omp for schedule(dynamic)
    for (int64_t p = 0; p < (int64_t)pairs.size(); ++p) errors.run([&] {
      const int64_t i0 = pairs[p].first * bs, j0 = pairs[p].second * bs;
      const int64_t ni = std::min(bs, M - i0), nj = std::min(bs, M - j0);
      auto tile = tile_buf.narrow(0, 0, ni * nj).view({ni, nj});
      at::mm_out(tile, z.narrow(0, i0, ni), z.narrow(0, j0, nj).t());
      body(tid, i0, ni, j0, nj, tile, work.data());
    });
  }
  errors.rethrow();
}

// SimCLR's case (q = k = z, self excluded): the similarity matrix is symmetric, so each tile pair
// I <= J is multiplied once and serves the rows of I (tile rows) and the rows of J (tile columns).
// An off-diagonal tile takes one exponential per entry for both (cpu::lse_tile_symmetric). Each
// thread keeps running (max, sum) for every row; the partials merge at the end. Half the BLAS work
// and half the exponentials of the row-block path.
template <typename T>
at::Tensor contrastive_fwd_sym_cpu_impl(const at::Tensor& z, double temperature) {
  const int64_t M = z.size(0);
  const T scale = T(1.0 / temperature);
  const int nt = num_threads();
  std::vector<std::vector<T>> m(nt, std::vector<T>(M, -std::numeric_limits<T>::infinity()));
  std::vector<std::vector<T>> l(nt, std::vector<T>(M, T(0)));
  for_each_symmetric_tile<T>(z, nt, [&](int tid, int64_t i0, int64_t ni, int64_t j0, int64_t nj, at::Tensor& tile,
                                        T* work) {
    T* mt = m[tid].data();
    T* lt = l[tid].data();
    if (i0 == j0)
      cpu::lse_tile_update<T>(tile.data_ptr<T>(), nj, ni, nj, scale, true, 0, mt + i0, lt + i0);
    else
      cpu::lse_tile_symmetric<T>(tile.data_ptr<T>(), nj, ni, nj, scale, mt + i0, lt + i0, mt + j0, lt + j0, work);
  });
  auto lse = at::empty({M}, z.options());
  T* lse_p = lse.data_ptr<T>();
  for (int64_t r = 0; r < M; ++r) {
    T mr = -std::numeric_limits<T>::infinity();
    bool nan = false;
    for (int t = 0; t < nt; ++t) {
      nan |= std::isnan(m[t][r]) || std::isnan(l[t][r]);
      mr = std::max(mr, m[t][r]);
    }
    T lr = 0;
    if (mr != -std::numeric_limits<T>::infinity())
      for (int t = 0; t < nt; ++t) lr += l[t][r] * std::exp(m[t][r] - mr);
    lse_p[r] = nan ? std::numeric_limits<T>::quiet_NaN() : finish_lse(mr, lr);
  }
  return lse;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> contrastive_bwd_cpu_impl(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& lse, const at::Tensor& grad,
                                                            double temperature, c10::optional<int64_t> offset,
                                                            bool need_q, bool need_k) {
  const int64_t R = q.size(0), C = k.size(0);
  const T scale = T(1.0 / temperature);
  const int nt = num_threads();
  at::Tensor dq = need_q ? at::zeros_like(q) : at::Tensor();
  std::vector<at::Tensor> dk_parts(need_k ? nt : 0);
  for (int t = 0; t < (int)dk_parts.size(); ++t) dk_parts[t] = at::zeros_like(k);
  const int64_t bc = std::max<int64_t>(1, std::min(C, kColBlock));
  const int64_t n_blocks = (R + kRowBlock - 1) / kRowBlock;
  FirstError errors;
#pragma omp parallel num_threads(nt)
  {
    auto tile_buf = at::empty({kRowBlock * bc}, q.options());
    const int tid = thread_id();
#pragma omp for schedule(dynamic)
    for (int64_t ib = 0; ib < n_blocks; ++ib) errors.run([&] {
      const int64_t r0 = ib * kRowBlock, nr = std::min(kRowBlock, R - r0);
      auto q_blk = q.narrow(0, r0, nr);
      for (int64_t c0 = 0; c0 < C; c0 += bc) {
        const int64_t nc = std::min(bc, C - c0);
        auto tile = tile_buf.narrow(0, 0, nr * nc).view({nr, nc});
        auto k_blk = k.narrow(0, c0, nc);
        at::mm_out(tile, q_blk, k_blk.t());
        cpu::grad_tile<T>(tile.data_ptr<T>(), nc, nr, nc, scale, offset.has_value(),
                          offset.has_value() ? r0 + *offset - c0 : 0, lse.data_ptr<T>() + r0,
                          grad.data_ptr<T>() + r0);
        if (need_q) dq.narrow(0, r0, nr).addmm_(tile, k_blk);
        if (need_k) dk_parts[tid].narrow(0, c0, nc).addmm_(tile.t(), q_blk);
      }
    });
  }
  errors.rethrow();
  at::Tensor dk;
  if (need_k) {
    dk = dk_parts[0];
    for (int t = 1; t < nt; ++t) dk.add_(dk_parts[t]);
  }
  return {dq, dk};
}

// dz_a = sum_b (G_ab + G_ba) z_b over tile pairs I <= J of the symmetric similarity matrix: one tile
// product and one pair of updates serve both (I, J) and (J, I).
template <typename T>
at::Tensor contrastive_bwd_sym_cpu_impl(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& grad,
                                        double temperature) {
  const T scale = T(1.0 / temperature);
  const int nt = num_threads();
  std::vector<at::Tensor> parts(nt);
  for (int t = 0; t < nt; ++t) parts[t] = at::zeros_like(z);
  const T* lse_p = lse.data_ptr<T>();
  const T* g_p = grad.data_ptr<T>();
  for_each_symmetric_tile<T>(z, nt, [&](int tid, int64_t i0, int64_t ni, int64_t j0, int64_t nj, at::Tensor& tile,
                                        T* work) {
    cpu::grad_tile_symmetric<T>(tile.data_ptr<T>(), nj, ni, nj, scale, i0 == j0, lse_p + i0, g_p + i0, lse_p + j0,
                                g_p + j0, work);
    parts[tid].narrow(0, i0, ni).addmm_(tile, z.narrow(0, j0, nj));
    if (i0 != j0) parts[tid].narrow(0, j0, nj).addmm_(tile.t(), z.narrow(0, i0, ni));
  });
  for (int t = 1; t < nt; ++t) parts[0].add_(parts[t]);
  return parts[0];
}

at::Tensor contrastive_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in, double temperature,
                               c10::optional<int64_t> offset) {
  const char* op = "contrastive_fwd";
  check_pair(q_in, k_in, op);
  check_temperature(temperature, op);
  const bool same = q_in.is_same(k_in);
  auto q = compute_view(q_in);
  auto k = same ? q : compute_view(k_in);
  if (same && offset == 0 && q.size(0) > 0) {
    if (q.scalar_type() == at::kDouble) return contrastive_fwd_sym_cpu_impl<double>(q, temperature);
    return contrastive_fwd_sym_cpu_impl<float>(q, temperature);
  }
  if (q.scalar_type() == at::kDouble) return contrastive_fwd_cpu_impl<double>(q, k, temperature, offset);
  return contrastive_fwd_cpu_impl<float>(q, k, temperature, offset);
}

std::tuple<at::Tensor, at::Tensor> contrastive_bwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& lse, const at::Tensor& grad,
                                                       double temperature, c10::optional<int64_t> offset, bool need_q,
                                                       bool need_k) {
  const char* op = "contrastive_bwd";
  check_bwd_inputs(q_in, k_in, lse, grad, temperature, op);
  const bool same = q_in.is_same(k_in);
  auto q = compute_view(q_in);
  auto k = same ? q : compute_view(k_in);
  auto l = lse.to(q.scalar_type()).contiguous();
  auto g = grad.to(q.scalar_type()).contiguous();
  if (q.scalar_type() == at::kDouble)
    return contrastive_bwd_cpu_impl<double>(q, k, l, g, temperature, offset, need_q, need_k);
  return contrastive_bwd_cpu_impl<float>(q, k, l, g, temperature, offset, need_q, need_k);
}

at::Tensor contrastive_bwd_sym_cpu(const at::Tensor& z_in, const at::Tensor& lse, const at::Tensor& grad,
                                   double temperature) {
  const char* op = "contrastive_bwd_sym";
  check_bwd_sym_inputs(z_in, lse, grad, temperature, op);
  auto z = compute_view(z_in);
  auto l = lse.to(z.scalar_type()).contiguous();
  auto g = grad.to(z.scalar_type()).contiguous();
  if (z.scalar_type() == at::kDouble) return contrastive_bwd_sym_cpu_impl<double>(z, l, g, temperature);
  return contrastive_bwd_sym_cpu_impl<float>(z, l, g, temperature);
}

// ------------------------------------------------------------------------------------ CUDA
#ifdef DUALVAR_WITH_CUDA
cuda::DType cuda_dtype(const at::Tensor& x, const char* name, const char* op) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": the cuda backend takes ", name, " as float32, float16 or bfloat16, got ",
                  x.scalar_type());
  }
  return cuda::DType::kFloat32;
}

// The kernels read rows with their own stride but need unit stride along the dim.
at::Tensor rows_contiguous(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

at::Tensor contrastive_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in, double temperature,
                                c10::optional<int64_t> offset) {
  const char* op = "contrastive_fwd";
  check_pair(q_in, k_in, op);
  check_temperature(temperature, op);
  const auto dtype = cuda_dtype(q_in, "q", op);
  c10::cuda::CUDAGuard guard(q_in.device());
  auto q = rows_contiguous(q_in.detach()), k = rows_contiguous(k_in.detach());
  auto lse = at::empty({q.size(0)}, q.options().dtype(at::kFloat));
  const cuda::ContrastiveFwdParams p{q.data_ptr(), k.data_ptr(), lse.data_ptr<float>(), q.size(0), k.size(0),
                                     q.size(1), q.stride(0), k.stride(0), dtype, float(1.0 / temperature),
                                     offset.has_value(), offset.value_or(0)};
  check_launch(cuda::contrastive_fwd(p, c10::cuda::getCurrentCUDAStream().stream()), op);
  return lse;
}

// out[r] = sum_c H[r, c] y[c] (see cuda::ContrastiveBwdParams); lse/grad pointers may be null.
at::Tensor contrastive_bwd_cuda_one(const at::Tensor& x, const at::Tensor& y, const at::Tensor* lse_r,
                                    const at::Tensor* g_r, const at::Tensor* lse_c, const at::Tensor* g_c,
                                    double temperature, c10::optional<int64_t> offset, cuda::DType dtype,
                                    const char* op) {
  auto out = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  auto ptr = [](const at::Tensor* t) { return t ? t->data_ptr<float>() : nullptr; };
  const cuda::ContrastiveBwdParams p{x.data_ptr(), y.data_ptr(), ptr(lse_r), ptr(g_r), ptr(lse_c), ptr(g_c),
                                     out.data_ptr<float>(), x.size(0), y.size(0), x.size(1), x.stride(0),
                                     y.stride(0), dtype, float(1.0 / temperature), offset.has_value(),
                                     offset.value_or(0)};
  check_launch(cuda::contrastive_bwd(p, c10::cuda::getCurrentCUDAStream().stream()), op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> contrastive_bwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& lse_in, const at::Tensor& grad_in,
                                                        double temperature, c10::optional<int64_t> offset,
                                                        bool need_q, bool need_k) {
  const char* op = "contrastive_bwd";
  check_bwd_inputs(q_in, k_in, lse_in, grad_in, temperature, op);
  const auto dtype = cuda_dtype(q_in, "q", op);
  c10::cuda::CUDAGuard guard(q_in.device());
  auto q = rows_contiguous(q_in.detach()), k = rows_contiguous(k_in.detach());
  auto lse = lse_in.to(at::kFloat).contiguous(), grad = grad_in.to(at::kFloat).contiguous();
  at::Tensor dq, dk;
  if (need_q) dq = contrastive_bwd_cuda_one(q, k, &lse, &grad, nullptr, nullptr, temperature, offset, dtype, op);
  // dk: rows are k, columns are q; row b of k is excluded from column b - offset of q.
  if (need_k)
    dk = contrastive_bwd_cuda_one(k, q, nullptr, nullptr, &lse, &grad, temperature,
                                  offset.has_value() ? c10::optional<int64_t>(-*offset) : c10::nullopt, dtype, op);
  return {dq, dk};
}

at::Tensor contrastive_bwd_sym_cuda(const at::Tensor& z_in, const at::Tensor& lse_in, const at::Tensor& grad_in,
                                    double temperature) {
  const char* op = "contrastive_bwd_sym";
  check_bwd_sym_inputs(z_in, lse_in, grad_in, temperature, op);
  const auto dtype = cuda_dtype(z_in, "z", op);
  c10::cuda::CUDAGuard guard(z_in.device());
  auto z = rows_contiguous(z_in.detach());
  auto lse = lse_in.to(at::kFloat).contiguous(), grad = grad_in.to(at::kFloat).contiguous();
  return contrastive_bwd_cuda_one(z, z, &lse, &grad, &lse, &grad, temperature, c10::optional<int64_t>(0), dtype, op);
}
#endif

}  // namespace
}  // namespace dualvar

TORCH_LIBRARY_FRAGMENT(dualvar, m) {
  m.def("contrastive_fwd(Tensor q, Tensor k, float temperature, int? exclude_offset) -> Tensor");
  m.def("contrastive_bwd(Tensor q, Tensor k, Tensor lse, Tensor grad, float temperature, int? exclude_offset, "
        "bool need_q, bool need_k) -> (Tensor, Tensor)");
  m.def("contrastive_bwd_sym(Tensor z, Tensor lse, Tensor grad, float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(dualvar, CPU, m) {
  m.impl("contrastive_fwd", &dualvar::contrastive_fwd_cpu);
  m.impl("contrastive_bwd", &dualvar::contrastive_bwd_cpu);
  m.impl("contrastive_bwd_sym", &dualvar::contrastive_bwd_sym_cpu);
}

#ifdef DUALVAR_WITH_CUDA
TORCH_LIBRARY_IMPL(dualvar, CUDA, m) {
  m.impl("contrastive_fwd", &dualvar::contrastive_fwd_cuda);
  m.impl("contrastive_bwd", &dualvar::contrastive_bwd_cuda);
  m.impl("contrastive_bwd_sym", &dualvar::contrastive_bwd_sym_cuda);
}
#endif
