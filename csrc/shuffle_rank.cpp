// torch.ops.dualvar.shuffle_rank_fwd / shuffle_rank_bwd: schemas, input checks, allocation, the CPU
// parallel loop and the CUDA device guard and stream. Kernels: csrc/cpu/shuffle_rank.cpp,
// csrc/cuda/shuffle_rank.cu; the per-sample math they share: csrc/common/shuffle_rank.h.
//
//   shuffle_rank_fwd(anchor, anchor2?, shuffled, perm, inv_theta, cap, coef0, coef2, acc_scale) -> out (4,)
//     out = {coef0 * sum terms(anchor), coef2 * sum terms(anchor2), acc_scale * correct(anchor), ... (anchor2)}
//     float32 (float64 for float64 inputs on the CPU). Deterministic on both devices.
//   shuffle_rank_bwd(anchor, anchor2?, shuffled, perm, grad, inv_theta, cap, gcoef0, gcoef2)
//     -> (d_anchor, d_anchor2 (empty when anchor2 is None), d_shuffled), input dtype, contiguous.
//     grad: (n,) upstream gradient of the terms; gscale_k = grad[k] * gcoef_k.
// A NaN or inf in a sample's input rows makes the loss NaN and that sample's gradient rows NaN.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "check_launch.h"
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

SrShape check_sr(const at::Tensor& a, const c10::optional<at::Tensor>& a2, const at::Tensor& y, const at::Tensor& perm,
                 double inv_theta, double cap, const char* op) {
  TORCH_CHECK(a.dim() == 3, op, ": anchor must be 3-D (B, s, d), got ", a.dim(), "-D");
  TORCH_CHECK(y.sizes() == a.sizes(), op, ": shuffled must have anchor's shape ", a.sizes(), ", got ", y.sizes());
  const int64_t B = a.size(0), s = a.size(1), d = a.size(2);
  TORCH_CHECK(B >= 1, op, ": anchor must hold at least one sample (B >= 1), got B = ", B);
  TORCH_CHECK(s >= 2 && s <= shuffle_rank::kMaxS, op, ": anchor must have 2..", shuffle_rank::kMaxS,
              " series per sample (s), got s = ", s);
  TORCH_CHECK(d >= 1 && d <= shuffle_rank::kMaxD, op, ": anchor's series dim d must be in 1..", shuffle_rank::kMaxD,
              ", got d = ", d);
  const auto st = a.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
              ": anchor must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK(y.scalar_type() == st, op, ": shuffled is ", y.scalar_type(), " but anchor is ", st);
  TORCH_CHECK(y.device() == a.device(), op, ": shuffled must be on anchor's device ", a.device(), ", got ",
              y.device());
  TORCH_CHECK(perm.device() == a.device(), op, ": perm must be on anchor's device ", a.device(), ", got ",
              perm.device());
  if (a2.has_value()) {
    TORCH_CHECK(a2->sizes() == a.sizes(), op, ": anchor2 must have anchor's shape ", a.sizes(), ", got ",
                a2->sizes());
    TORCH_CHECK(a2->scalar_type() == st, op, ": anchor2 is ", a2->scalar_type(), " but anchor is ", st);
    TORCH_CHECK(a2->device() == a.device(), op, ": anchor2 must be on anchor's device ", a.device(), ", got ",
                a2->device());
  }
  TORCH_CHECK(perm.scalar_type() == at::kLong && perm.dim() == 2 && perm.size(0) == B && perm.size(1) == s, op,
              ": perm must be int64 (B, s) = (", B, ", ", s, "), got ", perm.scalar_type(), " ", perm.sizes());
  TORCH_CHECK(std::isfinite(inv_theta) && inv_theta > 0, op,
              ": inv_theta (1 / theta) must be positive and finite, got ", inv_theta);
  TORCH_CHECK(!std::isnan(cap), op, ": cap must be a number or +inf, got NaN");
  return {B, s, d};
}

// shuffle_rank_bwd's result: (d_anchor, d_anchor2, d_shuffled).
using SrGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// check_sr plus the checks on shuffle_rank_bwd's grad (one value per anchor set, on anchor's device);
// shared by the CPU and CUDA backward.
SrShape check_sr_bwd(const at::Tensor& a, const c10::optional<at::Tensor>& a2, const at::Tensor& y,
                     const at::Tensor& perm, const at::Tensor& grad, double inv_theta, double cap, const char* op) {
  const auto sh = check_sr(a, a2, y, perm, inv_theta, cap, op);
  const bool two = a2.has_value();
  TORCH_CHECK(grad.dim() == 1 && grad.numel() == (two ? 2 : 1), op,
              ": grad must be 1-D with one value per anchor set (", two ? 2 : 1, "), got ", grad.sizes());
  TORCH_CHECK(grad.device() == a.device(), op, ": grad must be on anchor's device ", a.device(), ", got ",
              grad.device());
  return sh;
}

// The kernels take (batch, row) strides and need unit stride along d only.
at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void check_perm_cpu(const at::Tensor& perm, int64_t B, int64_t s, const char* op) {
  const int64_t* p = perm.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    unsigned seen = 0;
    for (int64_t j = 0; j < s; ++j) {
      const int64_t v = p[b * s + j];
      TORCH_CHECK(v >= 0 && v < s && !(seen >> v & 1u), op, ": perm row ", b, " is not a permutation of 0..", s - 1);
      seen |= 1u << v;
    }
  }
}

shuffle_rank::Inputs inputs(const at::Tensor& a, const at::Tensor& a2, const at::Tensor& y, const at::Tensor& perm,
                            double inv_theta, double cap) {
  return {a.data_ptr(), a2.defined() ? a2.data_ptr() : nullptr, y.data_ptr(), perm.data_ptr<int64_t>(),
          a.size(0), a.size(1), a.size(2), a.stride(0), a.stride(1),
          a2.defined() ? a2.stride(0) : 0, a2.defined() ? a2.stride(1) : 0, y.stride(0), y.stride(1),
          inv_theta, cap};
}

// CPU computes float32 and float64 natively; float16/bfloat16 are widened to float32 once (the
// kernel sees raw float pointers) and gradients are narrowed back.
at::ScalarType cpu_compute_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

int64_t cpu_grain(const SrShape& sh) { return std::max<int64_t>(1, 8192 / (sh.s * sh.s * sh.d)); }

at::Tensor shuffle_rank_fwd_cpu(const at::Tensor& a_in, const c10::optional<at::Tensor>& a2_in, const at::Tensor& y_in,
                                const at::Tensor& perm_in, double inv_theta, double cap, double coef0, double coef2,
                                double acc_scale) {
  const char* op = "shuffle_rank_fwd";
  const auto sh = check_sr(a_in, a2_in, y_in, perm_in, inv_theta, cap, op);
  const auto ct = cpu_compute_type(a_in.scalar_type());
  auto a = unit_last(a_in.to(ct));
  auto y = unit_last(y_in.to(ct));
  at::Tensor a2;
  if (a2_in.has_value()) a2 = unit_last(a2_in->to(ct));
  auto perm = perm_in.contiguous();
  check_perm_cpu(perm, sh.B, sh.s, op);
  const auto in = inputs(a, a2, y, perm, inv_theta, cap);
  // Fixed chunks, each with its own partial sums, added in chunk order: the same bits whatever the
  // thread count or timing.
  const int64_t grain = cpu_grain(sh);
  const int64_t n_chunks = (sh.B + grain - 1) / grain;
  std::vector<double> partial(4 * n_chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES(ct, "shuffle_rank_fwd_cpu", [&] {
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        scalar_t sums[4] = {0, 0, 0, 0};
        cpu::shuffle_rank_fwd<scalar_t>(in, c * grain, std::min(sh.B, (c + 1) * grain), sums);
        for (int k = 0; k < 4; ++k) partial[4 * c + k] = (double)sums[k];
      }
    });
  });
  double total[4] = {0, 0, 0, 0};
  for (int64_t c = 0; c < n_chunks; ++c)
    for (int k = 0; k < 4; ++k) total[k] += partial[4 * c + k];
  const bool two = a2.defined();
  const double vals[4] = {total[0] * coef0, two ? total[1] * coef2 : 0.0, total[2] * acc_scale,
                          two ? total[3] * acc_scale : 0.0};
  auto out = at::empty({4}, a_in.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES(ct, "shuffle_rank_fwd_out", [&] {
    for (int k = 0; k < 4; ++k) out.data_ptr<scalar_t>()[k] = (scalar_t)vals[k];
  });
  return out;
}

SrGrads shuffle_rank_bwd_cpu(const at::Tensor& a_in, const c10::optional<at::Tensor>& a2_in, const at::Tensor& y_in,
                             const at::Tensor& perm_in, const at::Tensor& grad, double inv_theta, double cap,
                             double gcoef0, double gcoef2) {
  const char* op = "shuffle_rank_bwd";
  const auto sh = check_sr_bwd(a_in, a2_in, y_in, perm_in, grad, inv_theta, cap, op);
  const bool two = a2_in.has_value();
  const auto ct = cpu_compute_type(a_in.scalar_type());
  auto a = unit_last(a_in.to(ct));
  auto y = unit_last(y_in.to(ct));
  at::Tensor a2;
  if (two) a2 = unit_last(a2_in->to(ct));
  auto perm = perm_in.contiguous();
  check_perm_cpu(perm, sh.B, sh.s, op);
  auto g = grad.to(at::kDouble).contiguous();
  const double gs0 = g.data_ptr<double>()[0] * gcoef0;
  const double gs2 = two ? g.data_ptr<double>()[1] * gcoef2 : 0.0;
  auto da = at::empty({sh.B, sh.s, sh.d}, a.options());
  auto dy = at::empty_like(da);
  at::Tensor da2 = two ? at::empty_like(da) : at::empty({0}, a.options());
  const auto in = inputs(a, a2, y, perm, inv_theta, cap);
  const shuffle_rank::Grads grads{da.data_ptr(), two ? da2.data_ptr() : nullptr, dy.data_ptr()};
  AT_DISPATCH_FLOATING_TYPES(ct, "shuffle_rank_bwd_cpu", [&] {
    at::parallel_for(0, sh.B, cpu_grain(sh), [&](int64_t begin, int64_t end) {
      cpu::shuffle_rank_bwd<scalar_t>(in, (scalar_t)gs0, (scalar_t)gs2, grads, begin, end);
    });
  });
  const auto st = a_in.scalar_type();
  return {da.to(st), da2.to(st), dy.to(st)};
}

#ifdef DUALVAR_WITH_CUDA
cuda::DType cuda_dtype(at::ScalarType st, const char* op) {
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": the cuda backend takes anchor as float32, float16 or bfloat16, got ", st);
  return st == at::kFloat ? cuda::DType::kFloat32 : (st == at::kHalf ? cuda::DType::kFloat16 : cuda::DType::kBFloat16);
}

at::Tensor shuffle_rank_fwd_cuda(const at::Tensor& a_in, const c10::optional<at::Tensor>& a2_in,
                                 const at::Tensor& y_in, const at::Tensor& perm_in, double inv_theta, double cap,
                                 double coef0, double coef2, double acc_scale) {
  const char* op = "shuffle_rank_fwd";
  const auto sh = check_sr(a_in, a2_in, y_in, perm_in, inv_theta, cap, op);
  const auto dtype = cuda_dtype(a_in.scalar_type(), op);
  c10::cuda::CUDAGuard guard(a_in.device());
  auto a = unit_last(a_in);
  auto y = unit_last(y_in);
  at::Tensor a2;
  if (a2_in.has_value()) a2 = unit_last(*a2_in);
  auto perm = perm_in.contiguous();
  auto out = at::empty({4}, a.options().dtype(at::kFloat));
  auto workspace = at::zeros({cuda::shuffle_rank_fwd_workspace(sh.B)}, a.options().dtype(at::kFloat));
  const cuda::ShuffleRankFwdParams p{inputs(a, a2, y, perm, inv_theta, cap), dtype, (float)coef0, (float)coef2,
                                     (float)acc_scale, out.data_ptr<float>(), workspace.data_ptr<float>()};
  check_launch(cuda::shuffle_rank_fwd(p, c10::cuda::getCurrentCUDAStream().stream()), op);
  return out;
}

SrGrads shuffle_rank_bwd_cuda(const at::Tensor& a_in, const c10::optional<at::Tensor>& a2_in, const at::Tensor& y_in,
                              const at::Tensor& perm_in, const at::Tensor& grad_in, double inv_theta, double cap,
                              double gcoef0, double gcoef2) {
  const char* op = "shuffle_rank_bwd";
  const auto sh = check_sr_bwd(a_in, a2_in, y_in, perm_in, grad_in, inv_theta, cap, op);
  const bool two = a2_in.has_value();
  const auto dtype = cuda_dtype(a_in.scalar_type(), op);
  c10::cuda::CUDAGuard guard(a_in.device());
  auto grad = grad_in.scalar_type() == at::kFloat ? grad_in : grad_in.to(at::kFloat);  // read with its stride
  auto a = unit_last(a_in);
  auto y = unit_last(y_in);
  at::Tensor a2;
  if (two) a2 = unit_last(*a2_in);
  auto perm = perm_in.contiguous();
  auto da = at::empty({sh.B, sh.s, sh.d}, a.options());
  auto dy = at::empty_like(da);
  at::Tensor da2 = two ? at::empty_like(da) : at::empty({0}, a.options());
  const cuda::ShuffleRankBwdParams p{inputs(a, a2, y, perm, inv_theta, cap), dtype, grad.data_ptr<float>(),
                                     grad.stride(0), (float)gcoef0, (float)gcoef2,
                                     {da.data_ptr(), two ? da2.data_ptr() : nullptr, dy.data_ptr()}};
  check_launch(cuda::shuffle_rank_bwd(p, c10::cuda::getCurrentCUDAStream().stream()), op);
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
  m.impl("shuffle_rank_fwd", &dualvar::shuffle_rank_fwd_cpu);
  m.impl("shuffle_rank_bwd", &dualvar::shuffle_rank_bwd_cpu);
}

#ifdef DUALVAR_WITH_CUDA
TORCH_LIBRARY_IMPL(dualvar, CUDA, m) {
  m.impl("shuffle_rank_fwd", &dualvar::shuffle_rank_fwd_cuda);
  m.impl("shuffle_rank_bwd", &dualvar::shuffle_rank_bwd_cuda);
}
#endif
