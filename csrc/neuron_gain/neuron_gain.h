// Per-token neuron gains on the MLP activation, shared by the CUDA kernels and their CPU
// twins:
//
//   neuron_gain:        m[t,i] = g[s,i]*m[t,i],                        s = token_slot[t] >= 0
//   silu_and_mul_gain:  out[t,i] = silu(x[t,i]) * x[t,I+i] (* g[s,i])
//
// A gain of exactly 1 leaves the element bit-identical; tokens with slot -1 get
// exactly vLLM's SiluAndMul. Running example: token_slot = [-1, 0, 2, 1] with
// g[0] = [1, 1.5, ...] keeps token 1's neuron 0 untouched and scales its neuron 1.
#pragma once

#include <cmath>

#include "common.h"

namespace emosteer {
namespace neuron {

EMOSTEER_HD bool is_identity(float g) { return g == 1.0f; }

// `gate / (1 + exp(-gate)) * up` in float, as vLLM's SiluAndMul and the reference.
EMOSTEER_HD float silu_mul(float gate, float up) {
  return mul_rn(gate / add_rn(1.0f, expf(-gate)), up);
}

// The value stored for an activation `act` (float) with gain `g`: rounded once.
template <typename T>
EMOSTEER_HD T gained(float act, float g) {
  return is_identity(g) ? static_cast<T>(act) : static_cast<T>(mul_rn(act, g));
}

// Host-side checks shared by the launchers. Return S (slots).
inline int64_t check_neuron_gain(const at::Tensor& m, const at::Tensor& token_slot,
                                 const at::Tensor& g) {
  const auto dev = m.device();
  EMOSTEER_CHECK_INPUT(m, dev, 2);
  EMOSTEER_CHECK_FLOAT_DTYPE(m);
  EMOSTEER_CHECK_INPUT(token_slot, dev, 1);
  EMOSTEER_CHECK_DTYPE(token_slot, at::kInt);
  EMOSTEER_CHECK_SIZE(token_slot, 0, m.size(0));
  EMOSTEER_CHECK_INPUT(g, dev, 2);
  EMOSTEER_CHECK_DTYPE(g, at::kFloat);
  EMOSTEER_CHECK_SIZE(g, 1, m.size(1));
  return g.size(0);
}

inline int64_t check_silu_and_mul_gain(const at::Tensor& out, const at::Tensor& x,
                                       const at::Tensor& token_slot, const at::Tensor& g) {
  const auto dev = x.device();
  EMOSTEER_CHECK_INPUT(x, dev, 2);
  EMOSTEER_CHECK_FLOAT_DTYPE(x);
  TORCH_CHECK(x.size(1) % 2 == 0, "x must have an even last dimension (gate | up), got ",
              x.sizes());
  EMOSTEER_CHECK_INPUT(out, dev, 2);
  EMOSTEER_CHECK_DTYPE(out, x.scalar_type());
  EMOSTEER_CHECK_SIZE(out, 0, x.size(0));
  EMOSTEER_CHECK_SIZE(out, 1, x.size(1) / 2);
  EMOSTEER_CHECK_INPUT(token_slot, dev, 1);
  EMOSTEER_CHECK_DTYPE(token_slot, at::kInt);
  EMOSTEER_CHECK_SIZE(token_slot, 0, x.size(0));
  EMOSTEER_CHECK_INPUT(g, dev, 2);
  EMOSTEER_CHECK_DTYPE(g, at::kFloat);
  EMOSTEER_CHECK_SIZE(g, 1, x.size(1) / 2);
  return g.size(0);
}

}  // namespace neuron
}  // namespace emosteer
