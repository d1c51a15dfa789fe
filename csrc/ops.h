// Host entry points of the compiled ops, one per (op, device); bound to the
// `emosteer_C` torch library in bindings_cpu.cpp / bindings_cuda.cpp. Argument order
// is that of the torch reference (emosteer/ops/reference.py). All mutate in place.
#pragma once

#include <ATen/core/Tensor.h>

namespace emosteer {

#define EMOSTEER_DECLARE_OPS(DEV)                                                            \
  void head_affine_capture_##DEV(at::Tensor& z, const at::Tensor& token_slot,                \
                                 const at::Tensor& a, const at::Tensor& b,                   \
                                 const at::Tensor& v, const at::Tensor& cap_index,           \
                                 at::Tensor& cap_buf);                                       \
  void residual_add_##DEV(at::Tensor& r, const at::Tensor& token_slot,                       \
                          const at::Tensor& alpha, const at::Tensor& u);                     \
  void fused_add_rms_norm_steer_##DEV(at::Tensor& x, at::Tensor& residual,                   \
                                      const at::Tensor& weight, double eps,                  \
                                      const at::Tensor& token_slot, const at::Tensor& alpha, \
                                      const at::Tensor& u);                                  \
  void neuron_gain_##DEV(at::Tensor& m, const at::Tensor& token_slot, const at::Tensor& g);  \
  void silu_and_mul_gain_##DEV(at::Tensor& out, const at::Tensor& x,                         \
                               const at::Tensor& token_slot, const at::Tensor& g);

EMOSTEER_DECLARE_OPS(cpu)
EMOSTEER_DECLARE_OPS(cuda)

#undef EMOSTEER_DECLARE_OPS

}  // namespace emosteer
