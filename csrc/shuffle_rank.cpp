// Torch-facing code of the shuffle-rank loss: input checks, allocation, the CPU parallel loop and the
// CUDA stream. Kernels: csrc/cpu/shuffle_rank.{h,cpp}, csrc/cuda/shuffle_rank.{h,cu}.
//
//   shuffle_rank_fwd(anchor, anchor2?, shuffled, perm, inv_theta, cap, coef0, coef2, acc_scale) -> out (4,)
//     out = {coef0 * sum terms(anchor), coef2 * sum terms(anchor2), acc_scale * correct(anchor), ... (anchor2)}
//     float32 (float64 for float64 inputs on the CPU).
//   shuffle_rank_bwd(anchor, anchor2?, shuffled, perm, grad, inv_theta, cap, gcoef0, gcoef2)
//     -> (d_anchor, d_anchor2 (empty when anchor2 is None), d_shuffled), input dtype, contiguous.
//     grad: (n,) upstream gradient of the terms; gscale_k = grad[k] * gcoef_k.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <array>
#include <mutex>

#include "binding_utils.h"
#include "cpu/shuffle_rank.h"
#ifdef DUALVAR_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/shuffle_rank.h"
#endif

namespace dualvar {
namespace {

struct SrShape {
  int64_t B, s, d;
};

SrShape check_sr(const at::Tensor& a, const c10::optional<at::Tensor>& a2, const at::Tensor& y, const at::Tensor& perm) {
  TORCH_CHECK(a.dim() == 3, "shuffle_rank: anchor must be 3-D (B, s, d), got ", a.dim(), "-D");
  TORCH_CHECK(y.sizes() == a.sizes(), "shuffle_rank: shuffled must have anchor's shape ", a.sizes(), ", got ", y.sizes());
  const int64_t B = a.size(0), s = a.size(1), d = a.size(2);
  TORCH_CHECK(B >= 1, "shuffle_rank: empty batch");
  TORCH_CHECK(s >= 2 && s <= shuffle_rank::kMaxS, "shuffle_rank: s must be in 2..", shuffle_rank::kMaxS, ", got ", s);
  TORCH_CHECK(d >= 1 && d <= 512, "shuffle_rank: d must be in 1..512, got ", d);
  const auto st = a.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "shuffle_rank: dtype must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK(y.scalar_type() == st, "shuffle_rank: shuffled is ", y.scalar_type(), " but anchor is ", st);
  TORCH_CHECK(y.device() == a.device() && perm.device() == a.device(),
              "shuffle_rank: anchor, shuffled and perm must be on one device");
  if (a2.has_value()) {
    TORCH_CHECK(a2->sizes() == a.sizes(), "shuffle_rank: anchor2 must have anchor's shape ", a.sizes(), ", got ",
                a2->sizes());
    TORCH_CHECK(a2->scalar_type() == st, "shuffle_rank: anchor2 is ", a2->scalar_type(), " but anchor is ", st);
    TORCH_CHECK(a2->device() == a.device(), "shuffle_rank: anchor2 must be on ", a.device());
  }
  TORCH_CHECK(perm.scalar_type() == at::kLong && perm.dim() == 2 && perm.size(0) == B && perm.size(1) == s,
              "shuffle_rank: perm must be int64 (B, s) = (", B, ", ", s, "), got ", perm.scalar_type(), " ",
              perm.sizes());
  return {B, s, d};
}

at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void check_perm_cpu(const at::Tensor& perm, int64_t B, int64_t s) {
  const int64_t* p = perm.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    unsigned seen = 0;
    for (int64_t j = 0; j < s; ++j) {
      const int64_t v = p[b * s + j];
      TORCH_CHECK(v >= 0 && v < s && !(seen >> v & 1u), "shuffle_rank: perm row ", b,
                  " is not a permutation of 0..", s - 1);
      seen |= 1u << v;
    }
  }
}

// CPU computes float32 and float64 natively; float16/bfloat16 are widened to float32 once (the
// kernel sees raw float pointers) and gradients are narrowed back.
at::ScalarType cpu_compute_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor sr_fwd_cpu(const at::Tensor& a_in, const c10::optional<at::Tensor>& a2_in, const at::Tensor& y_in,
                      const at::Tensor& perm_in, double inv_theta, double cap, double coef0, double coef2,
                      double acc_scale) {
  const auto sh = check_sr(a_in, a2_in, y_in, perm_in);
  const auto ct = cpu_compute_type(a_in.scalar_type());
  auto a = unit_last(a_in.to(ct));
  auto y = unit_last(y_in.to(ct));
  at::Tensor a2;
  if (a2_in.has_value()) a2 = unit_last(a2_in->to(ct));
  auto perm = perm_in.contiguous();
  check_perm_cpu(perm, sh.B, sh.s);
  std::array<double, 4> total{0, 0, 0, 0};
  std::mutex mu;
  AT_DISPATCH_FLOATING_TYPES(ct, "shuffle_rank_fwd_cpu", [&] {
    const scalar_t* a2p = a2.defined() ? a2.data_ptr<scalar_t>() : nullptr;
    const int64_t sb_b = a2.defined() ? a2.stride(0) : 0, sb_s = a2.defined() ? a2.stride(1) : 0;
    const int64_t grain = std::max<int64_t>(1, 8192 / (sh.s * sh.s * sh.d));
    at::parallel_for(0, sh.B, grain, [&](int64_t begin, int64_t end) {
      scalar_t sums[4] = {0, 0, 0, 0};
      cpu::shuffle_rank_fwd<scalar_t>(a.data_ptr<scalar_t>(), a2p, y.data_ptr<scalar_t>(), perm.data_ptr<int64_t>(),
                                      sh.s, sh.d, a.stride(0), a.stride(1), sb_b, sb_s, y.stride(0), y.stride(1),
                                      (scalar_t)inv_theta, (scalar_t)cap, begin, end, sums);
      std::lock_guard<std::mutex> lock(mu);
      for (int k = 0; k < 4; ++k) total[k] += (double)sums[k];
    });
  });
  auto out = at::empty({4}, a_in.options().dtype(ct));
  const double vals[4] = {total[0] * coef0, total[1] * coef2, total[2] * acc_scale, total[3] * acc_scale};
  AT_DISPATCH_FLOATING_TYPES(ct, "shuffle_rank_fwd_out", [&] {
    for (int k = 0; k < 4; ++k) out.data_ptr<scalar_t>()[k] = (scalar_t)vals[k];
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sr_bwd_cpu(const at::Tensor& a_in, const c10::optional<at::Tensor>& a2_in,
                                                          const at::Tensor& y_in, const at::Tensor& perm_in,
                                                          const at::Tensor& grad, double inv_theta, double cap,
                                                          double gcoef0, double gcoef2) {
  const auto sh = check_sr(a_in, a2_in, y_in, perm_in);
  const bool two = a2_in.has_value();
  TORCH_CHECK(grad.numel() == (two ? 2 : 1), "shuffle_rank_bwd: grad must hold one value per anchor set, got ",
              grad.numel());
  const auto ct = cpu_compute_type(a_in.scalar_type());
  auto a = unit_last(a_in.to(ct));
  auto y = unit_last(y_in.to(ct));
  at::Tensor a2;
  if (two) a2 = unit_last(a2_in->to(ct));
  auto perm = perm_in.contiguous();
  check_perm_cpu(perm, sh.B, sh.s);
  auto g = grad.to(at::kDouble).contiguous();
  const double gs0 = g.data_ptr<double>()[0] * gcoef0;
  const double gs2 = two ? g.data_ptr<double>()[1] * gcoef2 : 0.0;
  auto da = at::empty({sh.B, sh.s, sh.d}, a.options());
  auto dy = at::empty_like(da);
  at::Tensor da2 = two ? at::empty_like(da) : at::empty({0}, a.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "shuffle_rank_bwd_cpu", [&] {
    const scalar_t* a2p = two ? a2.data_ptr<scalar_t>() : nullptr;
    scalar_t* da2p = two ? da2.data_ptr<scalar_t>() : nullptr;
    const int64_t sb_b = two ? a2.stride(0) : 0, sb_s = two ? a2.stride(1) : 0;
    const int64_t grain = std::max<int64_t>(1, 8192 / (sh.s * sh.s * sh.d));
    at::parallel_for(0, sh.B, grain, [&](int64_t begin, int64_t end) {
      cpu::shuffle_rank_bwd<scalar_t>(a.data_ptr<scalar_t>(), a2p, y.data_ptr<scalar_t>(), perm.data_ptr<int64_t>(),
                                      sh.s, sh.d, a.stride(0), a.stride(1), sb_b, sb_s, y.stride(0), y.stride(1),
                                      (scalar_t)inv_theta, (scalar_t)cap, (scalar_t)gs0, (scalar_t)gs2, begin, end,
                                      da.data_ptr<scalar_t>(), da2p, dy.data_ptr<scalar_t>());
    });
  });
  const auto st = a_in.scalar_type();
  return {da.to(st), two ? da2.to(st) : da2.to(st), dy.to(st)};
}

#ifdef DUALVAR_WITH_CUDA
int cuda_dtype_code(at::ScalarType st) {
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "shuffle_rank: the cuda backend takes float32, float16 or bfloat16, got ", st);
  return st == at::kFloat ? 0 : (st == at::kHalf ? 1 : 2);
}

at::Tensor sr_fwd_cuda(const at::Tensor& a_in, const c10::optional<at::Tensor>& a2_in, const at::Tensor& y_in,
                       const at::Tensor& perm_in, double inv_theta, double cap, double coef0, double coef2,
                       double acc_scale) {
  const auto sh = check_sr(a_in, a2_in, y_in, perm_in);
  const int code = cuda_dtype_code(a_in.scalar_type());
  c10::cuda::CUDAGuard guard(a_in.device());
  auto a = unit_last(a_in);
  auto y = unit_last(y_in);
  at::Tensor a2;
  if (a2_in.has_value()) a2 = unit_last(*a2_in);
  auto perm = perm_in.contiguous();
  auto out = at::zeros({4}, a.options().dtype(at::kFloat));
  check_launch(cuda::shuffle_rank_fwd(a.data_ptr(), a2.defined() ? a2.data_ptr() : nullptr, y.data_ptr(),
                                      perm.data_ptr<int64_t>(), out.data_ptr<float>(), sh.B, sh.s, sh.d, a.stride(0),
                                      a.stride(1), a2.defined() ? a2.stride(0) : 0, a2.defined() ? a2.stride(1) : 0,
                                      y.stride(0), y.stride(1), (float)inv_theta, (float)cap, (float)coef0,
                                      (float)coef2, (float)acc_scale, code, c10::cuda::getCurrentCUDAStream().stream()),
               "shuffle_rank_fwd");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sr_bwd_cuda(const at::Tensor& a_in, const c10::optional<at::Tensor>& a2_in,
                                                           const at::Tensor& y_in, const at::Tensor& perm_in,
                                                           const at::Tensor& grad_in, double inv_theta, double cap,
                                                           double gcoef0, double gcoef2) {
  const auto sh = check_sr(a_in, a2_in, y_in, perm_in);
  const bool two = a2_in.has_value();
  const int code = cuda_dtype_code(a_in.scalar_type());
  TORCH_CHECK(grad_in.numel() == (two ? 2 : 1) && grad_in.dim() == 1, "shuffle_rank_bwd: grad must be (n_anchors,)");
  TORCH_CHECK(grad_in.device() == a_in.device(), "shuffle_rank_bwd: grad must be on ", a_in.device());
  c10::cuda::CUDAGuard guard(a_in.device());
  auto grad = grad_in.scalar_type() == at::kFloat ? grad_in : grad_in.to(at::kFloat);
  auto a = unit_last(a_in);
  auto y = unit_last(y_in);
  at::Tensor a2;
  if (two) a2 = unit_last(*a2_in);
  auto perm = perm_in.contiguous();
  auto da = at::empty({sh.B, sh.s, sh.d}, a.options());
  auto dy = at::empty_like(da);
  at::Tensor da2 = two ? at::empty_like(da) : at::empty({0}, a.options());
  check_launch(cuda::shuffle_rank_bwd(a.data_ptr(), two ? a2.data_ptr() : nullptr, y.data_ptr(),
                                      perm.data_ptr<int64_t>(), grad.data_ptr<float>(), grad.stride(0), da.data_ptr(),
                                      two ? da2.data_ptr() : nullptr, dy.data_ptr(), sh.B, sh.s, sh.d, a.stride(0),
                                      a.stride(1), two ? a2.stride(0) : 0, two ? a2.stride(1) : 0, y.stride(0),
                                      y.stride(1), (float)inv_theta, (float)cap, (float)gcoef0, (float)gcoef2, code,
                                      c10::cuda::getCurrentCUDAStream().stream()),
               "shuffle_rank_bwd");
  return {da, da2, dy};
}
#endif

}  // namespace
}  // namespace dualvar

TORCH_LIBRARY_FRAGMENT(dualvar, m) {
  m.def("shuffle_rank_fwd(Tensor anchor, Tensor? anchor2, Tensor shuffled, Tensor perm, float inv_theta, "
        "float cap, float coef0, float coef2, float acc_scale) -> Tensor");
  m.def("shuffle_rank_bwd(Tensor anchor, Tensor? anchor2, Tensor shuffled, Tensor perm, Tensor grad, "
        "float inv_theta, float cap, float gcoef0, float gcoef2) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dualvar, CPU, m) {
  m.impl("shuffle_rank_fwd", &dualvar::sr_fwd_cpu);
  m.impl("shuffle_rank_bwd", &dualvar::sr_bwd_cpu);
}

#ifdef DUALVAR_WITH_CUDA
TORCH_LIBRARY_IMPL(dualvar, CUDA, m) {
  m.impl("shuffle_rank_fwd", &dualvar::sr_fwd_cuda);
  m.impl("shuffle_rank_bwd", &dualvar::sr_bwd_cuda);
}
#endif
