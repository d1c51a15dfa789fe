// The CPU loop of attn_image_boost for one (token, KV head) work item, vectorized over
// head_dim with at::vec::Vectorized<float>. Compiled once per ISA (see cpu_vec.h):
// included by attn_image_boost_cpu.cpp (portable build) and
// attn_image_boost_avx2_cpu.cpp (AVX2 build), each of which has included cpu_vec.h first.
//
// Per item, for the group's active query heads (rewritten, or all of them when the
// token is captured): the keys are read block by block (one gather into a float tile
// serves every head of the group), logits, boost, softmax in float32, then, for the
// rewritten heads, the values block by block into float accumulators, cast once.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "attn_image_boost/attn_image_boost.h"

namespace emosteer {
namespace attn_image_boost {
namespace CPU_CAPABILITY {

using emosteer::cpu::CPU_CAPABILITY::fVec;
using emosteer::cpu::CPU_CAPABILITY::kChunk;
using emosteer::cpu::CPU_CAPABILITY::kW;
using emosteer::cpu::CPU_CAPABILITY::lane_sum;

// nb positions of one block (position stride s_pos, head_dim stride s_d) as floats at
// dst[i * dst_pos + d * dst_d]: rows (dst_pos = D, dst_d = 1) for the values and the
// prefill path, transposed (dst_pos = 1, dst_d = nb) for the decode logits, which are
// vectorized over the keys. The loops follow the smaller source stride (vLLM's CPU key
// cache has head_dim strided and the positions contiguous).
template <typename scalar_t>
inline void gather(const scalar_t* base, int64_t s_pos, int64_t s_d, int64_t nb, int64_t D,
                   float* dst, int64_t dst_pos, int64_t dst_d) {
  if (s_d <= s_pos) {
    for (int64_t i = 0; i < nb; ++i) {
      const scalar_t* src = base + i * s_pos;
      float* row = dst + i * dst_pos;
      if (s_d == 1 && dst_d == 1) {  // both contiguous: a loop the compiler vectorizes
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(src[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) row[d * dst_d] = static_cast<float>(src[d * s_d]);
      }
    }
  } else {
    for (int64_t d = 0; d < D; ++d) {
      const scalar_t* src = base + d * s_d;
      float* col = dst + d * dst_d;
      if (s_pos == 1 && dst_pos == 1) {
        for (int64_t i = 0; i < nb; ++i) col[i] = static_cast<float>(src[i]);
      } else {
        for (int64_t i = 0; i < nb; ++i) col[i * dst_pos] = static_cast<float>(src[i * s_pos]);
      }
    }
  }
}

// l[i] = (q . k_i) * scale for the nb keys of a transposed block kt [D, nb]: per group
// of up to 4 vectors of keys, independent accumulators summed over d in order.
inline void qk_block(const float* q, const float* kt, int64_t nb, int64_t D, float scale,
                     float* l) {
  const fVec vs(scale);
  int64_t i = 0;
  for (; i + 4 * kW <= nb; i += 4 * kW) {
    fVec a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f);
    for (int64_t d = 0; d < D; ++d) {
      const fVec qd(q[d]);
      const float* k = kt + d * nb + i;
      a0 = a0 + qd * fVec::loadu(k);
      a1 = a1 + qd * fVec::loadu(k + kW);
      a2 = a2 + qd * fVec::loadu(k + 2 * kW);
      a3 = a3 + qd * fVec::loadu(k + 3 * kW);
    }
    (a0 * vs).store(l + i);
    (a1 * vs).store(l + i + kW);
    (a2 * vs).store(l + i + 2 * kW);
    (a3 * vs).store(l + i + 3 * kW);
  }
  for (; i < nb; i += kW) {
    const int r = static_cast<int>(std::min(kW, nb - i));
    fVec a(0.0f);
    for (int64_t d = 0; d < D; ++d) a = a + fVec(q[d]) * fVec::loadu(kt + d * nb + i, r);
    (a * vs).store(l + i, r);
  }
}

// acc[0..D) += w * v[0..D)
inline void axpy(float* acc, float w, const float* v, int64_t D) {
  const fVec vw(w);
  int64_t i = 0;
  for (; i + kW <= D; i += kW) (fVec::loadu(acc + i) + vw * fVec::loadu(v + i)).store(acc + i);
  if (i < D) {
    const int m = static_cast<int>(D - i);
    (fVec::loadu(acc + i, m) + vw * fVec::loadu(v + i, m)).store(acc + i, m);
  }
}

// Largest lane of v; NaN if any lane is NaN (the softmax then gives NaN, as torch's).
inline float lane_max(const fVec& v) {
  __at_align__ float lanes[kW];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t k = 1; k < kW; ++k) m = (lanes[k] > m || std::isnan(lanes[k])) ? lanes[k] : m;
  return m;
}

// x[lo..hi) summed: vector lanes, then the lanes in order, then the tail.
inline float range_sum(const float* x, int64_t lo, int64_t hi) {
  fVec acc(0.0f);
  int64_t j = lo;
  for (; j + kW <= hi; j += kW) acc = acc + fVec::loadu(x + j);
  float s = lane_sum(acc);
  for (; j < hi; ++j) s += x[j];
  return s;
}

// In place over n logits: max, exp(l - max), sum, times 1/sum (as torch's CPU softmax).
// A NaN logit (or +inf) makes every weight NaN, as in torch.
inline void softmax(float* l, int64_t n) {
  fVec vmax(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kW <= n; j += kW) vmax = at::vec::maximum(vmax, fVec::loadu(l + j));
  float m = lane_max(vmax);
  for (; j < n; ++j) m = (l[j] > m || std::isnan(l[j])) ? l[j] : m;
  const fVec vm(m);
  fVec vs(0.0f);
  j = 0;
  for (; j + kW <= n; j += kW) {
    const fVec ve = (fVec::loadu(l + j) - vm).exp();
    ve.store(l + j);
    vs = vs + ve;
  }
  float sum = lane_sum(vs);
  for (; j < n; ++j) {
    l[j] = std::exp(l[j] - m);
    sum += l[j];
  }
  const fVec inv(1.0f / sum);
  j = 0;
  for (; j + kW <= n; j += kW) (fVec::loadu(l + j) * inv).store(l + j);
  if (j < n) {
    const int r = static_cast<int>(n - j);
    (fVec::loadu(l + j, r) * inv).store(l + j, r);
  }
}

template <typename scalar_t>
void item(const CpuArgs& p, int64_t t, int64_t g, const Scratch& w) {
  const int64_t H = p.H, D = p.D, BS = p.BS, NS = p.NS, group = H / p.KVH;
  const int64_t r = p.token_row[t];
  const int64_t n = static_cast<int64_t>(p.token_pos[t]) + 1;  // keys 0..n-1
  const int64_t s = p.token_slot[t];
  const int64_t c = p.cap_index[t];
  const int32_t* sp = p.spans + r * NS * 2;

  // Image keys of this row that the token sees.
  std::memset(w.img, 0, static_cast<size_t>(n));
  bool sees = false;
  for (int64_t k = 0; k < NS; ++k) {
    int64_t lo, hi;
    visible_span(sp[2 * k], sp[2 * k + 1], n, lo, hi);
    if (lo < hi) {
      sees = true;
      std::memset(w.img + lo, 1, static_cast<size_t>(hi - lo));
    }
  }

  // Active heads of the group: rewritten ones, and every one when captured.
  int64_t nh = 0;
  bool any_rw = false;
  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    const bool rw = s >= 0 && sees && p.beta[s * H + h] != 1.0f;
    if (!rw && c < 0) continue;
    w.heads[nh] = static_cast<int32_t>(h);
    w.rw[nh] = rw;
    any_rw = any_rw || rw;
    ++nh;
  }
  if (nh == 0) return;
  if (!sees) {  // captured only, no visible image key: every span's mass is 0
    for (int64_t a = 0; a < nh; ++a) {
      float* mass = p.mass_buf + (c * H + w.heads[a]) * NS;
      for (int64_t k = 0; k < NS; ++k) mass[k] = 0.0f;
    }
    return;
  }

  const scalar_t* query = static_cast<const scalar_t*>(p.query) + t * p.q_st[0];
  for (int64_t a = 0; a < nh; ++a) {
    const scalar_t* qh = query + w.heads[a] * p.q_st[1];
    for (int64_t d = 0; d < D; ++d) w.q[a * D + d] = static_cast<float>(qh[d * p.q_st[2]]);
  }
  const int32_t* bt = p.block_table + r * p.bt_st[0];

  // Logits, one block of keys at a time.
  const scalar_t* kc = static_cast<const scalar_t*>(p.key_cache) + g * p.k_st[2];
  for (int64_t j0 = 0; j0 < n; j0 += BS) {
    const int64_t nb = std::min(BS, n - j0);
    const int64_t blk = bt[(j0 / BS) * p.bt_st[1]];
    gather(kc + blk * p.k_st[0], p.k_st[1], p.k_st[3], nb, D, w.kv, 1, nb);
    for (int64_t a = 0; a < nh; ++a) qk_block(w.q + a * D, w.kv, nb, D, p.scale, w.logits + a * n + j0);
  }

  // Boost of the image logits, then the softmax.
  for (int64_t a = 0; a < nh; ++a) {
    float* l = w.logits + a * n;
    if (w.rw[a]) {
      const float b = p.beta[s * H + w.heads[a]];
      if (p.logit_mode[s] == 0) {
        const float lb = log_boost(b);
        for (int64_t j = 0; j < n; ++j) l[j] = w.img[j] ? l[j] + lb : l[j];
      } else {
        for (int64_t j = 0; j < n; ++j) l[j] = w.img[j] ? l[j] * b : l[j];
      }
    }
    softmax(l, n);
  }

  // The rewritten heads' outputs, one block of values at a time.
  if (any_rw) {
    for (int64_t a = 0; a < nh; ++a) {
      if (w.rw[a]) std::memset(w.acc + a * D, 0, sizeof(float) * static_cast<size_t>(D));
    }
    const scalar_t* vc = static_cast<const scalar_t*>(p.value_cache) + g * p.v_st[2];
    for (int64_t j0 = 0; j0 < n; j0 += BS) {
      const int64_t nb = std::min(BS, n - j0);
      const int64_t blk = bt[(j0 / BS) * p.bt_st[1]];
      gather(vc + blk * p.v_st[0], p.v_st[1], p.v_st[3], nb, D, w.kv, D, 1);
      for (int64_t a = 0; a < nh; ++a) {
        if (!w.rw[a]) continue;
        const float* wa = w.logits + a * n + j0;
        float* acc = w.acc + a * D;
        for (int64_t i = 0; i < nb; ++i) axpy(acc, wa[i], w.kv + i * D, D);
      }
    }
    scalar_t* out = static_cast<scalar_t*>(p.out) + t * H * D;
    for (int64_t a = 0; a < nh; ++a) {
      if (!w.rw[a]) continue;
      scalar_t* o = out + w.heads[a] * D;
      const float* acc = w.acc + a * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
    }
  }

  // Attention mass per span under the attention just run.
  if (c >= 0) {
    for (int64_t a = 0; a < nh; ++a) {
      const float* wa = w.logits + a * n;
      float* mass = p.mass_buf + (c * H + w.heads[a]) * NS;
      for (int64_t k = 0; k < NS; ++k) {
        int64_t lo, hi;
        visible_span(sp[2 * k], sp[2 * k + 1], n, lo, hi);
        mass[k] = lo < hi ? range_sum(wa, lo, hi) : 0.0f;
      }
    }
  }
}

void prefill_rows(const PrefillTile& p, int64_t begin, int64_t end) {
  const int64_t nn = p.nn, mm = p.mm, group = p.group, H = p.H;
  const fVec zero(0.0f), vscale(p.scale);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t g = row / (mm * group), i = (row / group) % mm, a = row % group;
    const int64_t h = g * group + a, t = p.ta + i, seen = p.pa + i + 1, s = p.slot[t];
    float* x = p.logits + row * nn;
    const bool boost = p.rw[i * H + h] != 0;
    const float b = boost ? p.beta[s * H + h] : 1.0f;
    const bool add = boost && p.lmode[s] == 0;
    const float lb = add ? log_boost(b) : 0.0f;
    // Scale and boost (one rounding each, as the reference), then the softmax; the
    // future keys get weight 0.
    const fVec vb(b), vlb(lb);
    int64_t j = 0;
    for (; j + kW <= seen; j += kW) {
      fVec v = fVec::loadu(x + j) * vscale;
      if (boost) v = fVec::blendv(v, add ? v + vlb : v * vb, fVec::loadu(p.img + j) != zero);
      v.store(x + j);
    }
    for (; j < seen; ++j) {
      float v = x[j] * p.scale;
      if (boost && p.img[j] != 0.0f) v = add ? v + lb : v * b;
      x[j] = v;
    }
    softmax(x, seen);
    if (nn > seen) std::memset(x + seen, 0, sizeof(float) * static_cast<size_t>(nn - seen));
    const int64_t c = p.cap[t];
    if (c >= 0) {
      float* mass = p.mass_buf + (c * H + h) * p.NS;
      for (int64_t k = 0; k < p.NS; ++k) {
        const int64_t lo = p.span_lo[k], hi = std::min(p.span_hi[k], seen);
        mass[k] = lo < hi ? range_sum(x, lo, hi) : 0.0f;
      }
    }
  }
}

template void item<float>(const CpuArgs&, int64_t, int64_t, const Scratch&);
template void item<c10::Half>(const CpuArgs&, int64_t, int64_t, const Scratch&);
template void item<c10::BFloat16>(const CpuArgs&, int64_t, int64_t, const Scratch&);

}  // namespace CPU_CAPABILITY
}  // namespace attn_image_boost
}  // namespace emosteer
