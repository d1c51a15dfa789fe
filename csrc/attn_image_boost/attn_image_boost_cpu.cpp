// CPU kernel of attn_image_boost: checks (dims and dtypes, then every index value the
// kernel will read), the list of work items, one per (token, KV head) that has a head to
// rewrite or a capture, and at::parallel_for over them of the loop in
// attn_image_boost_cpu_kernel.h, AVX2 build where the CPU has it
// (attn_image_boost_avx2_cpu.cpp), else the portable build compiled here.
#include "cpu_vec.h"  // first: this file holds the portable (DEFAULT) build

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "attn_image_boost/attn_image_boost.h"
#include "attn_image_boost/attn_image_boost_cpu_kernel.h"

namespace emosteer {

namespace {

// Tokens per tile of a prefill run (see prefill_run).
constexpr int64_t kPrefillTile = 64;

// The prefill case: a run of m >= 2 consecutive tokens of one row (positions p0 ..
// p0+m-1, keys 0..n-1 with n = p0+m) is a small attention of its own. Its keys and
// values are gathered from the paged cache once per KV head, the logits and the outputs
// are two batched matrix products over the KV heads (at::bmm), and one pass per
// (KV head, token, head) row in between scales, boosts, masks the future keys, takes
// the softmax and sums the captured masses; only the rewritten (token, head) rows are
// written back (every other row of ``out`` keeps its value). The arithmetic of the
// per-token loop, in float32, in another summation order. Tiles of at most 64 tokens.
void prefill_run(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                 const at::Tensor& value_cache, const int32_t* bt, int64_t bt0, int64_t bt1,
                 int64_t r, int64_t t0, int64_t m, int64_t p0, const int32_t* slot,
                 const float* bta, const int32_t* lmode, const int32_t* sp, int64_t NS,
                 const int32_t* cap, float* mass_buf, float scale) {
  const int64_t H = out.size(1), D = out.size(2);
  const int64_t BS = key_cache.size(1), KVH = key_cache.size(2), group = H / KVH;
  const int64_t n = p0 + m;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  // [KVH, n, D] float keys and values of the row, gathered block by block.
  at::Tensor K = at::empty({KVH, n, D}, f32), V = at::empty({KVH, n, D}, f32);
  EMOSTEER_DISPATCH_FLOAT_TYPES(out.scalar_type(), "attn_image_boost_prefill_gather", [&] {
    for (int which = 0; which < 2; ++which) {
      const at::Tensor& cache = which == 0 ? key_cache : value_cache;
      float* dst = (which == 0 ? K : V).data_ptr<float>();
      const scalar_t* base = static_cast<const scalar_t*>(cache.data_ptr());
      const int64_t s0 = cache.stride(0), s1 = cache.stride(1), s2 = cache.stride(2), s3 = cache.stride(3);
      for (int64_t g = 0; g < KVH; ++g) {
        for (int64_t j0 = 0; j0 < n; j0 += BS) {
          const int64_t nb = std::min(BS, n - j0);
          const scalar_t* src = base + bt[r * bt0 + (j0 / BS) * bt1] * s0 + g * s2;
          float* blk = dst + (g * n + j0) * D;
          attn_image_boost::DEFAULT::gather(src, s1, s3, nb, D, blk, D, 1);
        }
      }
    }
  });
  // Image keys of the row, clamped to the n keys: [lo, hi) per span; img[j] = 1.0 for
  // an image key (the row pass reads it as a vector mask).
  std::vector<int64_t> span_lo(static_cast<size_t>(NS)), span_hi(static_cast<size_t>(NS));
  std::vector<float> img(static_cast<size_t>(n), 0.0f);
  for (int64_t k = 0; k < NS; ++k) {
    attn_image_boost::visible_span(sp[(r * NS + k) * 2], sp[(r * NS + k) * 2 + 1], n, span_lo[k], span_hi[k]);
    for (int64_t j = span_lo[k]; j < span_hi[k]; ++j) img[j] = 1.0f;
  }
  auto rows_fn = &attn_image_boost::DEFAULT::prefill_rows;
#if EMOSTEER_HAVE_AVX2_BUILD
  if (cpu_use_avx2()) rows_fn = &attn_image_boost::AVX2::prefill_rows;
#endif
  // Tiles of kPrefillTile tokens (fewer where the logits would pass ~4M floats): each
  // tile's products run over the keys its last token sees, so a causal prefill computes
  // about half the logits of the full square, as the plain attention's kernels do.
  const int64_t tile = std::max<int64_t>(
      1, std::min<int64_t>(kPrefillTile, (int64_t{1} << 22) / std::max<int64_t>(1, H * n)));
  for (int64_t i0 = 0; i0 < m; i0 += tile) {
    const int64_t mm = std::min(tile, m - i0);
    const int64_t ta = t0 + i0, pa = p0 + i0;  // first token of the tile and its position
    const int64_t nn = pa + mm;  // keys its last token sees
    // Per (token, head): rewritten?, and the boost. A token is rewritten only where it
    // sees an image key.
    std::vector<uint8_t> rw(static_cast<size_t>(mm * H), 0);
    bool any_rw = false, any_cap = false;
    for (int64_t i = 0; i < mm; ++i) {
      const int64_t t = ta + i, s = slot[t];
      any_cap = any_cap || cap[t] >= 0;
      if (s < 0) continue;
      bool sees = false;
      for (int64_t k = 0; k < NS && !sees; ++k) sees = span_lo[k] < std::min(span_hi[k], pa + i + 1);
      if (!sees) continue;
      for (int64_t h = 0; h < H; ++h) {
        if (bta[s * H + h] != 1.0f) rw[i * H + h] = 1, any_rw = true;
      }
    }
    if (!any_rw && !any_cap) continue;
    // Queries [KVH, mm*group, D]; logits [KVH, mm*group, nn] = q K^T.
    const auto q = query.narrow(0, ta, mm).to(at::kFloat).reshape({mm, KVH, group, D})
                       .permute({1, 0, 2, 3}).reshape({KVH, mm * group, D});
    at::Tensor l = at::bmm(q, K.narrow(1, 0, nn).transpose(1, 2));
    // One pass per row (g, i, a): scale, boost, future keys out, softmax, masses.
    const attn_image_boost::PrefillTile pt{l.data_ptr<float>(), nn, mm, group, H, ta, pa,
                                           rw.data(), img.data(), slot, bta, lmode, cap,
                                           mass_buf, span_lo.data(), span_hi.data(), NS, scale};
    at::parallel_for(0, KVH * mm * group, 16, [&](int64_t begin, int64_t end) {
      rows_fn(pt, begin, end);
    });
    if (!any_rw) continue;
    // Outputs [KVH, mm*group, D] = weights V; the rewritten rows written back.
    const at::Tensor o = at::bmm(l, V.narrow(1, 0, nn));
    const float* op = o.data_ptr<float>();
    EMOSTEER_DISPATCH_FLOAT_TYPES(out.scalar_type(), "attn_image_boost_prefill_out", [&] {
      scalar_t* dst = static_cast<scalar_t*>(out.data_ptr());
      for (int64_t i = 0; i < mm; ++i) {
        for (int64_t h = 0; h < H; ++h) {
          if (!rw[i * H + h]) continue;
          const int64_t g = h / group, a = h % group;
          const float* src = op + ((g * mm + i) * group + a) * D;
          scalar_t* d = dst + ((ta + i) * H + h) * D;
          for (int64_t e = 0; e < D; ++e) d[e] = static_cast<scalar_t>(src[e]);
        }
      }
    });
  }
}

}  // namespace

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

  // Tokens with something to do (a rewritten head or a capture), their block ids checked.
  std::vector<uint8_t> active(static_cast<size_t>(T), 0);
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
    active[t] = 1;
  }

  // Runs of >= 2 consecutive active tokens of one row at consecutive positions (a
  // prefill chunk) go through the matrix path; single tokens (decode) through the
  // per-(token, KV head) loop.
  std::vector<int64_t> items;
  int64_t n_max = 0, work = 0;
  const int32_t* lmode = logit_mode.data_ptr<int32_t>();
  for (int64_t t = 0; t < T;) {
    if (!active[t]) {
      ++t;
      continue;
    }
    int64_t e = t + 1;
    while (e < T && active[e] && row[e] == row[t] && pos[e] == pos[e - 1] + 1) ++e;
    if (e - t >= 2) {
      prefill_run(out, query, key_cache, value_cache, bt, bt0, bt1, row[t], t, e - t, pos[t], slot,
                  bta, lmode, sp, NS, cap_eff.data(), mass_buf.data_ptr<float>(),
                  sm_scale.data_ptr<float>()[0]);
      t = e;
      continue;
    }
    const int64_t s = slot[t], c = cap_eff[t], p = pos[t];
    for (int64_t g = 0; g < KVH; ++g) {
      bool any = c >= 0;  // else boosted, so s >= 0
      for (int64_t h = g * group; h < (g + 1) * group && !any; ++h) any = bta[s * H + h] != 1.0f;
      if (any) items.push_back(t * KVH + g);
    }
    n_max = std::max(n_max, p + 1);
    work += (p + 1) * D * KVH;
    ++t;
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
