// CPU twin of the head affine + capture kernel: at::parallel_for over tokens, the
// per-element math from head_affine.h, one pass over z.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "head_affine/head_affine.h"

namespace emosteer {
namespace {

template <typename scalar_t>
void head_affine_capture_kernel(scalar_t* z,              // [T, H, D]
                                const int32_t* token_slot,  // [T]
                                const float* a,            // [S, H]
                                const float* b,            // [S, H]
                                const scalar_t* v,         // [S, H, D]
                                const int32_t* cap_index,  // [T]
                                scalar_t* cap_buf,         // [C, H, D]
                                int64_t T, int64_t H, int64_t D, int64_t S, int64_t C) {
  const int64_t row = H * D;
  at::parallel_for(0, T, grain_for(row), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      scalar_t* zt = z + t * row;
      const int64_t c = cap_index[t];
      if (c >= 0) {
        TORCH_CHECK(c < C, "cap_index[", t, "] = ", c, " but cap_buf has ", C, " rows");
        std::memcpy(cap_buf + c * row, zt, sizeof(scalar_t) * row);
      }
      const int64_t s = token_slot[t];
      if (s < 0) continue;
      TORCH_CHECK(s < S, "token_slot[", t, "] = ", s, " but there are ", S, " slots");
      for (int64_t h = 0; h < H; ++h) {
        const float ah = a[s * H + h];
        const float bh = b[s * H + h];
        if (head_affine::is_identity(ah, bh)) continue;
        scalar_t* zh = zt + h * D;
        const scalar_t* vh = v + (s * H + h) * D;
        for (int64_t d = 0; d < D; ++d) {
          zh[d] = static_cast<scalar_t>(head_affine::affine(static_cast<float>(zh[d]), ah, bh,
                                                            static_cast<float>(vh[d])));
        }
      }
    }
  });
}

}  // namespace

void head_affine_capture_cpu(at::Tensor& z, const at::Tensor& token_slot, const at::Tensor& a,
                             const at::Tensor& b, const at::Tensor& v,
                             const at::Tensor& cap_index, at::Tensor& cap_buf) {
  TORCH_CHECK(z.device().is_cpu(), "z must be a CPU tensor for the CPU kernel");
  const int64_t S = head_affine::check_args(z, token_slot, a, b, v, cap_index, cap_buf);
  if (z.numel() == 0) return;
  EMOSTEER_DISPATCH_FLOAT_TYPES(z.scalar_type(), "head_affine_capture_cpu", [&] {
    head_affine_capture_kernel<scalar_t>(
        z.data_ptr<scalar_t>(), token_slot.data_ptr<int32_t>(), a.data_ptr<float>(),
        b.data_ptr<float>(), v.data_ptr<scalar_t>(), cap_index.data_ptr<int32_t>(),
        cap_buf.data_ptr<scalar_t>(), z.size(0), z.size(1), z.size(2), S, cap_buf.size(0));
  });
}

}  // namespace emosteer
