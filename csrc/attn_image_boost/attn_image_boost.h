// VEE inside attention (attn_image_boost), shared by the CPU launcher and its two ISA
// builds of the per-(token, KV head) loop. There is no CUDA C++ twin: the GPU path is
// the Triton kernel (emosteer/ops/triton/attn_image_boost.py). Semantics
// (emosteer/ops/reference.py):
//
//   if flag[0] == 0: nothing at all
//   token t, r = token_row[t] >= 0, n = token_pos[t] + 1 keys j = 0..n-1, key j read from
//     key_cache/value_cache[block_table[r, j / BS], j % BS, h / (H / KVH)] (any strides)
//   l_j = (q[t,h] . k_j) * sm_scale; image key: j in some span [start, end) of spans[r]
//   s = token_slot[t] >= 0, b = beta[s,h] != 1, t sees an image key:
//     image l_j -> l_j + log(b)  (logit_mode[s] == 0: softmax weight x b, renormalised)
//               -> l_j * b       (logit_mode[s] != 0)
//     out[t,h] = softmax(l) @ v, in float32, cast once; every other (t, h): untouched
//   c = cap_index[t] >= 0: mass_buf[c,h,k] = sum of the softmax weights of span k's
//     visible keys (0 for a span with none) under the attention that t runs with
//
// Running example: H = 4, KVH = 2 (heads 0,1 read KV head 0), BS = 16, token_pos = 20
// (keys 0..20: block_table[r,0] then [r,1], 5 keys of the second block), spans[r] =
// [[2, 6], [30, 40]], beta[s] = [1, 2, 1, 1], cap_index = -1: only head 1 is rewritten,
// keys 2..5 weighted x2; span 1 is not visible yet. With cap_index = 3 all four heads
// also get mass_buf[3,h] = [mass of keys 2..5, 0] (heads 0, 2, 3 of plain attention).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace emosteer {
namespace attn_image_boost {

// The additive boost, log(b) rounded once to float: the reference adds the Python float
// math.log(b) to a float32 tensor, which rounds the double to float first.
inline float log_boost(float b) { return static_cast<float>(std::log(static_cast<double>(b))); }

// The visible part [lo, hi) of span [start, end) for a token that sees keys 0..n-1
// (empty when lo >= hi, also for start >= end).
inline void visible_span(int32_t start, int32_t end, int64_t n, int64_t& lo, int64_t& hi) {
  lo = start > 0 ? start : 0;
  hi = end < n ? end : n;
}

// What the CPU launcher hands one ISA build of the per-(token, KV head) loop. Every
// index it will read is already checked (token_row, token_pos, the block ids of the
// blocks read, token_slot, cap_index); spans are clamped, so any values are safe.
struct CpuArgs {
  void* out;                    // [T, H, D] scalar_t, contiguous
  const void* query;            // [T, H, D] scalar_t, strides q_st
  const void* key_cache;        // [NB, BS, KVH, D] scalar_t, strides k_st
  const void* value_cache;      // [NB, BS, KVH, D] scalar_t, strides v_st
  const int32_t* block_table;   // [R, MB], strides bt_st
  const int32_t* token_row;     // [T]
  const int32_t* token_pos;     // [T]
  const int32_t* token_slot;    // [T]
  const float* beta;            // [S, H]
  const int32_t* logit_mode;    // [S]
  const int32_t* spans;         // [R', NS, 2], R' >= R
  const int32_t* cap_index;     // [T], duplicates resolved: only the last token of a row keeps it
  float* mass_buf;              // [C, H, NS]
  float scale;                  // sm_scale[0]
  int64_t H, KVH, D, BS, NS;
  int64_t q_st[3], k_st[4], v_st[4], bt_st[2];
};

// Per-thread scratch of one work item, allocated by the launcher (so that the ISA
// builds use no std:: containers): for the group's g = H / KVH query heads and up to
// n_max keys.
struct Scratch {
  float* q;        // [g, D] the active heads' queries, as float
  float* acc;      // [g, D] their output accumulators
  float* kv;       // [BS, D] one block of keys or values, as float
  float* logits;   // [g, n_max] logits, then softmax weights
  uint8_t* img;    // [n_max] 1 = image key
  int32_t* heads;  // [g] active query heads (rewritten or captured)
  uint8_t* rw;     // [g] 1 = that head is rewritten
};

inline int64_t scratch_floats(int64_t group, int64_t D, int64_t BS, int64_t n_max) {
  return 2 * group * D + BS * D + group * n_max;
}

// One work item: token t, KV head g (the query heads g*group .. (g+1)*group - 1).
namespace DEFAULT {
template <typename scalar_t>
void item(const CpuArgs& p, int64_t t, int64_t g, const Scratch& w);
}
namespace AVX2 {
template <typename scalar_t>
void item(const CpuArgs& p, int64_t t, int64_t g, const Scratch& w);
}

// One tile of a prefill run (prefill_run in attn_image_boost_cpu.cpp): the logits of
// its mm tokens x H heads over its nn keys, laid out [KVH, mm, group, nn] (row index
// (g * mm + i) * group + a for token i, head g * group + a), and what the row pass needs
// to turn them into softmax weights in place: scale, boost of the image keys of the
// rewritten rows, the token's future keys set to 0, softmax, the captured masses.
struct PrefillTile {
  float* logits;           // [KVH * mm * group, nn]
  int64_t nn, mm, group, H;
  int64_t ta, pa;          // the tile's first token and its position
  const uint8_t* rw;       // [mm, H] 1 = (token, head) rewritten
  const float* img;        // [>= nn] 1.0 = image key, else 0.0
  const int32_t* slot;     // [T]
  const float* beta;       // [S, H]
  const int32_t* lmode;    // [S]
  const int32_t* cap;      // [T], duplicates resolved
  float* mass_buf;         // [C, H, NS]
  const int64_t* span_lo;  // [NS] the row's spans clamped to its keys: [lo, hi)
  const int64_t* span_hi;  // [NS]
  int64_t NS;
  float scale;
};

// The row pass over rows [begin, end) of one prefill tile.
namespace DEFAULT {
void prefill_rows(const PrefillTile& p, int64_t begin, int64_t end);
}
namespace AVX2 {
void prefill_rows(const PrefillTile& p, int64_t begin, int64_t end);
}

#if !defined(EMOSTEER_KERNEL_ONLY)
// Host-side checks of dims, dtypes and layouts (values: the launcher). out and the
// small tables must be contiguous; query, the caches and the block table may have any
// strides (vLLM's CPU backend stores keys transposed).
inline void check_args(const at::Tensor& out, const at::Tensor& query,
                       const at::Tensor& key_cache, const at::Tensor& value_cache,
                       const at::Tensor& block_table, const at::Tensor& token_row,
                       const at::Tensor& token_pos, const at::Tensor& token_slot,
                       const at::Tensor& beta, const at::Tensor& logit_mode,
                       const at::Tensor& spans, const at::Tensor& cap_index,
                       const at::Tensor& mass_buf, const at::Tensor& sm_scale,
                       const at::Tensor& flag) {
  const auto dev = out.device();
  EMOSTEER_CHECK_INPUT(out, dev, 3);
  EMOSTEER_CHECK_FLOAT_DTYPE(out);
  const int64_t T = out.size(0), H = out.size(1), D = out.size(2);
  EMOSTEER_CHECK_DEVICE(query, dev);
  EMOSTEER_CHECK_DIM(query, 3);
  EMOSTEER_CHECK_DTYPE(query, out.scalar_type());
  EMOSTEER_CHECK_SIZE(query, 0, T);
  EMOSTEER_CHECK_SIZE(query, 1, H);
  EMOSTEER_CHECK_SIZE(query, 2, D);
  EMOSTEER_CHECK_DEVICE(key_cache, dev);
  EMOSTEER_CHECK_DIM(key_cache, 4);
  EMOSTEER_CHECK_DTYPE(key_cache, out.scalar_type());
  EMOSTEER_CHECK_SIZE(key_cache, 3, D);
  EMOSTEER_CHECK_DEVICE(value_cache, dev);
  EMOSTEER_CHECK_DIM(value_cache, 4);
  EMOSTEER_CHECK_DTYPE(value_cache, out.scalar_type());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache has shape ",
              value_cache.sizes(), "; it must be that of key_cache, ", key_cache.sizes());
  const int64_t KVH = key_cache.size(2);
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "out has ", H, " heads, which is not a multiple of the "
              "cache's ", KVH, " KV heads");
  EMOSTEER_CHECK_DEVICE(block_table, dev);
  EMOSTEER_CHECK_DIM(block_table, 2);
  EMOSTEER_CHECK_DTYPE(block_table, at::kInt);
  for (const at::Tensor* x : {&token_row, &token_pos, &token_slot, &cap_index}) {
    EMOSTEER_CHECK_INPUT(*x, dev, 1);
    TORCH_CHECK(x->scalar_type() == at::kInt && x->size(0) == T,
                "token_row, token_pos, token_slot and cap_index must be int32 of shape [", T,
                "], got ", x->scalar_type(), " ", x->sizes());
  }
  EMOSTEER_CHECK_INPUT(beta, dev, 2);
  EMOSTEER_CHECK_DTYPE(beta, at::kFloat);
  EMOSTEER_CHECK_SIZE(beta, 1, H);
  EMOSTEER_CHECK_INPUT(logit_mode, dev, 1);
  EMOSTEER_CHECK_DTYPE(logit_mode, at::kInt);
  EMOSTEER_CHECK_SIZE(logit_mode, 0, beta.size(0));
  EMOSTEER_CHECK_INPUT(spans, dev, 3);
  EMOSTEER_CHECK_DTYPE(spans, at::kInt);
  EMOSTEER_CHECK_SIZE(spans, 2, 2);
  TORCH_CHECK(spans.size(0) >= block_table.size(0), "spans has ", spans.size(0),
              " rows; the block table has ", block_table.size(0));
  EMOSTEER_CHECK_INPUT(mass_buf, dev, 3);
  EMOSTEER_CHECK_DTYPE(mass_buf, at::kFloat);
  EMOSTEER_CHECK_SIZE(mass_buf, 1, H);
  EMOSTEER_CHECK_SIZE(mass_buf, 2, spans.size(1));
  EMOSTEER_CHECK_INPUT(sm_scale, dev, 1);
  EMOSTEER_CHECK_DTYPE(sm_scale, at::kFloat);
  EMOSTEER_CHECK_SIZE(sm_scale, 0, 1);
  EMOSTEER_CHECK_INPUT(flag, dev, 1);
  EMOSTEER_CHECK_DTYPE(flag, at::kInt);
  EMOSTEER_CHECK_SIZE(flag, 0, 1);
}
#endif

}  // namespace attn_image_boost
}  // namespace emosteer
