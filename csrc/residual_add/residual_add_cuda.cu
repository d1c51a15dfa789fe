// CUDA residual_add: a block row per token (grid y = chunks of d), 16-byte packs where d
// and alignment allow. Every block reads `flag` first and exits when it is 0; tokens
// with slot -1, or whose slot names no pool row, exit at once.
#include "cuda_utils.cuh"
#include "residual_add/residual_add.h"

namespace emosteer {
namespace {

template <typename scalar_t, int VEC>
__global__ void residual_add_kernel(scalar_t* __restrict__ r,                // [T, d]
                                    const int32_t* __restrict__ token_slot,  // [T]
                                    const float* __restrict__ alpha,         // [S]
                                    const int32_t* __restrict__ urow,        // [S]
                                    const scalar_t* __restrict__ pool,       // [P, d]
                                    const int32_t* __restrict__ flag,        // [1]
                                    int64_t d, int64_t S, int64_t P) {
  using P_ = cuda::Pack<scalar_t, VEC>;
  if (flag[0] == 0) return;
  const int64_t t = blockIdx.x;
  const int64_t s = token_slot[t];
  if (s < 0) return;
  CUDA_KERNEL_ASSERT(s < S);
  const int64_t row = urow[s];
  if (row < 0) return;
  CUDA_KERNEL_ASSERT(row < P);
  const float al = alpha[s];
  P_* rrow = reinterpret_cast<P_*>(r + t * d);
  const P_* urow_p = reinterpret_cast<const P_*>(pool + row * d);
  const int64_t packs = d / VEC;
  for (int64_t p = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    P_ rp = rrow[p];
    const P_ up = urow_p[p];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      rp.v[i] = static_cast<scalar_t>(
          residual_add::steer(static_cast<float>(rp.v[i]), al, static_cast<float>(up.v[i])));
    }
    rrow[p] = rp;
  }
}

template <typename scalar_t, int VEC>
void launch_residual_add(at::Tensor& r, const at::Tensor& token_slot, const at::Tensor& alpha,
                         const at::Tensor& urow, const at::Tensor& pool, const at::Tensor& flag,
                         int64_t S) {
  const int64_t packs = r.size(1) / VEC;
  const int threads = cuda::threads_for(packs);
  residual_add_kernel<scalar_t, VEC>
      <<<cuda::token_grid(r.size(0), packs, threads), threads, 0, cuda::current_stream()>>>(
          r.data_ptr<scalar_t>(), token_slot.data_ptr<int32_t>(), alpha.data_ptr<float>(),
          urow.data_ptr<int32_t>(), pool.data_ptr<scalar_t>(), flag.data_ptr<int32_t>(),
          r.size(1), S, pool.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void residual_add_cuda(at::Tensor& r, const at::Tensor& token_slot, const at::Tensor& alpha,
                       const at::Tensor& urow, const at::Tensor& pool, const at::Tensor& flag) {
  TORCH_CHECK(r.is_cuda(), "r must be a CUDA tensor for the CUDA kernel");
  const int64_t S = residual_add::check_residual_add(r, token_slot, alpha, urow, pool, flag);
  if (r.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(r.device());
  EMOSTEER_DISPATCH_FLOAT_TYPES(r.scalar_type(), "residual_add_cuda", [&] {
    if (cuda::can_vectorize<scalar_t>(r.size(1), {r.data_ptr(), pool.data_ptr()})) {
      launch_residual_add<scalar_t, cuda::kMaxVec<scalar_t>>(r, token_slot, alpha, urow, pool,
                                                             flag, S);
    } else {
      launch_residual_add<scalar_t, 1>(r, token_slot, alpha, urow, pool, flag, S);
    }
  });
}

}  // namespace emosteer
