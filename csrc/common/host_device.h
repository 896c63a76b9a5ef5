// Helpers for inline math that compiles both as host C++ (the CPU kernels) and as CUDA device code
// (the CUDA kernels): the DUALVAR_HD qualifier and correctly rounded float operations that stay
// correctly rounded under nvcc's --use_fast_math (which makes `/` and sqrtf approximate).
// No torch headers.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define DUALVAR_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define DUALVAR_HD inline __attribute__((always_inline))
#else
#define DUALVAR_HD inline
#endif

namespace dualvar {
namespace hd {

// Correctly rounded square root and division (IEEE round-to-nearest) on host and device alike.
DUALVAR_HD float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
DUALVAR_HD double sqrt_rn(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
DUALVAR_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
DUALVAR_HD double div_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

DUALVAR_HD bool is_finite(float x) {
#if defined(__CUDA_ARCH__)
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
#else
  return std::isfinite(x);
#endif
}
DUALVAR_HD bool is_finite(double x) {
#if defined(__CUDA_ARCH__)
  return (static_cast<unsigned long long>(__double_as_longlong(x)) & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
#else
  return std::isfinite(x);
#endif
}

// 2^e for an exponent inside the normal range of T (exact).
DUALVAR_HD float pow2(float, int e) {
#if defined(__CUDA_ARCH__)
  return ldexpf(1.0f, e);
#else
  return std::ldexp(1.0f, e);
#endif
}
DUALVAR_HD double pow2(double, int e) {
#if defined(__CUDA_ARCH__)
  return ldexp(1.0, e);
#else
  return std::ldexp(1.0, e);
#endif
}

// The binary exponent e of x (x = f * 2^e, 0.5 <= |f| < 1), 0 for x == 0 or a non-finite x.
DUALVAR_HD int exponent_of(float x) {
  int e = 0;
#if defined(__CUDA_ARCH__)
  frexpf(x, &e);
#else
  std::frexp(x, &e);
#endif
  return is_finite(x) ? e : 0;
}
DUALVAR_HD int exponent_of(double x) {
  int e = 0;
#if defined(__CUDA_ARCH__)
  frexp(x, &e);
#else
  std::frexp(x, &e);
#endif
  return is_finite(x) ? e : 0;
}

// Exponent range within which 2^e and 2^-e are both normal numbers (so scaling by them is exact;
// flush-to-zero under --use_fast_math would turn a subnormal factor into 0).
template <typename T>
struct ScaleRange;
template <>
struct ScaleRange<float> {
  static constexpr int kMax = 125;
};
template <>
struct ScaleRange<double> {
  static constexpr int kMax = 1021;
};

}  // namespace hd
}  // namespace dualvar
