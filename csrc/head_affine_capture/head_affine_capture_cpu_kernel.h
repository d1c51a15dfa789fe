// The CPU token loop of head_affine_capture, vectorized over head_dim with
// at::vec::Vectorized<float>. Compiled once per ISA (see cpu_vec.h): included by
// head_affine_capture_cpu.cpp (portable build) and head_affine_capture_avx2_cpu.cpp
// (AVX2 build), each of which has included cpu_vec.h first.
#pragma once

#include <cmath>
#include <cstring>

#include "head_affine_capture/head_affine_capture.h"

namespace emosteer {
namespace head_affine_capture {
namespace CPU_CAPABILITY {

template <typename scalar_t>
void tokens(const CpuArgs& p, int64_t begin, int64_t end) {
  using namespace emosteer::cpu::CPU_CAPABILITY;
  const int64_t H = p.H, D = p.D, row = H * D;
  scalar_t* z = static_cast<scalar_t*>(p.z);
  const scalar_t* pool = static_cast<const scalar_t*>(p.pool);
  scalar_t* cap_buf = static_cast<scalar_t*>(p.cap_buf);
  const fVec zero(0.0f);
  for (int64_t t = begin; t < end; ++t) {
    scalar_t* zt = z + t * row;
    const int64_t c = p.cap_index[t];
    if (c >= 0) std::memcpy(cap_buf + c * row, zt, sizeof(scalar_t) * row);
    const int64_t s = p.token_slot[t];
    if (s < 0) continue;
    for (int64_t h = 0; h < H; ++h) {
      const float ah = p.a[s * H + h];
      const float bh = p.b[s * H + h];
      const float ch = p.c[s * H + h];
      if (is_identity(ah, bh, ch)) continue;  // not even rewritten: bit-identical
      scalar_t* zh = zt + h * D;
      float norm = 0.0f;
      if (ch != 0.0f) {  // a relative add: ||z[t,h]|| first, before anything is written
        fVec sq0(0.0f), sq1(0.0f);
        for (int64_t i = 0; i < D; i += kChunk) {
          fVec z0, z1;
          load2(zh + i, std::min(kChunk, D - i), z0, z1);
          sq0 = sq0 + z0 * z0;
          sq1 = sq1 + z1 * z1;
        }
        norm = std::sqrt(lane_sum(sq0 + sq1));
      }
      const fVec va(ah), vb(weight(bh, ch, norm));
      const int64_t vr = p.vrow[s * H + h];
      const scalar_t* vh = vr >= 0 ? pool + ((vr + p.row_off[t]) * H + h) * D : nullptr;
      for (int64_t i = 0; i < D; i += kChunk) {
        const int64_t n = std::min(kChunk, D - i);
        fVec z0, z1, v0 = zero, v1 = zero;
        load2(zh + i, n, z0, z1);
        if (vh != nullptr) load2(vh + i, n, v0, v1);
        store2(zh + i, n, affine(z0, va, vb, v0), affine(z1, va, vb, v1));
      }
    }
  }
}

template void tokens<float>(const CpuArgs&, int64_t, int64_t);
template void tokens<c10::Half>(const CpuArgs&, int64_t, int64_t);
template void tokens<c10::BFloat16>(const CpuArgs&, int64_t, int64_t);

}  // namespace CPU_CAPABILITY
}  // namespace head_affine_capture
}  // namespace emosteer
