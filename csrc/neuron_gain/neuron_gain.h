// Per-token neuron gains on the MLP activation (the down_proj input), shared by the
// CUDA kernel and its CPU twins:
//
//   if flag[0] == 0: nothing at all
//   m[t,i] = g*m[t,i],  g = 1 + (gamma[s]-1)*masks[nrow[s], i],
//            s = token_slot[t] >= 0, nrow[s] >= 0
//
// g is rounded in this order (gamma - 1, times the mask, plus 1), the product g*m once
// to m's dtype. An element with g == 1 (mask 0, or gamma 1) is left bit-identical, as
// is every other token. It runs in place right after vLLM's own SiluAndMul. Running
// example: token_slot = [-1, 0, 2, 1] with nrow = [3, -1, 3] and gamma = [1.5, 2, 0.5]
// scales token 1 by 1.5 and token 2 by 0.5 on the neurons of mask row 3, and leaves
// tokens 0 and 3 (slot 1 has no mask) alone.
#pragma once

#include "common.h"

namespace emosteer {
namespace neuron_gain {

EMOSTEER_HD bool is_identity(float g) { return g == 1.0f; }

// `1 + gm1*mask` with gm1 = gamma - 1 (rounded first, once per slot), the product
// rounded before the sum; F is float (CUDA) or a vector of floats (CPU).
template <typename F>
EMOSTEER_HD F gain(const F& gm1, const F& mask) {
  return add_rn(F(1.0f), mul_rn(gm1, mask));
}

#if !defined(__CUDACC__)
// What the CPU launcher hands the vectorized token loop (cpu_kernel.h). Indices are
// already checked.
struct CpuArgs {
  void* m;                    // [T, I] scalar_t
  const int32_t* token_slot;  // [T]
  const float* gamma;         // [S]
  const int32_t* nrow;        // [S]
  const float* masks;         // [P, I]
  int64_t I;
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
inline int64_t check_neuron_gain(const at::Tensor& m, const at::Tensor& token_slot,
                                 const at::Tensor& gamma, const at::Tensor& nrow,
                                 const at::Tensor& masks, const at::Tensor& flag) {
  const auto dev = m.device();
  EMOSTEER_CHECK_INPUT(m, dev, 2);
  EMOSTEER_CHECK_FLOAT_DTYPE(m);
  EMOSTEER_CHECK_INPUT(token_slot, dev, 1);
  EMOSTEER_CHECK_DTYPE(token_slot, at::kInt);
  EMOSTEER_CHECK_SIZE(token_slot, 0, m.size(0));
  EMOSTEER_CHECK_INPUT(gamma, dev, 1);
  EMOSTEER_CHECK_DTYPE(gamma, at::kFloat);
  const int64_t S = gamma.size(0);
  EMOSTEER_CHECK_INPUT(nrow, dev, 1);
  EMOSTEER_CHECK_DTYPE(nrow, at::kInt);
  EMOSTEER_CHECK_SIZE(nrow, 0, S);
  EMOSTEER_CHECK_INPUT(masks, dev, 2);
  EMOSTEER_CHECK_DTYPE(masks, at::kFloat);
  EMOSTEER_CHECK_SIZE(masks, 1, m.size(1));
  EMOSTEER_CHECK_INPUT(flag, dev, 1);
  EMOSTEER_CHECK_DTYPE(flag, at::kInt);
  EMOSTEER_CHECK_SIZE(flag, 0, 1);
  return S;
}
#endif

}  // namespace neuron_gain
}  // namespace emosteer
