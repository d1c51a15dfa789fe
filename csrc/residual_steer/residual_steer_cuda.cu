// CUDA residual_steer: one block per token, 16-byte packs where d and alignment allow.
// Every block reads `flag` first and exits when it is 0; tokens with slot -1, or whose
// slot has no term, exit at once. Where some term reads the norm or a component, the
// block reduces ||h||^2 and each such h . u_k over the row, h = x + r (per-thread partial
// sums, then warp shuffles and one shared-memory step; x is read only then); the
// weights go to shared memory, and a second pass over the row writes
// r + w_0*u_0 + ... (terms in k order, one rounding).
#include "cuda_utils.cuh"
#include "residual_steer/residual_steer.h"

namespace emosteer {
namespace {

template <typename scalar_t, int VEC>
__global__ void residual_steer_kernel(scalar_t* __restrict__ r,                // [T, d]
                                      const scalar_t* __restrict__ x,          // [T, d]
                                      const int32_t* __restrict__ token_slot,  // [T]
                                      const float* __restrict__ coef,          // [S, K]
                                      const int32_t* __restrict__ mode,        // [S, K]
                                      const int32_t* __restrict__ urow,        // [S, K]
                                      const scalar_t* __restrict__ pool,       // [P, d]
                                      const int32_t* __restrict__ flag,        // [1]
                                      int64_t d, int64_t K, int64_t S, int64_t P) {
  using P_ = cuda::Pack<scalar_t, VEC>;
  extern __shared__ float shared[];  // red[cuda::kWarp + 1], then w[K]
  float* red = shared;
  float* w = shared + cuda::kWarp + 1;
  if (flag[0] == 0) return;
  const int64_t t = blockIdx.x;
  const int64_t s = token_slot[t];
  if (s < 0) return;
  CUDA_KERNEL_ASSERT(s < S);
  const int32_t* rows = urow + s * K;
  const int32_t* modes = mode + s * K;
  bool any = false, dots = false;
  for (int64_t k = 0; k < K; ++k) {
    if (rows[k] < 0) continue;
    CUDA_KERNEL_ASSERT(rows[k] < P);
    any = true;
    dots = dots || residual_steer::needs_dots(modes[k]);
  }
  if (!any) return;  // the same for every thread of the block
  P_* rrow = reinterpret_cast<P_*>(r + t * d);
  const P_* xrow = reinterpret_cast<const P_*>(x + t * d);
  const int64_t packs = d / VEC;
  float norm = 0.0f;
  if (dots) {
    float sq = 0.0f;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      const P_ rp = rrow[p], xp = xrow[p];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float h = add_rn(static_cast<float>(xp.v[i]), static_cast<float>(rp.v[i]));
        sq = add_rn(sq, mul_rn(h, h));
      }
    }
    norm = sqrtf(cuda::block_sum(sq, red));  // IEEE sqrt (nvcc's default -prec-sqrt=true)
  }
  for (int64_t k = 0; k < K; ++k) {
    const int64_t row = rows[k];
    if (row < 0) continue;
    const int32_t m = modes[k];
    float c = 0.0f;
    if (residual_steer::needs_dots(m)) {  // uniform across the block
      const P_* urow_p = reinterpret_cast<const P_*>(pool + row * d);
      float part = 0.0f;
      for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
        const P_ rp = rrow[p], xp = xrow[p], up = urow_p[p];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float h = add_rn(static_cast<float>(xp.v[i]), static_cast<float>(rp.v[i]));
          part = add_rn(part, mul_rn(h, static_cast<float>(up.v[i])));
        }
      }
      c = cuda::block_sum(part, red);
    }
    if (threadIdx.x == 0) w[k] = residual_steer::weight(m, coef[s * K + k], norm, c);
  }
  __syncthreads();
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    P_ rp = rrow[p];
    float out[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = static_cast<float>(rp.v[i]);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t row = rows[k];
      if (row < 0) continue;
      const float wk = w[k];
      const P_ up = reinterpret_cast<const P_*>(pool + row * d)[p];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        out[i] = residual_steer::step(out[i], wk, static_cast<float>(up.v[i]));
      }
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) rp.v[i] = static_cast<scalar_t>(out[i]);
    rrow[p] = rp;
  }
}

template <typename scalar_t, int VEC>
void launch_residual_steer(at::Tensor& r, const at::Tensor& x, const at::Tensor& token_slot,
                           const at::Tensor& coef, const at::Tensor& mode,
                           const at::Tensor& urow, const at::Tensor& pool,
                           const at::Tensor& flag, int64_t S) {
  const int64_t T = r.size(0), d = r.size(1), K = coef.size(1);
  const int threads = cuda::threads_for(d / VEC);
  const size_t smem = sizeof(float) * static_cast<size_t>(cuda::kWarp + 1 + K);
  residual_steer_kernel<scalar_t, VEC>
      <<<static_cast<unsigned>(T), threads, smem, cuda::current_stream()>>>(
          r.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), token_slot.data_ptr<int32_t>(),
          coef.data_ptr<float>(), mode.data_ptr<int32_t>(), urow.data_ptr<int32_t>(),
          pool.data_ptr<scalar_t>(), flag.data_ptr<int32_t>(), d, K, S, pool.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void residual_steer_cuda(at::Tensor& r, const at::Tensor& x, const at::Tensor& token_slot,
                         const at::Tensor& coef, const at::Tensor& mode,
                         const at::Tensor& urow, const at::Tensor& pool,
                         const at::Tensor& flag) {
  TORCH_CHECK(r.is_cuda(), "r must be a CUDA tensor for the CUDA kernel");
  const int64_t S =
      residual_steer::check_residual_steer(r, x, token_slot, coef, mode, urow, pool, flag);
  if (r.numel() == 0 || coef.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(r.device());
  EMOSTEER_DISPATCH_FLOAT_TYPES(r.scalar_type(), "residual_steer_cuda", [&] {
    if (cuda::can_vectorize<scalar_t>(r.size(1),
                                      {r.data_ptr(), x.data_ptr(), pool.data_ptr()})) {
      launch_residual_steer<scalar_t, cuda::kMaxVec<scalar_t>>(r, x, token_slot, coef, mode,
                                                               urow, pool, flag, S);
    } else {
      launch_residual_steer<scalar_t, 1>(r, x, token_slot, coef, mode, urow, pool, flag, S);
    }
  });
}

}  // namespace emosteer
