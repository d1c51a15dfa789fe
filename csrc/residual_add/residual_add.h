// Per-token residual steering from a vector pool, shared by the CUDA kernel and its CPU
// twins:
//
//   if flag[0] == 0: nothing at all
//   r[t] = r[t] + alpha[s]*pool[urow[s]],   s = token_slot[t] >= 0, urow[s] >= 0
//
// float32 math, the product rounded before the sum, one rounding to r's dtype; every
// other token is left bit-identical. It runs in place right after vLLM's own fused
// add + RMSNorm (on the residual that op returned), so unsteered tokens keep vLLM's
// numbers bit for bit. Running example: token_slot = [-1, 0, 2, 1] with
// urow = [4, -1, 0] leaves tokens 0 and 3 alone (slot 1 has no vector), adds
// alpha[0]*pool[4] to token 1 and alpha[2]*pool[0] to token 2.
#pragma once

#include "common.h"

namespace emosteer {
namespace residual_add {

// `r + alpha*u`, the product rounded before the sum as in the torch reference; F is
// float (CUDA) or a vector of floats (CPU).
template <typename F>
EMOSTEER_HD F steer(const F& r, const F& alpha, const F& u) {
  return add_rn(r, mul_rn(alpha, u));
}

#if !defined(__CUDACC__)
// What the CPU launcher hands the vectorized token loop (cpu_kernel.h). Indices are
// already checked.
struct CpuArgs {
  void* r;                    // [T, d] scalar_t
  const int32_t* token_slot;  // [T]
  const float* alpha;         // [S]
  const int32_t* urow;        // [S]
  const void* pool;           // [P, d] scalar_t
  int64_t d;
};
namespace DEFAULT {
template <typename scalar_t>
void tokens(const CpuArgs& p, int64_t begin, int64_t end);
}
namespace AVX2 {
template <typename scalar_t>
void tokens(const CpuArgs& p, int64_t begin, int64_t end);
}
#endif

#if !defined(EMOSTEER_KERNEL_ONLY)
// Host-side checks shared by the launchers. Returns S (slots).
inline int64_t check_residual_add(const at::Tensor& r, const at::Tensor& token_slot,
                                  const at::Tensor& alpha, const at::Tensor& urow,
                                  const at::Tensor& pool, const at::Tensor& flag) {
  const auto dev = r.device();
  EMOSTEER_CHECK_INPUT(r, dev, 2);
  EMOSTEER_CHECK_FLOAT_DTYPE(r);
  EMOSTEER_CHECK_INPUT(token_slot, dev, 1);
  EMOSTEER_CHECK_DTYPE(token_slot, at::kInt);
  EMOSTEER_CHECK_SIZE(token_slot, 0, r.size(0));
  EMOSTEER_CHECK_INPUT(alpha, dev, 1);
  EMOSTEER_CHECK_DTYPE(alpha, at::kFloat);
  const int64_t S = alpha.size(0);
  EMOSTEER_CHECK_INPUT(urow, dev, 1);
  EMOSTEER_CHECK_DTYPE(urow, at::kInt);
  EMOSTEER_CHECK_SIZE(urow, 0, S);
  EMOSTEER_CHECK_INPUT(pool, dev, 2);
  EMOSTEER_CHECK_DTYPE(pool, r.scalar_type());
  EMOSTEER_CHECK_SIZE(pool, 1, r.size(1));
  EMOSTEER_CHECK_INPUT(flag, dev, 1);
  EMOSTEER_CHECK_DTYPE(flag, at::kInt);
  EMOSTEER_CHECK_SIZE(flag, 0, 1);
  return S;
}
#endif

}  // namespace residual_add
}  // namespace emosteer
