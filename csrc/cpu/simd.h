// Portable SIMD for the CPU tile math: GCC/Clang vector extensions.  Written once; each ISA
// build (csrc/cpu/kernels_*.cpp) compiles it for its own target and register width (64-byte
// AVX-512, 32-byte AVX2, 16-byte baseline vectors) inside its own namespace fl::FL_ISA, and
// the binding picks a build at load time, so the wheel needs no -march flag.  The target must be set for the whole translation unit (a pragma before
// this header): GCC lowers a function's vector code for the target that function is compiled
// for, before inlining, so a per-function target on the caller alone is not enough.  Torch-free.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#ifndef FL_ISA
#define FL_ISA generic
#endif

#if defined(__GNUC__)
#define FL_INLINE inline __attribute__((always_inline))
#else
#define FL_INLINE inline
#endif

namespace fl {
namespace FL_ISA {

// Lanes of T: the value vector V and the same-width integer vector I (comparison masks: 0 or
// -1; label ids are compared in it).
template <typename T>
struct Simd;

// Vector width in bytes: each build picks its register width (kernels_*.cpp), so every vector
// operation maps to one instruction; 64 covers every build's padding (tile_types.h: kLanes).
#ifndef FL_VEC_BYTES
#define FL_VEC_BYTES 16
#endif

template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(FL_VEC_BYTES)));
  typedef int32_t I __attribute__((vector_size(FL_VEC_BYTES)));
  static constexpr int W = FL_VEC_BYTES / 4;
};

template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(FL_VEC_BYTES)));
  typedef int64_t I __attribute__((vector_size(FL_VEC_BYTES)));
  static constexpr int W = FL_VEC_BYTES / 8;
};

static_assert(64 % FL_VEC_BYTES == 0, "tiles are padded to 64 bytes");

template <typename T> using VecOf = typename Simd<T>::V;
template <typename T> using MaskOf = typename Simd<T>::I;

template <typename Vec>
using ElemOf = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<Vec>()[0])>>;

// Every lane = s (written as vector + scalar: a loop over lanes can stay a loop of inserts).
template <typename Vec, typename S>
FL_INLINE Vec splat(S s) {
  return Vec{} + static_cast<ElemOf<Vec>>(s);
}

template <typename Vec>
FL_INLINE Vec load(const void* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

template <typename Vec>
FL_INLINE void store(void* p, Vec v) {
  std::memcpy(p, &v, sizeof(Vec));
}

// {j0, j0+1, ...} as an integer vector (I is Simd<float>::I or Simd<double>::I).
alignas(64) inline constexpr int32_t kLaneIds32[16] = {0, 1, 2,  3,  4,  5,  6,  7,
                                                       8, 9, 10, 11, 12, 13, 14, 15};
alignas(64) inline constexpr int64_t kLaneIds64[8] = {0, 1, 2, 3, 4, 5, 6, 7};

template <typename I>
FL_INLINE I iota(int64_t j0) {
  if constexpr (sizeof(ElemOf<I>) == 4) return load<I>(kLaneIds32) + static_cast<int32_t>(j0);
  else return load<I>(kLaneIds64) + static_cast<int64_t>(j0);
}

// a·b rounded as written, never contracted with a later add into a fused multiply-add: two
// passes of an op that each form exp(a·b − c) must round a·b alike (with GCC's default
// -ffp-contract=fast one pass may fuse it and the other not: at |a·b| ≈ 1e3 that is a relative
// difference of 3e-5 in the exponential, measured on the second LSE of hard-negative
// reweighting).  The empty asm pins the product in memory (any ISA, any vector width).
template <typename Vec>
FL_INLINE Vec rounded_product(Vec a, Vec b) {
  Vec p = a * b;
  __asm__("" : "+m"(p));
  return p;
}

template <typename Vec>
FL_INLINE Vec vmax(Vec a, Vec b) { return a > b ? a : b; }
template <typename Vec>
FL_INLINE Vec vmin(Vec a, Vec b) { return a < b ? a : b; }

template <typename Vec>
FL_INLINE auto hmax(Vec v) -> decltype(v[0] + 0) {
  auto m = v[0];
  for (unsigned k = 1; k < sizeof(Vec) / sizeof(v[0]); ++k) m = v[k] > m ? v[k] : m;
  return m;
}
template <typename Vec>
FL_INLINE auto hmin(Vec v) -> decltype(v[0] + 0) {
  auto m = v[0];
  for (unsigned k = 1; k < sizeof(Vec) / sizeof(v[0]); ++k) m = v[k] < m ? v[k] : m;
  return m;
}
template <typename Vec>
FL_INLINE auto hsum(Vec v) -> decltype(v[0] + 0) {
  auto s = v[0];
  for (unsigned k = 1; k < sizeof(Vec) / sizeof(v[0]); ++k) s += v[k];
  return s;
}
template <typename I>
FL_INLINE bool any(I m) {
  for (unsigned k = 0; k < sizeof(I) / sizeof(m[0]); ++k)
    if (m[k]) return true;
  return false;
}

// exp for float: < 1 ulp over the normal range and correct through the denormal range (Cephes
// polynomial, Cody-Waite reduction, 2^n applied in two halves), selects only, so the scalar and
// the vector forms are the same arithmetic.  exp(-inf) = 0, exp(nan) = nan, overflow -> inf.
namespace detail {
template <typename F, typename N>
FL_INLINE F exp_body(F x, F zero, N) {
  const float hi = 88.3762626647949f, lo = -103.972084045410f;
  F xc = x > hi ? hi + zero : x;
  xc = xc < lo ? lo + zero : xc;
  const F t = xc * 1.44269504088896341f;
  // Round to nearest by truncating t ± 0.5 (vectorizes; floor would not).
  const F half = t >= 0.0f ? 0.5f + zero : -0.5f + zero;
  N n;
  F fx;
  if constexpr (std::is_same_v<F, float>) {
    n = static_cast<int32_t>(t + half);
    fx = static_cast<float>(n);
  } else {
    n = __builtin_convertvector(t + half, N);
    fx = __builtin_convertvector(n, F);
  }
  F r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  F y = 1.9875691500e-4f + zero;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const N n1 = n >> 1, n2 = n - n1;  // 2^n = 2^n1 · 2^n2, each a normal float
  F p1, p2;
  const N e1 = (n1 + 127) << 23, e2 = (n2 + 127) << 23;
  std::memcpy(&p1, &e1, sizeof(F));
  std::memcpy(&p2, &e2, sizeof(F));
  F out = (y * p1) * p2;
  out = x < lo ? zero : out;
  out = x > hi ? std::numeric_limits<float>::infinity() + zero : out;
  return x != x ? x : out;
}
}  // namespace detail

FL_INLINE float exp_f(float x) { return detail::exp_body<float, int32_t>(x, 0.0f, int32_t()); }
FL_INLINE double exp_f(double x) { return std::exp(x); }

FL_INLINE Simd<float>::V vexp(Simd<float>::V x) {
  return detail::exp_body<Simd<float>::V, Simd<float>::I>(x, splat<Simd<float>::V>(0.0f),
                                                          Simd<float>::I());
}
// fp64 is the checking path, not the fast one: libm per lane.
FL_INLINE Simd<double>::V vexp(Simd<double>::V x) {
  for (int k = 0; k < Simd<double>::W; ++k) x[k] = std::exp(x[k]);
  return x;
}

}  // namespace FL_ISA
}  // namespace fl
