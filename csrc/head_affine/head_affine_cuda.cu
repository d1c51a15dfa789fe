// CUDA head affine + capture: one block row per token (grid x = token, y = chunk of the
// token's H*D elements), 16-byte packs where head_dim and alignment allow. A token with
// neither a slot nor a capture row exits at once; z is read once and written once.
#include "cuda_utils.cuh"
#include "head_affine/head_affine.h"

namespace emosteer {
namespace {

template <typename scalar_t, int VEC>
__global__ void head_affine_capture_kernel(
    scalar_t* __restrict__ z,                // [T, H, D]
    const int32_t* __restrict__ token_slot,  // [T]
    const float* __restrict__ a,             // [S, H]
    const float* __restrict__ b,             // [S, H]
    const scalar_t* __restrict__ v,          // [S, H, D]
    const int32_t* __restrict__ cap_index,   // [T]
    scalar_t* __restrict__ cap_buf,          // [C, H, D]
    int64_t H, int64_t D, int64_t S, int64_t C) {
  using P = cuda::Pack<scalar_t, VEC>;
  const int64_t t = blockIdx.x;
  const int64_t s = token_slot[t];
  const int64_t c = cap_index[t];
  if (s < 0 && c < 0) return;
  CUDA_KERNEL_ASSERT(s < S && c < C);
  const int64_t row = H * D;  // elements per token; VEC divides D, so a pack is in one head
  P* zrow = reinterpret_cast<P*>(z + t * row);
  P* crow = c >= 0 ? reinterpret_cast<P*>(cap_buf + c * row) : nullptr;
  const P* vrow = s >= 0 ? reinterpret_cast<const P*>(v + s * row) : nullptr;
  const int64_t packs = row / VEC;
  for (int64_t p = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    P zp = zrow[p];
    if (crow != nullptr) crow[p] = zp;
    if (vrow == nullptr) continue;
    const int64_t h = (p * VEC) / D;
    const float ah = a[s * H + h];
    const float bh = b[s * H + h];
    if (head_affine::is_identity(ah, bh)) continue;
    const P vp = vrow[p];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      zp.v[i] = static_cast<scalar_t>(head_affine::affine(static_cast<float>(zp.v[i]), ah, bh,
                                                          static_cast<float>(vp.v[i])));
    }
    zrow[p] = zp;
  }
}

template <typename scalar_t, int VEC>
void launch(at::Tensor& z, const at::Tensor& token_slot, const at::Tensor& a, const at::Tensor& b,
            const at::Tensor& v, const at::Tensor& cap_index, at::Tensor& cap_buf, int64_t S) {
  const int64_t T = z.size(0), H = z.size(1), D = z.size(2);
  const int64_t packs = H * D / VEC;
  const int threads = cuda::threads_for(packs);
  head_affine_capture_kernel<scalar_t, VEC>
      <<<cuda::token_grid(T, packs, threads), threads, 0, cuda::current_stream()>>>(
          z.data_ptr<scalar_t>(), token_slot.data_ptr<int32_t>(), a.data_ptr<float>(),
          b.data_ptr<float>(), v.data_ptr<scalar_t>(), cap_index.data_ptr<int32_t>(),
          cap_buf.data_ptr<scalar_t>(), H, D, S, cap_buf.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void head_affine_capture_cuda(at::Tensor& z, const at::Tensor& token_slot, const at::Tensor& a,
                              const at::Tensor& b, const at::Tensor& v,
                              const at::Tensor& cap_index, at::Tensor& cap_buf) {
  TORCH_CHECK(z.is_cuda(), "z must be a CUDA tensor for the CUDA kernel");
  const int64_t S = head_affine::check_args(z, token_slot, a, b, v, cap_index, cap_buf);
  if (z.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  EMOSTEER_DISPATCH_FLOAT_TYPES(z.scalar_type(), "head_affine_capture_cuda", [&] {
    constexpr int kVec = cuda::kMaxVec<scalar_t>;
    if (cuda::can_vectorize<scalar_t>(z.size(2), {z.data_ptr(), v.data_ptr(), cap_buf.data_ptr()})) {
      launch<scalar_t, kVec>(z, token_slot, a, b, v, cap_index, cap_buf, S);
    } else {
      launch<scalar_t, 1>(z, token_slot, a, b, v, cap_index, cap_buf, S);
    }
  });
}

}  // namespace emosteer
