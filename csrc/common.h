// Shared helpers for emosteer's compiled kernels: argument checks, the dtype dispatch,
// and the qualifiers that let one per-element header compile with both g++ (the CPU
// twin) and nvcc (the CUDA kernel), so that the two cannot drift apart.
//
// EMOSTEER_KERNEL_ONLY (set by the ISA-specific CPU kernel files, see cpu_vec.h): only
// the per-element math, none of the at::Tensor checks, so that a file compiled for
// AVX2 pulls in as little shared inline code as possible.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#if !defined(EMOSTEER_KERNEL_ONLY)
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#endif

// Per-element math is `EMOSTEER_HD` so the CUDA kernel and the C++ CPU twin share it.
#if defined(__CUDACC__)
#define EMOSTEER_HD __host__ __device__ __forceinline__
#else
#define EMOSTEER_HD inline
#endif

namespace emosteer {

// Multiply and add without contraction into a fused multiply-add: the torch reference
// rounds `a*z` and `b*v` separately before adding, and so must every kernel if fp32
// results are to agree bit for bit. nvcc contracts `a*x + y` by default, hence the
// intrinsics; the host build is compiled with -ffp-contract=off.
EMOSTEER_HD float mul_rn(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(x, y);
#else
  return x * y;
#endif
}

EMOSTEER_HD float add_rn(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(x, y);
#else
  return x + y;
#endif
}

// The same for the CPU twins' vectors of floats (at::vec::Vectorized<float>): each
// operator is one IEEE multiply or add per lane, and -ffp-contract=off keeps the
// compiler from fusing them. The per-element headers are templates over the float type
// F, instantiated with float by the CUDA kernels and with vectors on the CPU.
template <typename V>
inline V mul_rn(const V& x, const V& y) {
  return x * y;
}

template <typename V>
inline V add_rn(const V& x, const V& y) {
  return x + y;
}

// Round a float through storage type `T` and back: what `.to(dtype).float()` does.
template <typename T>
EMOSTEER_HD float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// Tokens per at::parallel_for chunk for rows of `row` elements: about 32k elements a
// chunk (ATen's own grain size) and never fewer than 64 tokens, so that decode-sized
// batches stay on the calling thread (waking a thread pool costs more than the work).
inline int64_t grain_for(int64_t row) {
  constexpr int64_t kGrainElems = 32768, kMinTokens = 64;
  const int64_t by_size = kGrainElems / (row > 0 ? row : 1);
  return by_size > kMinTokens ? by_size : kMinTokens;
}

// Whether the CPU twins run their AVX2 build (else the portable one): AVX2 where ATen
// reports the CPU has it (AVX2 or AVX512; ATEN_CPU_CAPABILITY=default lowers it). Defined
// once, in bindings_cpu.cpp, compiled for the baseline ISA.
bool cpu_use_avx2();

// The *_avx2_cpu.cpp files build an AVX2 variant on x86-64 with GCC only (they rely
// on `#pragma GCC target`, which clang ignores); elsewhere only the portable build runs.
// A build that leaves those files out defines EMOSTEER_HAVE_AVX2_BUILD=0 itself
// (emosteer/ops/_build.py, PORTABLE_ONLY_DEFINE).
#if !defined(EMOSTEER_HAVE_AVX2_BUILD)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define EMOSTEER_HAVE_AVX2_BUILD 1
#else
#define EMOSTEER_HAVE_AVX2_BUILD 0
#endif
#endif

}  // namespace emosteer

#if !defined(EMOSTEER_KERNEL_ONLY)

// ------------------------------------------------------------------ argument checks
#define EMOSTEER_CHECK_DEVICE(x, dev)                                             \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), " (the device of " \
              "the input), got ", (x).device())
#define EMOSTEER_CHECK_CONTIGUOUS(x) \
  TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define EMOSTEER_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
#define EMOSTEER_CHECK_DIM(x, n) \
  TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dimensions, got ", (x).sizes())
#define EMOSTEER_CHECK_SIZE(x, i, n)                                                    \
  TORCH_CHECK((x).size(i) == (n), #x " has shape ", (x).sizes(), "; dimension ", (i), \
              " must be ", (n))
#define EMOSTEER_CHECK_FLOAT_DTYPE(x)                                                   \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||    \
                  (x).scalar_type() == at::kBFloat16,                                 \
              #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())
// One tensor argument: on `dev`, contiguous, `n` dimensions.
#define EMOSTEER_CHECK_INPUT(x, dev, n) \
  EMOSTEER_CHECK_DEVICE(x, dev);        \
  EMOSTEER_CHECK_CONTIGUOUS(x);         \
  EMOSTEER_CHECK_DIM(x, n)

namespace emosteer {
// Host-side value check of an index table (CPU launchers; the CUDA kernels assert):
// every one of the n entries is -1 or in [0, upper).
inline void check_index_values(const int32_t* idx, int64_t n, int64_t upper, const char* name,
                               const char* what) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = idx[i];
    TORCH_CHECK(v >= -1 && v < upper, name, "[", i, "] = ", v, " but must be -1 or in [0, ",
                upper, ") (", upper, " ", what, ")");
  }
}
}  // namespace emosteer

// ------------------------------------------------------------------ dtype dispatch
// Runs the body with `scalar_t` bound to float, at::Half or at::BFloat16 (no double:
// the ops do not take it, and each extra type is one more kernel instantiation).
#define EMOSTEER_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                          \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

#endif  // !EMOSTEER_KERNEL_ONLY
