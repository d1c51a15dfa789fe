// Per-token residual steering from a vector pool, shared by the CUDA kernel and its CPU
// twins. The residual is h = x + r; the op updates its addend r (vLLM forms the sum in
// its fused add + RMSNorm, after this op) and only reads x:
//
//   if flag[0] == 0: nothing at all
//   for t with s = token_slot[t] >= 0 and some urow[s, k] >= 0:
//     h = x[t] + r[t] (each converted to float32, then added), n = ||h||,
//     per term u_k = pool[urow[s, k]], c_k = h . u_k
//     w_k = coef (add), coef - c_k (clamp), -c_k (project_out); with the relative
//           bit, coef * n in place of coef
//     r[t] = r[t] + w_0*u_0 + w_1*u_1 + ...   (terms in k order, rows -1 skipped)
//
// mode[s, k]: bits 0-1 pick add (0), clamp (1) or project_out (2; 3 is read as 2), bit
// 2 makes the scale / target relative to n. Every term reads the residual entering
// the op. float32 math, each product rounded before its sum, one rounding to r's
// dtype; every other token is left bit-identical. A term that is a plain (absolute)
// add needs neither n nor c_k (x is not read then), and a token whose terms are all
// such adds rounds exactly like the torch reference (the sums of n and c_k may differ
// in order, so the other modes agree within rounding). Running example:
// token_slot = [-1, 0, 2, 1] with urow = [[4, -1], [-1, -1], [0, 3]] leaves tokens 0
// and 3 alone (slot 1 has no term), applies slot 0's term on pool row 4 to token 1 and
// slot 2's two terms to token 2.
#pragma once

#include "common.h"

namespace emosteer {
namespace residual_steer {

constexpr int32_t kAdd = 0, kClamp = 1, kProjectOut = 2, kRelative = 4;

// Whether a term of this mode reads n or c_k (everything but an absolute add).
EMOSTEER_HD bool needs_dots(int32_t mode) { return mode != kAdd; }

// w_k of one term from its coefficient, the norm n and the component c = h . u.
EMOSTEER_HD float weight(int32_t mode, float coef, float n, float c) {
  const float target = (mode & kRelative) ? mul_rn(coef, n) : coef;
  const int32_t base = mode & 3;
  if (base == kAdd) return target;
  if (base == kClamp) return add_rn(target, -c);
  return -c;
}

// `out + w*u`, the product rounded before the sum as in the torch reference; F is float
// (CUDA) or a vector of floats (CPU).
template <typename F>
EMOSTEER_HD F step(const F& out, const F& w, const F& u) {
  return add_rn(out, mul_rn(w, u));
}

#if !defined(__CUDACC__)
// What the CPU launcher hands the vectorized token loop (cpu_kernel.h). Indices are
// already checked.
struct CpuArgs {
  void* r;                    // [T, d] scalar_t
  const void* x;              // [T, d] scalar_t, the other addend (read only)
  const int32_t* token_slot;  // [T]
  const float* coef;          // [S, K]
  const int32_t* mode;        // [S, K]
  const int32_t* urow;        // [S, K]
  const void* pool;           // [P, d] scalar_t
  float* w;                   // [T, K] scratch: the terms' weights per token
  int64_t d;
  int64_t K;
};
namespace DEFAULT {
template <typename scalar_t>
void tokens(const CpuArgs& p, int64_t begin, int64_t end);
}
namespace AVX2 {
template <typename scalar_t>
void tokens(const CpuArgs& p, int64_t begin, int64_t end);
}
#endif

#if !defined(EMOSTEER_KERNEL_ONLY)
// Host-side checks shared by the launchers. Returns S (slots); K is coef.size(1).
inline int64_t check_residual_steer(const at::Tensor& r, const at::Tensor& x,
                                    const at::Tensor& token_slot,
                                    const at::Tensor& coef, const at::Tensor& mode,
                                    const at::Tensor& urow, const at::Tensor& pool,
                                    const at::Tensor& flag) {
  const auto dev = r.device();
  EMOSTEER_CHECK_INPUT(r, dev, 2);
  EMOSTEER_CHECK_FLOAT_DTYPE(r);
  EMOSTEER_CHECK_INPUT(x, dev, 2);
  EMOSTEER_CHECK_DTYPE(x, r.scalar_type());
  EMOSTEER_CHECK_SIZE(x, 0, r.size(0));
  EMOSTEER_CHECK_SIZE(x, 1, r.size(1));
  EMOSTEER_CHECK_INPUT(token_slot, dev, 1);
  EMOSTEER_CHECK_DTYPE(token_slot, at::kInt);
  EMOSTEER_CHECK_SIZE(token_slot, 0, r.size(0));
  EMOSTEER_CHECK_INPUT(coef, dev, 2);
  EMOSTEER_CHECK_DTYPE(coef, at::kFloat);
  const int64_t S = coef.size(0), K = coef.size(1);
  EMOSTEER_CHECK_INPUT(mode, dev, 2);
  EMOSTEER_CHECK_DTYPE(mode, at::kInt);
  EMOSTEER_CHECK_SIZE(mode, 0, S);
  EMOSTEER_CHECK_SIZE(mode, 1, K);
  EMOSTEER_CHECK_INPUT(urow, dev, 2);
  EMOSTEER_CHECK_DTYPE(urow, at::kInt);
  EMOSTEER_CHECK_SIZE(urow, 0, S);
  EMOSTEER_CHECK_SIZE(urow, 1, K);
  EMOSTEER_CHECK_INPUT(pool, dev, 2);
  EMOSTEER_CHECK_DTYPE(pool, r.scalar_type());
  EMOSTEER_CHECK_SIZE(pool, 1, r.size(1));
  EMOSTEER_CHECK_INPUT(flag, dev, 1);
  EMOSTEER_CHECK_DTYPE(flag, at::kInt);
  EMOSTEER_CHECK_SIZE(flag, 0, 1);
  return S;
}
#endif

}  // namespace residual_steer
}  // namespace emosteer
