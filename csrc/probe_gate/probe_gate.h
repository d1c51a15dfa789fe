// Probe-gated steering, shared by the CUDA kernels and the CPU twin:
//
//   if flag[0] == 0: nothing at all
//   for t with s = token_slot[t] >= 0 and row = prow[s] >= 0 (a gated token):
//     p = h[t] . probes[row] + bias[s]               (float32; the sum, then the bias)
//     score_buf[score_index[t]] = p                  where score_index[t] >= 0
//     hold = gmode[s] & 1 ? p < thresh[s] : p > thresh[s]
//     open = hold; with the latch (gmode[s] & 2, g = state_row[t] >= 0):
//       open = hold || state[g] != 0 || a latched token of g before t held,
//       and state[g] = 1 where open
//     token_slot[t] = -1 where not open
//
// Every other token is left alone. The latch is a running OR over the tokens of a
// request in token order (a request's tokens are contiguous and in position order in a
// batch, but nothing here relies on it). Running example: token_slot = [0, 0, 0, -1],
// prow = [2], gmode = [2] (latch, open above), state_row = [1, 1, 1, -1], state[1] = 0
// and scores [-1, 3, -1] against thresh 0: token 0 closes (slot -1), tokens 1 and 2 stay
// open (1 holds, 2 latched), token 3 is not gated, and state[1] becomes 1.
#pragma once

#include "common.h"

namespace emosteer {
namespace probe_gate {

constexpr int32_t kBelow = 1, kLatch = 2;

// Whether the score holds against the threshold under gate mode gm.
EMOSTEER_HD bool holds(float p, float thresh, int32_t gm) {
  return (gm & kBelow) ? p < thresh : p > thresh;
}

EMOSTEER_HD bool latched(int32_t gm, int64_t g) { return (gm & kLatch) != 0 && g >= 0; }

#if !defined(__CUDACC__)
// What the CPU launcher hands the vectorized score loop (cpu_kernel.h). Indices are
// already checked.
struct CpuArgs {
  const void* h;              // [T, d] scalar_t
  const int32_t* token_slot;  // [T]
  const int32_t* prow;        // [S]
  const float* probes;        // [P, d]
  const float* bias;          // [S]
  float* score;               // [T] scratch: p of the gated tokens
  int64_t d;
};
namespace DEFAULT {
template <typename scalar_t>
void scores(const CpuArgs& p, int64_t begin, int64_t end);
}
namespace AVX2 {
template <typename scalar_t>
void scores(const CpuArgs& p, int64_t begin, int64_t end);
}
#endif

#if !defined(EMOSTEER_KERNEL_ONLY)
// Host-side checks shared by the launchers. Returns S (slots).
inline int64_t check_probe_gate(const at::Tensor& h, const at::Tensor& token_slot,
                                const at::Tensor& prow, const at::Tensor& probes,
                                const at::Tensor& bias, const at::Tensor& thresh,
                                const at::Tensor& gmode, const at::Tensor& state_row,
                                const at::Tensor& state, const at::Tensor& score_index,
                                const at::Tensor& score_buf, const at::Tensor& flag) {
  const auto dev = h.device();
  EMOSTEER_CHECK_INPUT(h, dev, 2);
  EMOSTEER_CHECK_FLOAT_DTYPE(h);
  const int64_t T = h.size(0);
  EMOSTEER_CHECK_INPUT(token_slot, dev, 1);
  EMOSTEER_CHECK_DTYPE(token_slot, at::kInt);
  EMOSTEER_CHECK_SIZE(token_slot, 0, T);
  EMOSTEER_CHECK_INPUT(prow, dev, 1);
  EMOSTEER_CHECK_DTYPE(prow, at::kInt);
  const int64_t S = prow.size(0);
  EMOSTEER_CHECK_INPUT(probes, dev, 2);
  EMOSTEER_CHECK_DTYPE(probes, at::kFloat);
  EMOSTEER_CHECK_SIZE(probes, 1, h.size(1));
  EMOSTEER_CHECK_INPUT(bias, dev, 1);
  EMOSTEER_CHECK_DTYPE(bias, at::kFloat);
  EMOSTEER_CHECK_SIZE(bias, 0, S);
  EMOSTEER_CHECK_INPUT(thresh, dev, 1);
  EMOSTEER_CHECK_DTYPE(thresh, at::kFloat);
  EMOSTEER_CHECK_SIZE(thresh, 0, S);
  EMOSTEER_CHECK_INPUT(gmode, dev, 1);
  EMOSTEER_CHECK_DTYPE(gmode, at::kInt);
  EMOSTEER_CHECK_SIZE(gmode, 0, S);
  EMOSTEER_CHECK_INPUT(state_row, dev, 1);
  EMOSTEER_CHECK_DTYPE(state_row, at::kInt);
  EMOSTEER_CHECK_SIZE(state_row, 0, T);
  EMOSTEER_CHECK_INPUT(state, dev, 1);
  EMOSTEER_CHECK_DTYPE(state, at::kInt);
  EMOSTEER_CHECK_INPUT(score_index, dev, 1);
  EMOSTEER_CHECK_DTYPE(score_index, at::kInt);
  EMOSTEER_CHECK_SIZE(score_index, 0, T);
  EMOSTEER_CHECK_INPUT(score_buf, dev, 1);
  EMOSTEER_CHECK_DTYPE(score_buf, at::kFloat);
  EMOSTEER_CHECK_INPUT(flag, dev, 1);
  EMOSTEER_CHECK_DTYPE(flag, at::kInt);
  EMOSTEER_CHECK_SIZE(flag, 0, 1);
  return S;
}
#endif

}  // namespace probe_gate
}  // namespace emosteer
