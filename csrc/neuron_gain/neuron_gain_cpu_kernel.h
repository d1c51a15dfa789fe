// The CPU token loop of neuron_gain, vectorized over the neurons with
// at::vec::Vectorized<float>. Compiled once per ISA (see cpu_vec.h): included by
// neuron_gain_cpu.cpp (portable build) and neuron_gain_avx2_cpu.cpp (AVX2 build).
#pragma once

#include "neuron_gain/neuron_gain.h"

namespace emosteer {
namespace neuron_gain {
namespace CPU_CAPABILITY {

template <typename scalar_t>
void tokens(const CpuArgs& p, int64_t begin, int64_t end) {
  using namespace emosteer::cpu::CPU_CAPABILITY;
  const int64_t I = p.I;
  scalar_t* m = static_cast<scalar_t*>(p.m);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t s = p.token_slot[t];
    if (s < 0) continue;
    const int64_t row = p.nrow[s];
    if (row < 0) continue;
    const fVec gm1(p.gamma[s] - 1.0f);
    scalar_t* mt = m + t * I;
    const float* mask = p.masks + row * I;
    for (int64_t i = 0; i < I; i += kChunk) {
      const int64_t n = std::min(kChunk, I - i);
      const uint64_t lanes = n == 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1;
      fVec k0, k1;
      load2(mask + i, n, k0, k1);
      const fVec g0 = gain(gm1, k0), g1 = gain(gm1, k1);
      // Elements with g == 1 are not rewritten at all (bit-identical, NaN included):
      // a chunk of only those is skipped, a mixed one stores just the others.
      const uint64_t keep = ones_mask(g0, g1) & lanes;
      if (keep == lanes) continue;
      fVec m0, m1;
      load2(mt + i, n, m0, m1);
      if (keep == 0) {
        store2(mt + i, n, mul_rn(m0, g0), mul_rn(m1, g1));
      } else {
        scalar_t out[kChunk];
        store2(out, n, mul_rn(m0, g0), mul_rn(m1, g1));
        for (int64_t j = 0; j < n; ++j) {
          if (!((keep >> j) & 1)) mt[i + j] = out[j];
        }
      }
    }
  }
}

template void tokens<float>(const CpuArgs&, int64_t, int64_t);
template void tokens<c10::Half>(const CpuArgs&, int64_t, int64_t);
template void tokens<c10::BFloat16>(const CpuArgs&, int64_t, int64_t);

}  // namespace CPU_CAPABILITY
}  // namespace neuron_gain
}  // namespace emosteer
