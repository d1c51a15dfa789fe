// CUDA residual_add (block row per token, grid y = chunks of d) and
// fused_add_rms_norm_steer (one block per token: add + steer + store the residual and
// sum its squares in one pass, block-reduce, then normalize the row the same threads
// wrote). Tokens with slot -1 exit residual_add at once; in the fused op they still get
// vLLM's plain add + RMSNorm.
#include "cuda_utils.cuh"
#include "residual_add/residual_add.h"

namespace emosteer {
namespace {

template <typename scalar_t, int VEC>
__global__ void residual_add_kernel(scalar_t* __restrict__ r,                // [T, d]
                                    const int32_t* __restrict__ token_slot,  // [T]
                                    const float* __restrict__ alpha,         // [S]
                                    const scalar_t* __restrict__ u,          // [S, d]
                                    int64_t d, int64_t S) {
  using P = cuda::Pack<scalar_t, VEC>;
  const int64_t t = blockIdx.x;
  const int64_t s = token_slot[t];
  if (s < 0) return;
  CUDA_KERNEL_ASSERT(s < S);
  const float al = alpha[s];
  P* rrow = reinterpret_cast<P*>(r + t * d);
  const P* urow = reinterpret_cast<const P*>(u + s * d);
  const int64_t packs = d / VEC;
  for (int64_t p = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    P rp = rrow[p];
    const P up = urow[p];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      rp.v[i] = static_cast<scalar_t>(
          residual::steer(static_cast<float>(rp.v[i]), al, static_cast<float>(up.v[i])));
    }
    rrow[p] = rp;
  }
}

template <typename scalar_t, int VEC>
__global__ void fused_add_rms_norm_steer_kernel(
    scalar_t* __restrict__ x,                // [T, d]
    scalar_t* __restrict__ residual,         // [T, d]
    const scalar_t* __restrict__ weight,     // [d]
    float eps,
    const int32_t* __restrict__ token_slot,  // [T]
    const float* __restrict__ alpha,         // [S]
    const scalar_t* __restrict__ u,          // [S, d]
    int64_t d, int64_t S) {
  using P = cuda::Pack<scalar_t, VEC>;
  __shared__ float warp_sums[32];
  const int64_t t = blockIdx.x;
  const int64_t s = token_slot[t];
  CUDA_KERNEL_ASSERT(s < S);
  const float al = s >= 0 ? alpha[s] : 0.0f;
  P* xrow = reinterpret_cast<P*>(x + t * d);
  P* rrow = reinterpret_cast<P*>(residual + t * d);
  const P* urow = s >= 0 ? reinterpret_cast<const P*>(u + s * d) : nullptr;
  const P* wrow = reinterpret_cast<const P*>(weight);
  const int64_t packs = d / VEC;

  float sum_sq = 0.0f;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const P xp = xrow[p];
    P rp = rrow[p];
    P up;
    if (urow != nullptr) up = urow[p];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float sum = add_rn(static_cast<float>(xp.v[i]), static_cast<float>(rp.v[i]));
      if (urow != nullptr) sum = residual::steer(sum, al, static_cast<float>(up.v[i]));
      rp.v[i] = static_cast<scalar_t>(sum);
      const float h = static_cast<float>(rp.v[i]);
      sum_sq = add_rn(sum_sq, mul_rn(h, h));
    }
    rrow[p] = rp;
  }
  const float inv = residual::inv_rms(cuda::block_sum(sum_sq, warp_sums), d, eps);
  // Each thread reads back only the residual packs it wrote above: no sync needed.
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const P rp = rrow[p];
    const P wp = wrow[p];
    P xp;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      xp.v[i] = residual::normed_times_weight<scalar_t>(static_cast<float>(rp.v[i]), inv, wp.v[i]);
    }
    xrow[p] = xp;
  }
}

template <typename scalar_t, int VEC>
void launch_residual_add(at::Tensor& r, const at::Tensor& token_slot, const at::Tensor& alpha,
                         const at::Tensor& u, int64_t S) {
  const int64_t packs = r.size(1) / VEC;
  const int threads = cuda::threads_for(packs);
  residual_add_kernel<scalar_t, VEC>
      <<<cuda::token_grid(r.size(0), packs, threads), threads, 0, cuda::current_stream()>>>(
          r.data_ptr<scalar_t>(), token_slot.data_ptr<int32_t>(), alpha.data_ptr<float>(),
          u.data_ptr<scalar_t>(), r.size(1), S);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
void launch_fused(at::Tensor& x, at::Tensor& residual, const at::Tensor& w, double eps,
                  const at::Tensor& token_slot, const at::Tensor& alpha, const at::Tensor& u) {
  const int64_t packs = x.size(1) / VEC;
  // The whole row in one block: up to 1024 threads, one pass over it for d <= 8192 (bf16).
  const int threads = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, (packs + 31) / 32 * 32)));
  fused_add_rms_norm_steer_kernel<scalar_t, VEC>
      <<<static_cast<unsigned>(x.size(0)), threads, 0, cuda::current_stream()>>>(
          x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
          static_cast<float>(eps), token_slot.data_ptr<int32_t>(), alpha.data_ptr<float>(),
          u.data_ptr<scalar_t>(), x.size(1), alpha.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void residual_add_cuda(at::Tensor& r, const at::Tensor& token_slot, const at::Tensor& alpha,
                       const at::Tensor& u) {
  TORCH_CHECK(r.is_cuda(), "r must be a CUDA tensor for the CUDA kernel");
  const int64_t S = residual::check_residual_add(r, token_slot, alpha, u);
  if (r.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(r.device());
  EMOSTEER_DISPATCH_FLOAT_TYPES(r.scalar_type(), "residual_add_cuda", [&] {
    if (cuda::can_vectorize<scalar_t>(r.size(1), {r.data_ptr(), u.data_ptr()})) {
      launch_residual_add<scalar_t, cuda::kMaxVec<scalar_t>>(r, token_slot, alpha, u, S);
    } else {
      launch_residual_add<scalar_t, 1>(r, token_slot, alpha, u, S);
    }
  });
}

void fused_add_rms_norm_steer_cuda(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                                   double eps, const at::Tensor& token_slot,
                                   const at::Tensor& alpha, const at::Tensor& u) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = residual::check_fused(x, residual, weight, eps, token_slot, alpha, u);
  if (x.numel() == 0) return;
  EMOSTEER_DISPATCH_FLOAT_TYPES(x.scalar_type(), "fused_add_rms_norm_steer_cuda", [&] {
    if (cuda::can_vectorize<scalar_t>(
            x.size(1), {x.data_ptr(), residual.data_ptr(), w.data_ptr(), u.data_ptr()})) {
      launch_fused<scalar_t, cuda::kMaxVec<scalar_t>>(x, residual, w, eps, token_slot, alpha, u);
    } else {
      launch_fused<scalar_t, 1>(x, residual, w, eps, token_slot, alpha, u);
    }
  });
}

}  // namespace emosteer
