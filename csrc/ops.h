// Host entry points of the compiled ops, one per (op, device); bound to the
// `emosteer_C` torch library in bindings_cpu.cpp / bindings_cuda.cpp. Argument order
// is that of the torch reference (emosteer/ops/reference.py). All mutate in place, and
// all do nothing at all while flag[0] == 0.
#pragma once

#include <ATen/core/Tensor.h>

namespace emosteer {

#define EMOSTEER_DECLARE_OPS(DEV)                                                              \
  void head_affine_capture_##DEV(at::Tensor& z, const at::Tensor& token_slot,                  \
                                 const at::Tensor& a, const at::Tensor& b,                     \
                                 const at::Tensor& vrow, const at::Tensor& pool,               \
                                 const at::Tensor& cap_index, at::Tensor& cap_buf,             \
                                 const at::Tensor& flag);                                      \
  void residual_add_##DEV(at::Tensor& r, const at::Tensor& token_slot, const at::Tensor& alpha, \
                          const at::Tensor& urow, const at::Tensor& pool,                      \
                          const at::Tensor& flag);                                             \
  void neuron_gain_##DEV(at::Tensor& m, const at::Tensor& token_slot, const at::Tensor& gamma, \
                         const at::Tensor& nrow, const at::Tensor& masks, const at::Tensor& flag);

EMOSTEER_DECLARE_OPS(cpu)
EMOSTEER_DECLARE_OPS(cuda)

#undef EMOSTEER_DECLARE_OPS

}  // namespace emosteer
