// Shared helpers for emosteer's compiled kernels: argument checks, the dtype dispatch,
// and the qualifiers that let one per-element header compile with both g++ (the CPU
// twin) and nvcc (the CUDA kernel), so that the two cannot drift apart.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <c10/macros/Macros.h>

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

// Round a float through storage type `T` and back: what `.to(dtype).float()` does.
template <typename T>
EMOSTEER_HD float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// Tokens per at::parallel_for chunk for rows of `row` elements: about 32k elements a
// chunk, ATen's own grain size, so small batches stay on one thread.
inline int64_t grain_for(int64_t row) {
  constexpr int64_t kGrainElems = 32768;
  return row >= kGrainElems ? 1 : kGrainElems / (row > 0 ? row : 1);
}

}  // namespace emosteer

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

// ------------------------------------------------------------------ dtype dispatch
// Runs the body with `scalar_t` bound to float, at::Half or at::BFloat16 (no double:
// the ops do not take it, and each extra type is one more kernel instantiation).
#define EMOSTEER_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                          \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
