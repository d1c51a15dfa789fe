// CUDA head affine + capture: one block row per token (grid x = token, y = chunk of the
// token's H*D elements), 16-byte packs where head_dim and alignment allow. Every block
// reads `flag` first and exits when it is 0; a token with neither a slot nor a capture
// row exits at once; z is read once and written once, v comes from the pool row that
// the slot's table names for the head (none: v = 0).
#include "cuda_utils.cuh"
#include "head_affine_capture/head_affine_capture.h"

namespace emosteer {
namespace {

template <typename scalar_t, int VEC>
__global__ void head_affine_capture_kernel(
    scalar_t* __restrict__ z,                // [T, H, D]
    const int32_t* __restrict__ token_slot,  // [T]
    const float* __restrict__ a,             // [S, H]
    const float* __restrict__ b,             // [S, H]
    const int32_t* __restrict__ vrow,        // [S, H]
    const int32_t* __restrict__ row_off,     // [T]
    const scalar_t* __restrict__ pool,       // [P, H, D]
    const int32_t* __restrict__ cap_index,   // [T]
    scalar_t* __restrict__ cap_buf,          // [C, H, D]
    const int32_t* __restrict__ flag,        // [1]
    int64_t H, int64_t D, int64_t S, int64_t P, int64_t C) {
  using P_ = cuda::Pack<scalar_t, VEC>;
  if (flag[0] == 0) return;
  const int64_t t = blockIdx.x;
  const int64_t s = token_slot[t];
  const int64_t c = cap_index[t];
  if (s < 0 && c < 0) return;
  CUDA_KERNEL_ASSERT(s < S && c < C);
  const int64_t off = s >= 0 ? row_off[t] : 0;
  const int64_t row = H * D;  // elements per token; VEC divides D, so a pack is in one head
  P_* zrow = reinterpret_cast<P_*>(z + t * row);
  P_* crow = c >= 0 ? reinterpret_cast<P_*>(cap_buf + c * row) : nullptr;
  const int64_t packs = row / VEC;
  for (int64_t p = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    P_ zp = zrow[p];
    if (crow != nullptr) crow[p] = zp;
    if (s < 0) continue;
    const int64_t h = (p * VEC) / D;
    const float ah = a[s * H + h];
    const float bh = b[s * H + h];
    if (head_affine_capture::is_identity(ah, bh)) continue;
    const int64_t vr = vrow[s * H + h];
    P_ vp;
    if (vr >= 0) {
      const int64_t r = vr + off;  // the token's row of a run (row_off 0: the slot's own)
      CUDA_KERNEL_ASSERT(r >= 0 && r < P);
      // Pack p of the token row is pack p - h*D/VEC of head h; the pool row of head h
      // starts at (r*H + h)*D, i.e. pack r*row/VEC + p.
      vp = reinterpret_cast<const P_*>(pool + r * row)[p];
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) vp.v[i] = static_cast<scalar_t>(0.0f);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      zp.v[i] = static_cast<scalar_t>(head_affine_capture::affine(
          static_cast<float>(zp.v[i]), ah, bh, static_cast<float>(vp.v[i])));
    }
    zrow[p] = zp;
  }
}

template <typename scalar_t, int VEC>
void launch(at::Tensor& z, const at::Tensor& token_slot, const at::Tensor& a, const at::Tensor& b,
            const at::Tensor& vrow, const at::Tensor& row_off, const at::Tensor& pool,
            const at::Tensor& cap_index, at::Tensor& cap_buf, const at::Tensor& flag, int64_t S) {
  const int64_t T = z.size(0), H = z.size(1), D = z.size(2);
  const int64_t packs = H * D / VEC;
  const int threads = cuda::threads_for(packs);
  head_affine_capture_kernel<scalar_t, VEC>
      <<<cuda::token_grid(T, packs, threads), threads, 0, cuda::current_stream()>>>(
          z.data_ptr<scalar_t>(), token_slot.data_ptr<int32_t>(), a.data_ptr<float>(),
          b.data_ptr<float>(), vrow.data_ptr<int32_t>(), row_off.data_ptr<int32_t>(),
          pool.data_ptr<scalar_t>(),
          cap_index.data_ptr<int32_t>(), cap_buf.data_ptr<scalar_t>(), flag.data_ptr<int32_t>(),
          H, D, S, pool.size(0), cap_buf.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void head_affine_capture_cuda(at::Tensor& z, const at::Tensor& token_slot, const at::Tensor& a,
                              const at::Tensor& b, const at::Tensor& vrow,
                              const at::Tensor& row_off, const at::Tensor& pool,
                              const at::Tensor& cap_index, at::Tensor& cap_buf,
                              const at::Tensor& flag) {
  TORCH_CHECK(z.is_cuda(), "z must be a CUDA tensor for the CUDA kernel");
  const int64_t S = head_affine_capture::check_args(z, token_slot, a, b, vrow, row_off, pool,
                                                    cap_index, cap_buf, flag);
  if (z.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  EMOSTEER_DISPATCH_FLOAT_TYPES(z.scalar_type(), "head_affine_capture_cuda", [&] {
    constexpr int kVec = cuda::kMaxVec<scalar_t>;
    if (cuda::can_vectorize<scalar_t>(
            z.size(2), {z.data_ptr(), pool.data_ptr(), cap_buf.data_ptr()})) {
      launch<scalar_t, kVec>(z, token_slot, a, b, vrow, row_off, pool, cap_index, cap_buf, flag,
                             S);
    } else {
      launch<scalar_t, 1>(z, token_slot, a, b, vrow, row_off, pool, cap_index, cap_buf, flag, S);
    }
  });
}

}  // namespace emosteer
