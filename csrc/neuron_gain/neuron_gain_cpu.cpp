// CPU twins of neuron_gain and silu_and_mul_gain: at::parallel_for over tokens,
// per-element math from neuron_gain.h.
#include <ATen/Parallel.h>

#include <algorithm>

#include "neuron_gain/neuron_gain.h"

namespace emosteer {
namespace {

template <typename scalar_t>
void neuron_gain_kernel(scalar_t* m,                // [T, I]
                        const int32_t* token_slot,  // [T]
                        const float* g,             // [S, I]
                        int64_t T, int64_t I, int64_t S) {
  at::parallel_for(0, T, grain_for(I), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = token_slot[t];
      if (s < 0) continue;
      TORCH_CHECK(s < S, "token_slot[", t, "] = ", s, " but there are ", S, " slots");
      scalar_t* mt = m + t * I;
      const float* gs = g + s * I;
      // A select, not a branch, so the loop vectorizes; gain 1 stores m back unchanged.
      for (int64_t i = 0; i < I; ++i) {
        const scalar_t scaled = static_cast<scalar_t>(mul_rn(static_cast<float>(mt[i]), gs[i]));
        mt[i] = neuron::is_identity(gs[i]) ? mt[i] : scaled;
      }
    }
  });
}

template <typename scalar_t>
void silu_and_mul_gain_kernel(scalar_t* out,              // [T, I]
                              const scalar_t* x,          // [T, 2I]
                              const int32_t* token_slot,  // [T]
                              const float* g,             // [S, I]
                              int64_t T, int64_t I, int64_t S) {
  at::parallel_for(0, T, grain_for(3 * I), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = token_slot[t];
      TORCH_CHECK(s < S, "token_slot[", t, "] = ", s, " but there are ", S, " slots");
      const scalar_t* gate = x + t * 2 * I;
      const scalar_t* up = gate + I;
      scalar_t* ot = out + t * I;
      if (s < 0) {
        for (int64_t i = 0; i < I; ++i) {
          ot[i] = static_cast<scalar_t>(
              neuron::silu_mul(static_cast<float>(gate[i]), static_cast<float>(up[i])));
        }
      } else {
        const float* gs = g + s * I;
        for (int64_t i = 0; i < I; ++i) {
          ot[i] = neuron::gained<scalar_t>(
              neuron::silu_mul(static_cast<float>(gate[i]), static_cast<float>(up[i])), gs[i]);
        }
      }
    }
  });
}

}  // namespace

void neuron_gain_cpu(at::Tensor& m, const at::Tensor& token_slot, const at::Tensor& g) {
  TORCH_CHECK(m.device().is_cpu(), "m must be a CPU tensor for the CPU kernel");
  const int64_t S = neuron::check_neuron_gain(m, token_slot, g);
  if (m.numel() == 0) return;
  EMOSTEER_DISPATCH_FLOAT_TYPES(m.scalar_type(), "neuron_gain_cpu", [&] {
    neuron_gain_kernel<scalar_t>(m.data_ptr<scalar_t>(), token_slot.data_ptr<int32_t>(),
                                 g.data_ptr<float>(), m.size(0), m.size(1), S);
  });
}

void silu_and_mul_gain_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& token_slot,
                           const at::Tensor& g) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernel");
  const int64_t S = neuron::check_silu_and_mul_gain(out, x, token_slot, g);
  if (out.numel() == 0) return;
  EMOSTEER_DISPATCH_FLOAT_TYPES(x.scalar_type(), "silu_and_mul_gain_cpu", [&] {
    silu_and_mul_gain_kernel<scalar_t>(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                       token_slot.data_ptr<int32_t>(), g.data_ptr<float>(),
                                       out.size(0), out.size(1), S);
  });
}

}  // namespace emosteer
