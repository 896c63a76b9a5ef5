// torch.ops.dualvar.permute_frames: schema, input checks, allocation, the CPU parallel loop and the
// CUDA device guard and stream. Kernels: csrc/cpu/permute_frames.cpp, csrc/cuda/permute_frames.cu.
//
//   permute_frames(video uint8 (B, T, H, W, C), frame_index int64 (B, T'), lut (C, 256), hflip bool (B,)?)
//     -> (B, C, T', H, W) in lut's dtype; out[b, c, t', h, w] = lut[c][video[b, frame_index[b, t'], h, w*, c]]
//        with w* = W - 1 - w where hflip[b].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "check_launch.h"
#include "cpu/huge_pages.h"
#include "cpu/permute_frames.h"
#ifdef DUALVAR_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/permute_frames.h"
#endif

namespace dualvar {
namespace {

struct PermuteShape {
  int64_t B, T, T_out, H, W, C;
};

PermuteShape check_permute(const at::Tensor& video, const at::Tensor& frame_index, const at::Tensor& lut,
                           const c10::optional<at::Tensor>& hflip) {
  TORCH_CHECK(video.dim() == 5, "permute_frames: video must be 5-D (B, T, H, W, C), got ", video.dim(), "-D");
  TORCH_CHECK(video.scalar_type() == at::kByte, "permute_frames: video must be uint8, got ", video.scalar_type());
  TORCH_CHECK(frame_index.dim() == 2, "permute_frames: frame_index must be 2-D (B, T'), got ", frame_index.dim(),
              "-D");
  TORCH_CHECK(frame_index.scalar_type() == at::kLong, "permute_frames: frame_index must be int64, got ",
              frame_index.scalar_type());
  TORCH_CHECK(frame_index.size(0) == video.size(0), "permute_frames: frame_index has ", frame_index.size(0),
              " rows but video has batch ", video.size(0));
  const int64_t C = video.size(4);
  TORCH_CHECK(C == 1 || C == 3, "permute_frames: video must have 1 or 3 channels (last dim), got ", C);
  TORCH_CHECK(lut.dim() == 2 && lut.size(0) == C && lut.size(1) == 256, "permute_frames: lut must be (C, 256) = (",
              C, ", 256), got ", lut.sizes());
  TORCH_CHECK(lut.scalar_type() == at::kFloat || lut.scalar_type() == at::kHalf || lut.scalar_type() == at::kBFloat16,
              "permute_frames: lut (the output dtype) must be float32, float16 or bfloat16, got ", lut.scalar_type());
  TORCH_CHECK(frame_index.device() == video.device(), "permute_frames: frame_index must be on video's device ",
              video.device(), ", got ", frame_index.device());
  TORCH_CHECK(lut.device() == video.device(), "permute_frames: lut must be on video's device ", video.device(),
              ", got ", lut.device());
  if (hflip.has_value()) {
    TORCH_CHECK(hflip->dim() == 1 && hflip->size(0) == video.size(0), "permute_frames: hflip must be (B,) = (",
                video.size(0), "), got ", hflip->sizes());
    TORCH_CHECK(hflip->scalar_type() == at::kBool, "permute_frames: hflip must be bool, got ", hflip->scalar_type());
    TORCH_CHECK(hflip->device() == video.device(), "permute_frames: hflip must be on video's device ",
                video.device(), ", got ", hflip->device());
  }
  return {video.size(0), video.size(1), frame_index.size(1), video.size(2), video.size(3), C};
}

// IndexError in Python, the message the Python-side check gives for the other backends.
void check_index_range(int64_t lo, int64_t hi, int64_t T) {
  TORCH_CHECK_INDEX(lo >= 0 && hi < T, "permute_frames: frame_index holds values in [", lo, ", ", hi,
                    "], outside [0, ", T, "): video has ", T, " frames");
}

// Every tensor the kernels read is made contiguous here (a strided or expanded hflip included): the
// kernels index plain (B, ...) buffers.
struct Contiguous {
  at::Tensor video, index, lut, hflip;
  Contiguous(const at::Tensor& v, const at::Tensor& i, const at::Tensor& l, const c10::optional<at::Tensor>& h)
      : video(v.contiguous()), index(i.contiguous()), lut(l.contiguous()) {
    if (h.has_value()) hflip = h->contiguous().view(at::kByte);
  }
  permute_frames::Params params(const PermuteShape& s, at::Tensor& out) const {
    return {video.data_ptr<uint8_t>(), index.data_ptr<int64_t>(),
            hflip.defined() ? hflip.data_ptr<uint8_t>() : nullptr, lut.data_ptr(), out.data_ptr(),
            s.B, s.T, s.T_out, s.H, s.W, s.C, (int)lut.element_size()};
  }
};

at::Tensor permute_frames_cpu(const at::Tensor& video_in, const at::Tensor& index_in, const at::Tensor& lut_in,
                              const c10::optional<at::Tensor>& hflip_in) {
  const auto s = check_permute(video_in, index_in, lut_in, hflip_in);
  const Contiguous in(video_in, index_in, lut_in, hflip_in);
  if (in.index.numel() > 0) {  // B*T' values on the host; keeps the kernel from reading out of bounds
    auto idx = in.index.data_ptr<int64_t>();
    const auto [lo, hi] = std::minmax_element(idx, idx + in.index.numel());
    check_index_range(*lo, *hi, s.T);
  }
  auto out = at::empty({s.B, s.C, s.T_out, s.H, s.W}, in.video.options().dtype(in.lut.scalar_type()));
  cpu::advise_huge_pages(out.data_ptr(), out.nbytes());
  const auto p = in.params(s, out);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, s.W * s.C));
  at::parallel_for(0, s.B * s.T_out * s.H, grain,
                   [&](int64_t begin, int64_t end) { cpu::permute_frames_rows(p, begin, end); });
  return out;
}

#ifdef DUALVAR_WITH_CUDA
at::Tensor permute_frames_cuda(const at::Tensor& video_in, const at::Tensor& index_in, const at::Tensor& lut_in,
                               const c10::optional<at::Tensor>& hflip_in) {
  const auto s = check_permute(video_in, index_in, lut_in, hflip_in);
  c10::cuda::CUDAGuard guard(video_in.device());
  const Contiguous in(video_in, index_in, lut_in, hflip_in);
  if (in.index.numel() > 0) {  // one device sync: an out-of-range index would be a sticky illegal address
    const auto [lo, hi] = at::aminmax(in.index);
    const auto range = at::stack({lo, hi}).cpu();
    check_index_range(range[0].item<int64_t>(), range[1].item<int64_t>(), s.T);
  }
  auto out = at::empty({s.B, s.C, s.T_out, s.H, s.W}, in.video.options().dtype(in.lut.scalar_type()));
  check_launch(cuda::permute_frames(in.params(s, out), c10::cuda::getCurrentCUDAStream().stream()), "permute_frames");
  return out;
}
#endif

}  // namespace
}  // namespace dualvar

TORCH_LIBRARY_FRAGMENT(dualvar, m) {
  m.def("permute_frames(Tensor video, Tensor frame_index, Tensor lut, Tensor? hflip) -> Tensor");
}

TORCH_LIBRARY_IMPL(dualvar, CPU, m) { m.impl("permute_frames", &dualvar::permute_frames_cpu); }

#ifdef DUALVAR_WITH_CUDA
TORCH_LIBRARY_IMPL(dualvar, CUDA, m) { m.impl("permute_frames", &dualvar::permute_frames_cuda); }
#endif
