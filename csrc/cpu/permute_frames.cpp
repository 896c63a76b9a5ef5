// Frame permutation on the CPU: one pass, uint8 read once, output written once.
// Normalisation is a per-channel 256-entry lookup table computed by the caller with the same
// float ops as the reference, so the result is bit-identical to it in every output dtype.
#include "permute_frames.h"

#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace dualvar {
namespace cpu {
namespace {

// Writes n table lookups to dst. The output is written once and not read again by this op, so on
// x86 full 16-byte chunks bypass the cache (non-temporal stores: no read-for-ownership of the
// destination lines), which is most of the traffic for a float32 output.
template <typename T, bool FLIP>
inline void lookup_row(const uint8_t* src, int64_t C, int64_t W, const T* table, T* dst) {
  auto at = [&](int64_t w) { return table[src[(FLIP ? (W - 1 - w) : w) * C]]; };
  int64_t w = 0;
#if defined(__SSE2__)
  constexpr int64_t kLanes = 16 / sizeof(T);
  while (w < W && (reinterpret_cast<uintptr_t>(dst + w) & 15) != 0) {
    dst[w] = at(w);
    ++w;
  }
  alignas(16) T buf[kLanes];
  for (; w + kLanes <= W; w += kLanes) {
    for (int64_t i = 0; i < kLanes; ++i) buf[i] = at(w + i);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + w), _mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
#endif
  for (; w < W; ++w) dst[w] = at(w);
}

template <typename T, int C_STATIC>
void rows_impl(const uint8_t* video, const int64_t* frame_index, const uint8_t* hflip,
               const T* lut, T* out, int64_t T_in, int64_t T_out, int64_t H, int64_t W,
               int64_t C_dyn, int64_t row_begin, int64_t row_end) {
  const int64_t C = C_STATIC > 0 ? C_STATIC : C_dyn;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t h = row % H;
    const int64_t bt = row / H;
    const int64_t t = bt % T_out;
    const int64_t b = bt / T_out;
    const int64_t src_t = frame_index[b * T_out + t];
    const uint8_t* src = video + ((b * T_in + src_t) * H + h) * W * C;
    const bool flip = hflip != nullptr && hflip[b] != 0;
    for (int64_t c = 0; c < C; ++c) {
      T* dst = out + (((b * C + c) * T_out + t) * H + h) * W;
      const T* table = lut + c * 256;
      if (flip)
        lookup_row<T, true>(src + c, C, W, table, dst);
      else
        lookup_row<T, false>(src + c, C, W, table, dst);
    }
  }
#if defined(__SSE2__)
  _mm_sfence();  // make the non-temporal stores visible before the caller reads the output
#endif
}

template <typename T>
void dispatch_channels(const uint8_t* video, const int64_t* frame_index, const uint8_t* hflip,
                       const void* lut, void* out, int64_t T_in, int64_t T_out, int64_t H,
                       int64_t W, int64_t C, int64_t row_begin, int64_t row_end) {
  auto l = static_cast<const T*>(lut);
  auto o = static_cast<T*>(out);
  if (C == 3)
    rows_impl<T, 3>(video, frame_index, hflip, l, o, T_in, T_out, H, W, C, row_begin, row_end);
  else if (C == 1)
    rows_impl<T, 1>(video, frame_index, hflip, l, o, T_in, T_out, H, W, C, row_begin, row_end);
  else
    rows_impl<T, 0>(video, frame_index, hflip, l, o, T_in, T_out, H, W, C, row_begin, row_end);
}

}  // namespace

void permute_frames_rows(const permute_frames::Params& p, int64_t row_begin, int64_t row_end) {
  if (p.elem_bytes == 4)
    dispatch_channels<uint32_t>(p.video, p.frame_index, p.hflip, p.lut, p.out, p.T, p.T_out, p.H, p.W, p.C, row_begin,
                                row_end);
  else
    dispatch_channels<uint16_t>(p.video, p.frame_index, p.hflip, p.lut, p.out, p.T, p.T_out, p.H, p.W, p.C, row_begin,
                                row_end);
}

}  // namespace cpu
}  // namespace dualvar
