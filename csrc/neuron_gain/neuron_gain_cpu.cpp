// CPU twin of neuron_gain: checks, then at::parallel_for over tokens (for large
// batches only) of the vectorized token loop in neuron_gain_cpu_kernel.h, AVX2 build
// where the CPU has it (neuron_gain_avx2_cpu.cpp), else the portable build compiled here.
#include "cpu_vec.h"  // first: this file holds the portable (DEFAULT) build

#include <ATen/Parallel.h>

#include "neuron_gain/neuron_gain.h"
#include "neuron_gain/neuron_gain_cpu_kernel.h"

namespace emosteer {

void neuron_gain_cpu(at::Tensor& m, const at::Tensor& token_slot, const at::Tensor& gamma,
                     const at::Tensor& nrow, const at::Tensor& masks, const at::Tensor& flag) {
  TORCH_CHECK(m.device().is_cpu(), "m must be a CPU tensor for the CPU kernel");
  const int64_t S = neuron_gain::check_neuron_gain(m, token_slot, gamma, nrow, masks, flag);
  if (flag.data_ptr<int32_t>()[0] == 0) return;  // read once: the whole op is off
  if (m.numel() == 0) return;
  const int64_t T = m.size(0), I = m.size(1);
  check_index_values(token_slot.data_ptr<int32_t>(), T, S, "token_slot", "slots");
  check_index_values(nrow.data_ptr<int32_t>(), S, masks.size(0), "nrow", "mask rows");
  const neuron_gain::CpuArgs args{m.data_ptr(), token_slot.data_ptr<int32_t>(),
                             gamma.data_ptr<float>(), nrow.data_ptr<int32_t>(),
                             masks.data_ptr<float>(), I};
  EMOSTEER_DISPATCH_FLOAT_TYPES(m.scalar_type(), "neuron_gain_cpu", [&] {
    auto* tokens = &neuron_gain::DEFAULT::tokens<scalar_t>;
#if EMOSTEER_HAVE_AVX2_BUILD
    if (cpu_use_avx2()) tokens = &neuron_gain::AVX2::tokens<scalar_t>;
#endif
    at::parallel_for(0, T, grain_for(I),
                     [&](int64_t begin, int64_t end) { tokens(args, begin, end); });
  });
}

}  // namespace emosteer
