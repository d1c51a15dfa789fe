// CUDA probe_gate: two kernels over an int32 scratch of T codes and R first-hold
// indices (allocated per call, the indices filled with T: "none held"), so that no
// thread reads what another writes in the same launch:
//
//   1. score, one block per token: the block-reduced probe score of a gated token, its
//      capture, and code[t]: -1 not gated, 0 closed, 1 open, 2 latched and open only if
//      an earlier token of the request held (first[g] < t), 3 latched and open (it
//      holds, or state[g] != 0; sets state[g]); a latched token that holds
//      atomicMin-s its index into first[g]. Reads state and token_slot, writes neither.
//   2. apply, one thread per token: token_slot[t] = -1 where closed, state[g] = 1 where
//      code 3. Reads only the scratch (and state_row).
//
// Both read `flag` first and do nothing while it is 0; the host never reads a tensor
// value, so the launches are CUDA-graph safe.
#include <ATen/ops/empty.h>

#include <algorithm>

#include "cuda_utils.cuh"
#include "probe_gate/probe_gate.h"

namespace emosteer {
namespace {

template <typename scalar_t>
__global__ void probe_gate_score_kernel(const scalar_t* __restrict__ h,          // [T, d]
                                        const int32_t* __restrict__ token_slot,  // [T]
                                        const int32_t* __restrict__ prow,        // [S]
                                        const float* __restrict__ probes,        // [P, d]
                                        const float* __restrict__ bias,          // [S]
                                        const float* __restrict__ thresh,        // [S]
                                        const int32_t* __restrict__ gmode,       // [S]
                                        const int32_t* __restrict__ state_row,   // [T]
                                        const int32_t* __restrict__ state,       // [R]
                                        const int32_t* __restrict__ score_index, // [T]
                                        float* __restrict__ score_buf,           // [C]
                                        int32_t* __restrict__ code,              // [T]
                                        int32_t* __restrict__ first,             // [R]
                                        const int32_t* __restrict__ flag,        // [1]
                                        int64_t d, int64_t S, int64_t P, int64_t R,
                                        int64_t C) {
  __shared__ float red[cuda::kWarp + 1];
  if (flag[0] == 0) return;
  const int64_t t = blockIdx.x;
  const int64_t s = token_slot[t];
  CUDA_KERNEL_ASSERT(s < S);
  const int64_t row = s >= 0 ? prow[s] : -1;
  if (row < 0) {  // the same for every thread of the block
    if (threadIdx.x == 0) code[t] = -1;
    return;
  }
  CUDA_KERNEL_ASSERT(row < P);
  const scalar_t* x = h + t * d;
  const float* w = probes + row * d;
  float part = 0.0f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    part = add_rn(part, mul_rn(static_cast<float>(x[i]), w[i]));
  }
  const float p = add_rn(cuda::block_sum(part, red), bias[s]);
  if (threadIdx.x != 0) return;
  const int64_t cap = score_index[t];
  CUDA_KERNEL_ASSERT(cap < C);
  if (cap >= 0) score_buf[cap] = p;
  const int32_t gm = gmode[s];
  const bool hold = probe_gate::holds(p, thresh[s], gm);
  int32_t c = hold ? 1 : 0;
  const int64_t g = state_row[t];
  CUDA_KERNEL_ASSERT(g < R);
  if (probe_gate::latched(gm, g)) {
    if (hold) {
      c = 3;
      atomicMin(first + g, static_cast<int32_t>(t));
    } else {
      c = state[g] != 0 ? 3 : 2;
    }
  }
  code[t] = c;
}

__global__ void probe_gate_apply_kernel(int32_t* __restrict__ token_slot,        // [T]
                                        const int32_t* __restrict__ state_row,   // [T]
                                        int32_t* __restrict__ state,             // [R]
                                        const int32_t* __restrict__ code,        // [T]
                                        const int32_t* __restrict__ first,       // [R]
                                        const int32_t* __restrict__ flag,        // [1]
                                        int64_t T) {
  if (flag[0] == 0) return;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const int32_t c = code[t];
  if (c == 0 || (c == 2 && first[state_row[t]] >= t)) token_slot[t] = -1;
  if (c == 3) state[state_row[t]] = 1;
}

}  // namespace

void probe_gate_cuda(const at::Tensor& h, at::Tensor& token_slot, const at::Tensor& prow,
                     const at::Tensor& probes, const at::Tensor& bias, const at::Tensor& thresh,
                     const at::Tensor& gmode, const at::Tensor& state_row, at::Tensor& state,
                     const at::Tensor& score_index, at::Tensor& score_buf,
                     const at::Tensor& flag) {
  TORCH_CHECK(h.is_cuda(), "h must be a CUDA tensor for the CUDA kernel");
  const int64_t S = probe_gate::check_probe_gate(h, token_slot, prow, probes, bias, thresh, gmode,
                                                 state_row, state, score_index, score_buf, flag);
  const int64_t T = h.size(0), d = h.size(1), R = state.size(0);
  if (T == 0) return;
  TORCH_CHECK(T < (int64_t{1} << 31), "probe_gate: at most 2^31 - 1 tokens");
  const c10::cuda::CUDAGuard guard(h.device());
  // code[T], then first[max(R, 1)] = T.
  at::Tensor scratch = at::empty({T + std::max<int64_t>(R, 1)}, token_slot.options());
  scratch.narrow(0, T, std::max<int64_t>(R, 1)).fill_(static_cast<int64_t>(T));
  int32_t* code = scratch.data_ptr<int32_t>();
  int32_t* first = code + T;
  const cudaStream_t stream = cuda::current_stream();
  EMOSTEER_DISPATCH_FLOAT_TYPES(h.scalar_type(), "probe_gate_cuda", [&] {
    const int threads = cuda::threads_for(d);
    probe_gate_score_kernel<scalar_t><<<static_cast<unsigned>(T), threads, 0, stream>>>(
        h.data_ptr<scalar_t>(), token_slot.data_ptr<int32_t>(), prow.data_ptr<int32_t>(),
        probes.data_ptr<float>(), bias.data_ptr<float>(), thresh.data_ptr<float>(),
        gmode.data_ptr<int32_t>(), state_row.data_ptr<int32_t>(), state.data_ptr<int32_t>(),
        score_index.data_ptr<int32_t>(), score_buf.data_ptr<float>(), code, first,
        flag.data_ptr<int32_t>(), d, S, probes.size(0), R, score_buf.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  constexpr int kApplyThreads = 256;
  probe_gate_apply_kernel<<<static_cast<unsigned>((T + kApplyThreads - 1) / kApplyThreads),
                            kApplyThreads, 0, stream>>>(
      token_slot.data_ptr<int32_t>(), state_row.data_ptr<int32_t>(), state.data_ptr<int32_t>(),
      code, first, flag.data_ptr<int32_t>(), T);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace emosteer
