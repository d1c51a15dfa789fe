// Per-token residual steering, shared by the CUDA kernels and their CPU twins:
//
//   residual_add:              r[t] = r[t] + alpha[s]*u[s],   s = token_slot[t] >= 0
//   fused_add_rms_norm_steer:  residual[t] = x[t] + residual[t] (+ alpha[s]*u[s])
//                              x[t] = rms_norm(residual[t]) * weight
//
// The fused form is vLLM's fused_add_rms_norm with the steering add folded in: the sum
// is rounded to the residual dtype before the norm, the normed row is rounded to x's
// dtype before the product with the weight (in that dtype), so a token with slot -1
// reproduces vLLM's op. Running example: token_slot = [-1, 0, 2, 1] leaves token 0's
// residual as x + residual and adds slot 0's, 2's and 1's vector to tokens 1..3.
#pragma once

#include <cmath>

#include "common.h"

namespace emosteer {
namespace residual {

// `r + alpha*u`, the product rounded before the sum as in the torch reference.
EMOSTEER_HD float steer(float r, float alpha, float u) { return add_rn(r, mul_rn(alpha, u)); }

// 1/sqrt(mean + eps) with mean = sum_sq / d, as `rsqrt(h.pow(2).mean() + eps)` does.
EMOSTEER_HD float inv_rms(float sum_sq, int64_t d, float eps) {
  return 1.0f / sqrtf(add_rn(sum_sq / static_cast<float>(d), eps));
}

// `(h * inv_rms).to(T) * weight.to(T)`: the product in T, i.e. rounded through T.
template <typename T>
EMOSTEER_HD T normed_times_weight(float h, float inv, T w) {
  return static_cast<T>(mul_rn(round_to<T>(mul_rn(h, inv)), static_cast<float>(w)));
}

// Host-side checks shared by the launchers of residual_add. Returns S (slots).
inline int64_t check_residual_add(const at::Tensor& r, const at::Tensor& token_slot,
                                  const at::Tensor& alpha, const at::Tensor& u) {
  const auto dev = r.device();
  EMOSTEER_CHECK_INPUT(r, dev, 2);
  EMOSTEER_CHECK_FLOAT_DTYPE(r);
  EMOSTEER_CHECK_INPUT(token_slot, dev, 1);
  EMOSTEER_CHECK_DTYPE(token_slot, at::kInt);
  EMOSTEER_CHECK_SIZE(token_slot, 0, r.size(0));
  EMOSTEER_CHECK_INPUT(alpha, dev, 1);
  EMOSTEER_CHECK_DTYPE(alpha, at::kFloat);
  const int64_t S = alpha.size(0);
  EMOSTEER_CHECK_INPUT(u, dev, 2);
  EMOSTEER_CHECK_DTYPE(u, r.scalar_type());
  EMOSTEER_CHECK_SIZE(u, 0, S);
  EMOSTEER_CHECK_SIZE(u, 1, r.size(1));
  return S;
}

// Checks of fused_add_rms_norm_steer; returns the weight in x's dtype (a copy only when
// the dtypes differ, which is what `weight.to(x.dtype)` does in the reference).
inline at::Tensor check_fused(const at::Tensor& x, const at::Tensor& residual,
                              const at::Tensor& weight, double eps, const at::Tensor& token_slot,
                              const at::Tensor& alpha, const at::Tensor& u) {
  check_residual_add(x, token_slot, alpha, u);
  const auto dev = x.device();
  EMOSTEER_CHECK_INPUT(residual, dev, 2);
  EMOSTEER_CHECK_DTYPE(residual, x.scalar_type());
  EMOSTEER_CHECK_SIZE(residual, 0, x.size(0));
  EMOSTEER_CHECK_SIZE(residual, 1, x.size(1));
  EMOSTEER_CHECK_INPUT(weight, dev, 1);
  EMOSTEER_CHECK_FLOAT_DTYPE(weight);
  EMOSTEER_CHECK_SIZE(weight, 0, x.size(1));
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  return weight.scalar_type() == x.scalar_type() ? weight : weight.to(x.scalar_type());
}

}  // namespace residual
}  // namespace emosteer
