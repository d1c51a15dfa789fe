// CUDA head affine + capture: one warp per (token, head) (grid x = token, y = groups of
// heads, kHeadsPerBlock warps a block), its lanes striding the head's D elements in
// 16-byte packs where head_dim and alignment allow. Every block reads `flag` first and
// exits when it is 0; a token with neither a slot nor a capture row exits at once; z is
// read once and written once (a relative add reads the head once more for its norm,
// summed over the warp with shuffles before any lane writes), v comes from the pool row
// that the slot's table names for the head (none: v = 0).
#include "cuda_utils.cuh"
#include "head_affine_capture/head_affine_capture.h"

namespace emosteer {
namespace {

constexpr int kHeadsPerBlock = 8;

template <typename scalar_t, int VEC>
__global__ void head_affine_capture_kernel(
    scalar_t* __restrict__ z,                // [T, H, D]
    const int32_t* __restrict__ token_slot,  // [T]
    const float* __restrict__ a,             // [S, H]
    const float* __restrict__ b,             // [S, H]
    const float* __restrict__ c,             // [S, H]
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
  const int64_t cr = cap_index[t];
  if (s < 0 && cr < 0) return;
  CUDA_KERNEL_ASSERT(s < S && cr < C);
  const int lane = threadIdx.x % cuda::kWarp;
  const int64_t h = static_cast<int64_t>(blockIdx.y) * kHeadsPerBlock + threadIdx.x / cuda::kWarp;
  if (h >= H) return;  // the whole warp: nothing below syncs across warps
  const int64_t packs = D / VEC;  // VEC divides D: a pack never straddles two heads
  P_* zh = reinterpret_cast<P_*>(z + (t * H + h) * D);
  P_* ch = cr >= 0 ? reinterpret_cast<P_*>(cap_buf + (cr * H + h) * D) : nullptr;
  float ah = 1.0f, bh = 0.0f, cf = 0.0f;
  bool touch = false;
  if (s >= 0) {
    ah = a[s * H + h];
    bh = b[s * H + h];
    cf = c[s * H + h];
    touch = !head_affine_capture::is_identity(ah, bh, cf);
  }
  float norm = 0.0f;
  if (touch && cf != 0.0f) {  // warp-uniform: every lane reaches the shuffles
    float sq = 0.0f;
    for (int64_t p = lane; p < packs; p += cuda::kWarp) {
      const P_ zp = zh[p];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float x = static_cast<float>(zp.v[i]);
        sq = add_rn(sq, mul_rn(x, x));
      }
    }
#pragma unroll
    for (int o = cuda::kWarp / 2; o > 0; o >>= 1)
      sq = add_rn(sq, __shfl_xor_sync(0xffffffffu, sq, o));
    norm = sqrtf(sq);  // IEEE sqrt (nvcc's default -prec-sqrt=true)
  }
  const float w = head_affine_capture::weight(bh, cf, norm);
  const int64_t vr = touch ? vrow[s * H + h] : -1;
  const P_* vh = nullptr;
  if (vr >= 0) {
    const int64_t r = vr + row_off[t];  // the token's row of a run (row_off 0: the slot's own)
    CUDA_KERNEL_ASSERT(r >= 0 && r < P);
    vh = reinterpret_cast<const P_*>(pool + (r * H + h) * D);
  }
  for (int64_t p = lane; p < packs; p += cuda::kWarp) {
    P_ zp = zh[p];
    if (ch != nullptr) ch[p] = zp;
    if (!touch) continue;
    P_ vp;
    if (vh != nullptr) {
      vp = vh[p];
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) vp.v[i] = static_cast<scalar_t>(0.0f);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      zp.v[i] = static_cast<scalar_t>(head_affine_capture::affine(
          static_cast<float>(zp.v[i]), ah, w, static_cast<float>(vp.v[i])));
    }
    zh[p] = zp;
  }
}

template <typename scalar_t, int VEC>
void launch(at::Tensor& z, const at::Tensor& token_slot, const at::Tensor& a, const at::Tensor& b,
            const at::Tensor& c, const at::Tensor& vrow, const at::Tensor& row_off,
            const at::Tensor& pool, const at::Tensor& cap_index, at::Tensor& cap_buf,
            const at::Tensor& flag, int64_t S) {
  const int64_t T = z.size(0), H = z.size(1), D = z.size(2);
  const int64_t per_block = std::min<int64_t>(H, kHeadsPerBlock);
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>((H + kHeadsPerBlock - 1) / kHeadsPerBlock));
  const int threads = static_cast<int>(per_block) * cuda::kWarp;
  head_affine_capture_kernel<scalar_t, VEC><<<grid, threads, 0, cuda::current_stream()>>>(
      z.data_ptr<scalar_t>(), token_slot.data_ptr<int32_t>(), a.data_ptr<float>(),
      b.data_ptr<float>(), c.data_ptr<float>(), vrow.data_ptr<int32_t>(),
      row_off.data_ptr<int32_t>(), pool.data_ptr<scalar_t>(), cap_index.data_ptr<int32_t>(),
      cap_buf.data_ptr<scalar_t>(), flag.data_ptr<int32_t>(), H, D, S, pool.size(0),
      cap_buf.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void head_affine_capture_cuda(at::Tensor& z, const at::Tensor& token_slot, const at::Tensor& a,
                              const at::Tensor& b, const at::Tensor& c, const at::Tensor& vrow,
                              const at::Tensor& row_off, const at::Tensor& pool,
                              const at::Tensor& cap_index, at::Tensor& cap_buf,
                              const at::Tensor& flag) {
  TORCH_CHECK(z.is_cuda(), "z must be a CUDA tensor for the CUDA kernel");
  const int64_t S = head_affine_capture::check_args(z, token_slot, a, b, c, vrow, row_off, pool,
                                                    cap_index, cap_buf, flag);
  if (z.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  EMOSTEER_DISPATCH_FLOAT_TYPES(z.scalar_type(), "head_affine_capture_cuda", [&] {
    constexpr int kVec = cuda::kMaxVec<scalar_t>;
    if (cuda::can_vectorize<scalar_t>(
            z.size(2), {z.data_ptr(), pool.data_ptr(), cap_buf.data_ptr()})) {
      launch<scalar_t, kVec>(z, token_slot, a, b, c, vrow, row_off, pool, cap_index, cap_buf,
                             flag, S);
    } else {
      launch<scalar_t, 1>(z, token_slot, a, b, c, vrow, row_off, pool, cap_index, cap_buf, flag,
                          S);
    }
  });
}

}  // namespace emosteer
