// CUDA neuron_gain and silu_and_mul_gain: a block row per token (grid x = token,
// y = chunks of the I neurons), 16-byte packs where I and alignment allow. neuron_gain
// exits at once on slot -1; silu_and_mul_gain computes vLLM's SiluAndMul for every token
// and applies the gains only where a slot is set.
#include <type_traits>

#include "cuda_utils.cuh"
#include "neuron_gain/neuron_gain.h"

namespace emosteer {
namespace {

template <typename scalar_t, int VEC>
__global__ void neuron_gain_kernel(scalar_t* __restrict__ m,                // [T, I]
                                   const int32_t* __restrict__ token_slot,  // [T]
                                   const float* __restrict__ g,             // [S, I]
                                   int64_t I, int64_t S) {
  using P = cuda::Pack<scalar_t, VEC>;
  const int64_t t = blockIdx.x;
  const int64_t s = token_slot[t];
  if (s < 0) return;
  CUDA_KERNEL_ASSERT(s < S);
  P* mrow = reinterpret_cast<P*>(m + t * I);
  const float* grow = g + s * I;
  const int64_t packs = I / VEC;
  for (int64_t p = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    P mp = mrow[p];
    bool changed = false;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float gi = grow[p * VEC + i];
      if (!neuron::is_identity(gi)) {
        mp.v[i] = static_cast<scalar_t>(mul_rn(static_cast<float>(mp.v[i]), gi));
        changed = true;
      }
    }
    if (changed) mrow[p] = mp;
  }
}

template <typename scalar_t, int VEC>
__global__ void silu_and_mul_gain_kernel(scalar_t* __restrict__ out,              // [T, I]
                                         const scalar_t* __restrict__ x,          // [T, 2I]
                                         const int32_t* __restrict__ token_slot,  // [T]
                                         const float* __restrict__ g,             // [S, I]
                                         int64_t I, int64_t S) {
  using P = cuda::Pack<scalar_t, VEC>;
  const int64_t t = blockIdx.x;
  const int64_t s = token_slot[t];
  CUDA_KERNEL_ASSERT(s < S);
  const P* gate = reinterpret_cast<const P*>(x + t * 2 * I);
  const P* up = reinterpret_cast<const P*>(x + t * 2 * I + I);
  P* orow = reinterpret_cast<P*>(out + t * I);
  const float* grow = s >= 0 ? g + s * I : nullptr;
  const int64_t packs = I / VEC;
  for (int64_t p = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const P gp = gate[p];
    const P upp = up[p];
    P op;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float act = neuron::silu_mul(static_cast<float>(gp.v[i]), static_cast<float>(upp.v[i]));
      op.v[i] = grow != nullptr ? neuron::gained<scalar_t>(act, grow[p * VEC + i])
                                : static_cast<scalar_t>(act);
    }
    orow[p] = op;
  }
}

}  // namespace

void neuron_gain_cuda(at::Tensor& m, const at::Tensor& token_slot, const at::Tensor& g) {
  TORCH_CHECK(m.is_cuda(), "m must be a CUDA tensor for the CUDA kernel");
  const int64_t S = neuron::check_neuron_gain(m, token_slot, g);
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
              m.data_ptr<scalar_t>(), token_slot.data_ptr<int32_t>(), g.data_ptr<float>(), I, S);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (cuda::can_vectorize<scalar_t>(I, {m.data_ptr()})) {
      run(std::integral_constant<int, cuda::kMaxVec<scalar_t>>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
  });
}

void silu_and_mul_gain_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& token_slot,
                            const at::Tensor& g) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel");
  const int64_t S = neuron::check_silu_and_mul_gain(out, x, token_slot, g);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = out.size(0), I = out.size(1);
  EMOSTEER_DISPATCH_FLOAT_TYPES(x.scalar_type(), "silu_and_mul_gain_cuda", [&] {
    auto run = [&](auto vec_tag) {
      constexpr int kVec = decltype(vec_tag)::value;
      const int64_t packs = I / kVec;
      const int threads = cuda::threads_for(packs);
      silu_and_mul_gain_kernel<scalar_t, kVec>
          <<<cuda::token_grid(T, packs, threads), threads, 0, cuda::current_stream()>>>(
              out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), token_slot.data_ptr<int32_t>(),
              g.data_ptr<float>(), I, S);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // The up half starts I elements into each row: I must split into whole packs too.
    if (cuda::can_vectorize<scalar_t>(I, {out.data_ptr(), x.data_ptr()})) {
      run(std::integral_constant<int, cuda::kMaxVec<scalar_t>>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
  });
}

}  // namespace emosteer
