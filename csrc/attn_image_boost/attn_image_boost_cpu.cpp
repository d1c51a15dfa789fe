// CPU kernel of attn_image_boost: checks (dims and dtypes, then every index value the
// kernel will read), the list of work items, one per (token, KV head) that has a head to
// rewrite or a capture, and at::parallel_for over them of the loop in
// attn_image_boost_cpu_kernel.h, AVX2 build where the CPU has it
// (attn_image_boost_avx2_cpu.cpp), else the portable build compiled here.
#include "cpu_vec.h"  // first: this file holds the portable (DEFAULT) build

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "attn_image_boost/attn_image_boost.h"
#include "attn_image_boost/attn_image_boost_cpu_kernel.h"

namespace emosteer {

void attn_image_boost_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                          const at::Tensor& value_cache, const at::Tensor& block_table,
                          const at::Tensor& token_row, const at::Tensor& token_pos,
                          const at::Tensor& token_slot, const at::Tensor& beta,
                          const at::Tensor& logit_mode, const at::Tensor& spans,
                          const at::Tensor& cap_index, at::Tensor& mass_buf,
                          const at::Tensor& sm_scale, const at::Tensor& flag) {
  TORCH_CHECK(out.device().is_cpu(), "out must be a CPU tensor for the CPU kernel");
  attn_image_boost::check_args(out, query, key_cache, value_cache, block_table, token_row,
                               token_pos, token_slot, beta, logit_mode, spans, cap_index,
                               mass_buf, sm_scale, flag);
  if (flag.data_ptr<int32_t>()[0] == 0) return;  // read once: the whole op is off
  const int64_t T = out.size(0), H = out.size(1), D = out.size(2);
  if (T == 0 || H == 0) return;
  const int64_t BS = key_cache.size(1), KVH = key_cache.size(2), NB = key_cache.size(0);
  const int64_t group = H / KVH, NS = spans.size(1), S = beta.size(0), C = mass_buf.size(0);
  const int64_t R = block_table.size(0), MB = block_table.size(1);
  const int64_t bt0 = block_table.stride(0), bt1 = block_table.stride(1);
  const int32_t* row = token_row.data_ptr<int32_t>();
  const int32_t* pos = token_pos.data_ptr<int32_t>();
  const int32_t* slot = token_slot.data_ptr<int32_t>();
  const int32_t* cap = cap_index.data_ptr<int32_t>();
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int32_t* sp = spans.data_ptr<int32_t>();
  const float* bta = beta.data_ptr<float>();

  check_index_values(row, T, R, "token_row", "block-table rows");
  check_index_values(slot, T, S, "token_slot", "slots");
  check_index_values(cap, T, C, "cap_index", "capture rows");

  // A capture row written by several tokens ends up with the last one's masses (each
  // writes all H x NS of them): only that token keeps it, so threads never race on it.
  std::vector<int32_t> cap_eff(cap, cap + T);
  {
    std::vector<uint8_t> taken(static_cast<size_t>(C), 0);
    for (int64_t t = T - 1; t >= 0; --t) {
      if (row[t] < 0 || cap_eff[t] < 0) continue;
      if (taken[cap_eff[t]]) {
        cap_eff[t] = -1;
      } else {
        taken[cap_eff[t]] = 1;
      }
    }
  }

  // Work items t * KVH + g with something to do; the positions and block ids they read.
  std::vector<int64_t> items;
  int64_t n_max = 0, work = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t r = row[t];
    if (r < 0) continue;
    const int64_t s = slot[t], c = cap_eff[t];
    bool boosted = false;
    if (s >= 0) {
      for (int64_t h = 0; h < H && !boosted; ++h) boosted = bta[s * H + h] != 1.0f;
    }
    if (!boosted && c < 0) continue;
    const int64_t p = pos[t];
    TORCH_CHECK(p >= 0 && p < MB * BS, "token_pos[", t, "] = ", p, " but must lie in [0, ",
                MB * BS, ") (block table width x block size)");
    bool sees = false;
    for (int64_t k = 0; k < NS && !sees; ++k) {
      int64_t lo, hi;
      attn_image_boost::visible_span(sp[(r * NS + k) * 2], sp[(r * NS + k) * 2 + 1], p + 1, lo, hi);
      sees = lo < hi;
    }
    if (!sees && c < 0) continue;  // nothing is rewritten without a visible image key
    for (int64_t b = 0; b <= p / BS; ++b) {
      const int64_t blk = bt[r * bt0 + b * bt1];
      TORCH_CHECK(blk >= 0 && blk < NB, "block_table[", r, ", ", b, "] = ", blk,
                  " but must lie in [0, ", NB, ") (cache blocks)");
    }
    for (int64_t g = 0; g < KVH; ++g) {
      bool any = c >= 0;  // else boosted, so s >= 0
      for (int64_t h = g * group; h < (g + 1) * group && !any; ++h) any = bta[s * H + h] != 1.0f;
      if (any) items.push_back(t * KVH + g);
    }
    n_max = std::max(n_max, p + 1);
    work += (p + 1) * D * KVH;
  }
  if (items.empty()) return;

  const attn_image_boost::CpuArgs args{
      out.data_ptr(),
      query.data_ptr(),
      key_cache.data_ptr(),
      value_cache.data_ptr(),
      bt,
      row,
      pos,
      slot,
      bta,
      logit_mode.data_ptr<int32_t>(),
      sp,
      cap_eff.data(),
      mass_buf.data_ptr<float>(),
      sm_scale.data_ptr<float>()[0],
      H,
      KVH,
      D,
      BS,
      NS,
      {query.stride(0), query.stride(1), query.stride(2)},
      {key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), key_cache.stride(3)},
      {value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), value_cache.stride(3)},
      {bt0, bt1}};

  // Lanes take items round-robin (lane i: items i, i + lanes, ...), so that a prefill's
  // tokens, whose cost grows with their position, spread evenly over the threads; small
  // batches (under ~32k key elements a lane) stay on the calling thread.
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t lanes = std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), n_items, work / 32768}));
  const size_t floats = static_cast<size_t>(attn_image_boost::scratch_floats(group, D, BS, n_max));
  EMOSTEER_DISPATCH_FLOAT_TYPES(out.scalar_type(), "attn_image_boost_cpu", [&] {
    auto* item = &attn_image_boost::DEFAULT::item<scalar_t>;
#if EMOSTEER_HAVE_AVX2_BUILD
    if (cpu_use_avx2()) item = &attn_image_boost::AVX2::item<scalar_t>;
#endif
    at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> f(floats);
      std::vector<uint8_t> img(static_cast<size_t>(n_max + group));
      std::vector<int32_t> heads(static_cast<size_t>(group));
      float* q = f.data();
      const attn_image_boost::Scratch w{q, q + group * D, q + 2 * group * D,
                                        q + 2 * group * D + BS * D, img.data(), heads.data(),
                                        img.data() + n_max};
      for (int64_t lane = begin; lane < end; ++lane) {
        for (int64_t i = lane; i < n_items; i += lanes) {
          item(args, items[i] / KVH, items[i] % KVH, w);
        }
      }
    });
  });
}

}  // namespace emosteer
