// CUDA neuron_gain: a block row per token (grid x = token, y = chunks of the I neurons),
// 16-byte packs where I and alignment allow. Every block reads `flag` first and exits
// when it is 0; tokens with slot -1, or whose slot names no mask row, exit at once.
#include <type_traits>

#include "cuda_utils.cuh"
#include "neuron_gain/neuron_gain.h"

namespace emosteer {
namespace {

template <typename scalar_t, int VEC>
__global__ void neuron_gain_kernel(scalar_t* __restrict__ m,                // [T, I]
                                   const int32_t* __restrict__ token_slot,  // [T]
                                   const float* __restrict__ gamma,         // [S]
                                   const int32_t* __restrict__ nrow,        // [S]
                                   const float* __restrict__ masks,         // [P, I]
                                   const int32_t* __restrict__ flag,        // [1]
                                   int64_t I, int64_t S, int64_t P) {
  using P_ = cuda::Pack<scalar_t, VEC>;
  if (flag[0] == 0) return;
  const int64_t t = blockIdx.x;
  const int64_t s = token_slot[t];
  if (s < 0) return;
  CUDA_KERNEL_ASSERT(s < S);
  const int64_t row = nrow[s];
  if (row < 0) return;
  CUDA_KERNEL_ASSERT(row < P);
  const float gm1 = gamma[s] - 1.0f;  // one rounding, as on the CPU
  P_* mrow = reinterpret_cast<P_*>(m + t * I);
  const float* krow = masks + row * I;
  const int64_t packs = I / VEC;
  for (int64_t p = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    P_ mp = mrow[p];
    bool changed = false;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float g = neuron_gain::gain(gm1, krow[p * VEC + i]);
      if (!neuron_gain::is_identity(g)) {
        mp.v[i] = static_cast<scalar_t>(mul_rn(static_cast<float>(mp.v[i]), g));
        changed = true;
      }
    }
    if (changed) mrow[p] = mp;
  }
}

}  // namespace

void neuron_gain_cuda(at::Tensor& m, const at::Tensor& token_slot, const at::Tensor& gamma,
                      const at::Tensor& nrow, const at::Tensor& masks, const at::Tensor& flag) {
  TORCH_CHECK(m.is_cuda(), "m must be a CUDA tensor for the CUDA kernel");
  const int64_t S = neuron_gain::check_neuron_gain(m, token_slot, gamma, nrow, masks, flag);
  if (m.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(m.device());
  const int64_t T = m.size(0), I = m.size(1);
  EMOSTEER_DISPATCH_FLOAT_TYPES(m.scalar_type(), "neuron_gain_cuda", [&] {
    auto run = [&](auto vec_tag) {
      constexpr int kVec = decltype(vec_tag)::value;
      const int64_t packs = I / kVec;
      const int threads = cuda::threads_for(packs);
      neuron_gain_kernel<scalar_t, kVec>
          <<<cuda::token_grid(T, packs, threads), threads, 0, cuda::current_stream()>>>(
              m.data_ptr<scalar_t>(), token_slot.data_ptr<int32_t>(), gamma.data_ptr<float>(),
              nrow.data_ptr<int32_t>(), masks.data_ptr<float>(), flag.data_ptr<int32_t>(), I, S,
              masks.size(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (cuda::can_vectorize<scalar_t>(I, {m.data_ptr()})) {
      run(std::integral_constant<int, cuda::kMaxVec<scalar_t>>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
  });
}

}  // namespace emosteer
