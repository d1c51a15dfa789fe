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
                                 const at::Tensor& c,                                          \
                                 const at::Tensor& vrow, const at::Tensor& row_off,            \
                                 const at::Tensor& pool,                                       \
                                 const at::Tensor& cap_index, at::Tensor& cap_buf,             \
                                 const at::Tensor& flag);                                      \
  void residual_steer_##DEV(at::Tensor& r, const at::Tensor& x,                                \
                            const at::Tensor& token_slot,                                      \
                            const at::Tensor& coef, const at::Tensor& mode,                    \
                            const at::Tensor& urow, const at::Tensor& pool,                    \
                            const at::Tensor& flag);                                           \
  void neuron_gain_##DEV(at::Tensor& m, const at::Tensor& token_slot,                          \
                         const at::Tensor& gamma, const at::Tensor& nrow,                      \
                         const at::Tensor& masks, const at::Tensor& flag);                     \
  void probe_gate_##DEV(const at::Tensor& h, at::Tensor& token_slot,                           \
                        const at::Tensor& prow, const at::Tensor& probes,                      \
                        const at::Tensor& bias, const at::Tensor& thresh,                      \
                        const at::Tensor& gmode, const at::Tensor& state_row,                  \
                        at::Tensor& state, const at::Tensor& score_index,                      \
                        at::Tensor& score_buf, const at::Tensor& flag);

EMOSTEER_DECLARE_OPS(cpu)
EMOSTEER_DECLARE_OPS(cuda)

#undef EMOSTEER_DECLARE_OPS

// VEE inside attention over the paged KV cache: CPU only. On a GPU this op runs as the
// Triton kernel (emosteer/ops/triton/attn_image_boost.py); there is no CUDA C++ twin, so it is not
// in the macro above and bindings_cuda.cpp does not bind it.
void attn_image_boost_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                          const at::Tensor& value_cache, const at::Tensor& block_table,
                          const at::Tensor& token_row, const at::Tensor& token_pos,
                          const at::Tensor& token_slot, const at::Tensor& beta,
                          const at::Tensor& logit_mode, const at::Tensor& spans,
                          const at::Tensor& cap_index, at::Tensor& mass_buf,
                          const at::Tensor& sm_scale, const at::Tensor& flag);

}  // namespace emosteer
