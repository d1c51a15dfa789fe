// The CPU score loop of probe_gate (the probe's dot product per gated token),
// vectorized over the hidden size with at::vec::Vectorized<float>. Compiled once per
// ISA (see cpu_vec.h): included by probe_gate_cpu.cpp (portable build) and
// probe_gate_avx2_cpu.cpp (AVX2 build).
#pragma once

#include "probe_gate/probe_gate.h"

namespace emosteer {
namespace probe_gate {
namespace CPU_CAPABILITY {

template <typename scalar_t>
void scores(const CpuArgs& p, int64_t begin, int64_t end) {
  using namespace emosteer::cpu::CPU_CAPABILITY;
  const int64_t d = p.d;
  const scalar_t* h = static_cast<const scalar_t*>(p.h);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t s = p.token_slot[t];
    if (s < 0) continue;
    const int64_t row = p.prow[s];
    if (row < 0) continue;
    const scalar_t* x = h + t * d;
    const float* w = p.probes + row * d;
    fVec a0(0.0f), a1(0.0f);
    for (int64_t i = 0; i < d; i += kChunk) {
      const int64_t n = std::min(kChunk, d - i);
      fVec x0, x1, w0, w1;
      load2(x + i, n, x0, x1);
      load2(w + i, n, w0, w1);
      a0 = a0 + x0 * w0;
      a1 = a1 + x1 * w1;
    }
    __at_align__ float lanes[kW];
    (a0 + a1).store(lanes);
    float sum = 0.0f;
    for (int64_t k = 0; k < kW; ++k) sum += lanes[k];
    p.score[t] = sum + p.bias[s];
  }
}

template void scores<float>(const CpuArgs&, int64_t, int64_t);
template void scores<c10::Half>(const CpuArgs&, int64_t, int64_t);
template void scores<c10::BFloat16>(const CpuArgs&, int64_t, int64_t);

}  // namespace CPU_CAPABILITY
}  // namespace probe_gate
}  // namespace emosteer
