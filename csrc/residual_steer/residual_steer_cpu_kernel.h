// The CPU token loop of residual_steer, vectorized over the hidden size with
// at::vec::Vectorized<float>. Compiled once per ISA (see cpu_vec.h): included by
// residual_steer_cpu.cpp (portable build) and residual_steer_avx2_cpu.cpp (AVX2 build).
//
// Per token: the weights w_k first, into the launcher's [T, K] float scratch (an
// absolute add's weight is its coef; where some term reads n or c_k, one pass over the
// rows of r and x accumulates h*h and h*u_k, h = x + r, in float vectors, kMaxDots terms
// at a time, summed lane by lane at the end; x is read only then), then one pass
// writing r + w_0*u_0 + ... chunk by chunk, the terms in k order. No std:: containers
// here: their inline code would be shared with the portable build (see cpu_vec.h).
#pragma once

#include <cmath>

#include "residual_steer/residual_steer.h"

namespace emosteer {
namespace residual_steer {
namespace CPU_CAPABILITY {

using emosteer::cpu::CPU_CAPABILITY::fVec;
using emosteer::cpu::CPU_CAPABILITY::lane_sum;

// Dot products accumulated per pass over the row (more terms: another pass).
constexpr int64_t kMaxDots = 8;

// w[k] of the token whose rows of r and x are rt and xt, for slot s (h = xt + rt; terms
// without a row are left alone).
template <typename scalar_t>
void weights(const CpuArgs& p, const scalar_t* rt, const scalar_t* xt, int64_t s,
             float* w) {
  using namespace emosteer::cpu::CPU_CAPABILITY;
  const int64_t d = p.d, K = p.K;
  const scalar_t* pool = static_cast<const scalar_t*>(p.pool);
  const int32_t* urow = p.urow + s * K;
  const int32_t* mode = p.mode + s * K;
  const float* coef = p.coef + s * K;
  float norm = 0.0f;
  bool have_norm = false;
  int64_t k = 0;
  while (k < K) {
    // The next batch: up to kMaxDots terms that read c_k (and the norm, once).
    int64_t batch[kMaxDots];
    int64_t nb = 0;
    bool want_norm = false;
    for (; k < K && nb < kMaxDots; ++k) {
      if (urow[k] < 0) continue;
      if (!needs_dots(mode[k])) {
        w[k] = coef[k];
        continue;
      }
      batch[nb++] = k;
      want_norm = !have_norm;
    }
    if (nb == 0) break;
    fVec sq0(0.0f), sq1(0.0f);
    fVec acc[2 * kMaxDots];
    for (int64_t j = 0; j < 2 * nb; ++j) acc[j] = fVec(0.0f);
    for (int64_t i = 0; i < d; i += kChunk) {
      const int64_t n = std::min(kChunk, d - i);
      fVec r0, r1, x0, x1;
      load2(rt + i, n, r0, r1);
      load2(xt + i, n, x0, x1);
      const fVec h0 = x0 + r0, h1 = x1 + r1;
      if (want_norm) {
        sq0 = sq0 + h0 * h0;
        sq1 = sq1 + h1 * h1;
      }
      for (int64_t j = 0; j < nb; ++j) {
        fVec u0, u1;
        load2(pool + urow[batch[j]] * d + i, n, u0, u1);
        acc[2 * j] = acc[2 * j] + h0 * u0;
        acc[2 * j + 1] = acc[2 * j + 1] + h1 * u1;
      }
    }
    if (want_norm) {
      norm = std::sqrt(lane_sum(sq0 + sq1));
      have_norm = true;
    }
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t kk = batch[j];
      w[kk] = weight(mode[kk], coef[kk], norm, lane_sum(acc[2 * j] + acc[2 * j + 1]));
    }
  }
}

template <typename scalar_t>
void tokens(const CpuArgs& p, int64_t begin, int64_t end) {
  using namespace emosteer::cpu::CPU_CAPABILITY;
  const int64_t d = p.d, K = p.K;
  scalar_t* r = static_cast<scalar_t*>(p.r);
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const scalar_t* pool = static_cast<const scalar_t*>(p.pool);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t s = p.token_slot[t];
    if (s < 0) continue;
    const int32_t* urow = p.urow + s * K;
    bool any = false;
    for (int64_t k = 0; k < K; ++k) any = any || urow[k] >= 0;
    if (!any) continue;
    scalar_t* rt = r + t * d;
    float* w = p.w + t * K;
    weights(p, rt, x + t * d, s, w);
    for (int64_t i = 0; i < d; i += kChunk) {
      const int64_t n = std::min(kChunk, d - i);
      fVec o0, o1;
      load2(rt + i, n, o0, o1);
      for (int64_t k = 0; k < K; ++k) {
        if (urow[k] < 0) continue;
        const fVec wk(w[k]);
        fVec u0, u1;
        load2(pool + urow[k] * d + i, n, u0, u1);
        o0 = step(o0, wk, u0);
        o1 = step(o1, wk, u1);
      }
      store2(rt + i, n, o0, o1);
    }
  }
}

template void tokens<float>(const CpuArgs&, int64_t, int64_t);
template void tokens<c10::Half>(const CpuArgs&, int64_t, int64_t);
template void tokens<c10::BFloat16>(const CpuArgs&, int64_t, int64_t);

}  // namespace CPU_CAPABILITY
}  // namespace residual_steer
}  // namespace emosteer
