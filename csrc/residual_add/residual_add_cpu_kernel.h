// The CPU token loop of residual_add, vectorized over the hidden size with
// at::vec::Vectorized<float>. Compiled once per ISA (see cpu_vec.h): included by
// residual_add_cpu.cpp (portable build) and residual_add_avx2_cpu.cpp (AVX2 build).
#pragma once

#include "residual_add/residual_add.h"

namespace emosteer {
namespace residual_add {
namespace CPU_CAPABILITY {

template <typename scalar_t>
void tokens(const CpuArgs& p, int64_t begin, int64_t end) {
  using namespace emosteer::cpu::CPU_CAPABILITY;
  const int64_t d = p.d;
  scalar_t* r = static_cast<scalar_t*>(p.r);
  const scalar_t* pool = static_cast<const scalar_t*>(p.pool);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t s = p.token_slot[t];
    if (s < 0) continue;
    const int64_t row = p.urow[s];
    if (row < 0) continue;
    const fVec al(p.alpha[s]);
    scalar_t* rt = r + t * d;
    const scalar_t* u = pool + row * d;
    for (int64_t i = 0; i < d; i += kChunk) {
      const int64_t n = std::min(kChunk, d - i);
      fVec r0, r1, u0, u1;
      load2(rt + i, n, r0, r1);
      load2(u + i, n, u0, u1);
      store2(rt + i, n, steer(r0, al, u0), steer(r1, al, u1));
    }
  }
}

template void tokens<float>(const CpuArgs&, int64_t, int64_t);
template void tokens<c10::Half>(const CpuArgs&, int64_t, int64_t);
template void tokens<c10::BFloat16>(const CpuArgs&, int64_t, int64_t);

}  // namespace CPU_CAPABILITY
}  // namespace residual_add
}  // namespace emosteer
