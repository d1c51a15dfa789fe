// CPU twin of the head affine + capture kernel: checks, then at::parallel_for over
// tokens (for large batches only) of the vectorized token loop in
// head_affine_capture_cpu_kernel.h, AVX2 build where the CPU has it
// (head_affine_capture_avx2_cpu.cpp), else the portable build compiled here. One pass
// over z.
#include "cpu_vec.h"  // first: this file holds the portable (DEFAULT) build

#include <ATen/Parallel.h>

#include "head_affine_capture/head_affine_capture.h"
#include "head_affine_capture/head_affine_capture_cpu_kernel.h"

namespace emosteer {
namespace {

// Every row a token reads, vrow[s,h] + row_off[t], is a pool row (T*H values; checked
// before anything is written). Tokens without a slot and heads without a row read none.
void check_offset_rows(const int32_t* slot, const int32_t* off, const int32_t* vrow, int64_t T,
                       int64_t H, int64_t P) {
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = slot[t];
    if (s < 0 || off[t] == 0) continue;  // offset 0: vrow itself, checked already
    for (int64_t h = 0; h < H; ++h) {
      const int64_t vr = vrow[s * H + h];
      if (vr < 0) continue;
      const int64_t r = vr + off[t];
      TORCH_CHECK(r >= 0 && r < P, "vrow[", s, ", ", h, "] + row_off[", t, "] = ", r,
                  " but must be in [0, ", P, ") (", P, " pool rows)");
    }
  }
}

}  // namespace

void head_affine_capture_cpu(at::Tensor& z, const at::Tensor& token_slot, const at::Tensor& a,
                             const at::Tensor& b, const at::Tensor& c, const at::Tensor& vrow,
                             const at::Tensor& row_off, const at::Tensor& pool,
                             const at::Tensor& cap_index, at::Tensor& cap_buf,
                             const at::Tensor& flag) {
  TORCH_CHECK(z.device().is_cpu(), "z must be a CPU tensor for the CPU kernel");
  const int64_t S = head_affine_capture::check_args(z, token_slot, a, b, c, vrow, row_off, pool,
                                                    cap_index, cap_buf, flag);
  if (flag.data_ptr<int32_t>()[0] == 0) return;  // read once: the whole op is off
  const int64_t T = z.size(0), H = z.size(1), D = z.size(2);
  if (z.numel() == 0) return;
  // Every index, before anything is written (T + S*H values: cheap next to the op).
  check_index_values(token_slot.data_ptr<int32_t>(), T, S, "token_slot", "slots");
  check_index_values(cap_index.data_ptr<int32_t>(), T, cap_buf.size(0), "cap_index",
                     "capture rows");
  check_index_values(vrow.data_ptr<int32_t>(), S * H, pool.size(0), "vrow", "pool rows");
  check_offset_rows(token_slot.data_ptr<int32_t>(), row_off.data_ptr<int32_t>(),
                    vrow.data_ptr<int32_t>(), T, H, pool.size(0));
  const head_affine_capture::CpuArgs args{z.data_ptr(),
                                          token_slot.data_ptr<int32_t>(),
                                          a.data_ptr<float>(),
                                          b.data_ptr<float>(),
                                          c.data_ptr<float>(),
                                          vrow.data_ptr<int32_t>(),
                                          row_off.data_ptr<int32_t>(),
                                          pool.data_ptr(),
                                          cap_index.data_ptr<int32_t>(),
                                          cap_buf.data_ptr(),
                                          H,
                                          D};
  EMOSTEER_DISPATCH_FLOAT_TYPES(z.scalar_type(), "head_affine_capture_cpu", [&] {
    auto* tokens = &head_affine_capture::DEFAULT::tokens<scalar_t>;
#if EMOSTEER_HAVE_AVX2_BUILD
    if (cpu_use_avx2()) tokens = &head_affine_capture::AVX2::tokens<scalar_t>;
#endif
    at::parallel_for(0, T, grain_for(H * D),
                     [&](int64_t begin, int64_t end) { tokens(args, begin, end); });
  });
}

}  // namespace emosteer
