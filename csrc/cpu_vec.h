// Vector helpers of the C++ CPU twins, built twice: a portable build (ATen's DEFAULT
// vectors, plain C++ the compiler vectorizes for the baseline ISA) and an AVX2 + FMA +
// F16C build, picked per call by emosteer::cpu_use_avx2() (ATen's CPU capability).
//
// Include this FIRST in a file, before any other header:
//   - <op>/<op>_cpu.cpp       (launcher + portable kernels): CPU_CAPABILITY = DEFAULT
//   - <op>/<op>_avx2_cpu.cpp  (#define EMOSTEER_CPU_AVX2 first): CPU_CAPABILITY = AVX2
// exactly as ATen builds its own kernels once per capability. The AVX2 file compiles
// only the per-element math and the token loop (EMOSTEER_KERNEL_ONLY): the plain C++
// headers that the vector headers need are included before `#pragma GCC target`, so
// that their inline functions, which the launchers share, carry no AVX2 instruction;
// only code in ISA-named namespaces (at::vec::AVX2, emosteer::*::AVX2) does
// (tests/ops/test_cpu_isa.py disassembles the built module to check it). GCC only: clang
// ignores `#pragma GCC target`, and builds the portable variant alone (common.h).
//
// Rounding: every helper moves values between the storage type and float exactly as
// `.float()` / `.to(dtype)` do (round to nearest even; NaN stays NaN, though not always
// with the same payload bits), and the float math is one IEEE operation per lane. So a
// kernel written with them rounds exactly like the torch reference.
#pragma once

#if defined(EMOSTEER_CPU_AVX2)
#define EMOSTEER_KERNEL_ONLY
// Baseline-ISA code first (see above).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <ostream>
#include <tuple>
#include <type_traits>

#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/bit_cast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

#pragma GCC target("avx2,fma,f16c")
// g++ lexes the whole file before it applies the pragma, so the macros that
// -mavx2 -mfma -mf16c define (and the vector headers and sleef.h test) are set here.
#if !defined(__AVX2__)
#define __SSE3__ 1
#define __SSSE3__ 1
#define __SSE4_1__ 1
#define __SSE4_2__ 1
#define __POPCNT__ 1
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// ATen's 16-bit vector lambdas warn that 32-byte vector returns changed ABI in GCC 4.6
// (we use none of them across a file boundary).
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#endif

// (ATen's `#pragma unroll` in these headers: -Wno-unknown-pragmas in setup.py, since g++
// before 13 ignores `#pragma GCC diagnostic` for preprocessor warnings.)
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <tuple>

#include "common.h"

namespace emosteer {
namespace cpu {
namespace CPU_CAPABILITY {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kW = fVec::size();
// Elements per step: two float vectors, which is one vector of 16-bit values.
constexpr int64_t kChunk = 2 * kW;

// n <= kChunk consecutive elements of p as two float vectors (lanes past n read as 0).
inline void load2(const float* p, int64_t n, fVec& lo, fVec& hi) {
  if (n == kChunk) {
    lo = fVec::loadu(p);
    hi = fVec::loadu(p + kW);
    return;
  }
  lo = fVec::loadu(p, static_cast<int>(std::min(n, kW)));
  hi = n > kW ? fVec::loadu(p + kW, static_cast<int>(n - kW)) : fVec(0.0f);
}

#if defined(CPU_CAPABILITY_DEFAULT) && !defined(__aarch64__)
// The portable build on x86: ATen's DEFAULT 16-bit vectors convert element by element
// through two extra arrays and tuples (4x slower than a plain loop here); convert
// directly instead, with the same c10 conversions (round to nearest even).
template <typename T>  // c10::Half, c10::BFloat16
inline void load2(const T* p, int64_t n, fVec& lo, fVec& hi) {
  __at_align__ float buf[kChunk];
  for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(p[j]);
  for (int64_t j = n; j < kChunk; ++j) buf[j] = 0.0f;
  lo = fVec::loadu(buf);
  hi = fVec::loadu(buf + kW);
}
#else
template <typename T>  // c10::Half, c10::BFloat16
inline void load2(const T* p, int64_t n, fVec& lo, fVec& hi) {
  using V = at::vec::Vectorized<T>;
  static_assert(V::size() == kChunk, "a 16-bit vector must hold two float vectors");
  const V v = n == kChunk ? V::loadu(p) : V::loadu(p, static_cast<int>(n));
  std::tie(lo, hi) = at::vec::convert_to_float<T>(v);
}
#endif

// Stores the first n <= kChunk lanes of (lo, hi) to p, rounded once to p's type.
inline void store2(float* p, int64_t n, const fVec& lo, const fVec& hi) {
  if (n == kChunk) {
    lo.store(p);
    hi.store(p + kW);
    return;
  }
  lo.store(p, static_cast<int>(std::min(n, kW)));
  if (n > kW) hi.store(p + kW, static_cast<int>(n - kW));
}

#if defined(CPU_CAPABILITY_DEFAULT) && !defined(__aarch64__)
template <typename T>
inline void store2(T* p, int64_t n, const fVec& lo, const fVec& hi) {
  __at_align__ float buf[kChunk];
  lo.store(buf);
  hi.store(buf + kW);
  for (int64_t j = 0; j < n; ++j) p[j] = static_cast<T>(buf[j]);
}
#else
template <typename T>
inline void store2(T* p, int64_t n, const fVec& lo, const fVec& hi) {
  const at::vec::Vectorized<T> v = at::vec::convert_from_float<T>(lo, hi);
  if (n == kChunk) {
    v.store(p);
  } else {
    v.store(p, static_cast<int>(n));
  }
}
#endif

// The lanes of v summed in lane order (the kernels' one horizontal reduction).
inline float lane_sum(const fVec& v) {
  __at_align__ float lanes[kW];
  v.store(lanes);
  float s = 0.0f;
  for (int64_t k = 0; k < kW; ++k) s += lanes[k];
  return s;
}

// Bit i set <=> lane i of (lo, hi) equals 1.0f (x - 1 is exactly 0 only for x == 1).
inline uint64_t ones_mask(const fVec& lo, const fVec& hi) {
  const fVec one(1.0f);
  return static_cast<uint64_t>(static_cast<uint32_t>((lo - one).zero_mask())) |
         (static_cast<uint64_t>(static_cast<uint32_t>((hi - one).zero_mask())) << kW);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace emosteer
