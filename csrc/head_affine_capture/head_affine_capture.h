// Per-head affine update with capture, shared by the CUDA kernel and its CPU twins:
//
//   if flag[0] == 0: nothing at all
//   cap_buf[cap_index[t]] = z[t]  (the row before the update), cap_index[t] >= 0
//   z[t,h] = a[s,h]*z[t,h] + w*v,   s = token_slot[t] >= 0,
//            v = pool[vrow[s,h] + row_off[t], h] (vrow[s,h] >= 0) or 0 (vrow[s,h] == -1),
//            w = b[s,h] (c[s,h] == 0) or b[s,h] + c[s,h]*||z[t,h]|| (a relative add:
//            c = scale / ||v||, so the head gains scale * ||z|| along v's direction)
//
// row_off lets one slot read a run of consecutive pool rows, one per token (a
// position-aligned head patch: its k-th listed position has row_off = k); it is read
// only where the token has a slot and the head a row, and the sum must be a pool row.
//
// Running example: token_slot = [-1, 0, 2, 1], cap_index = [5, -1, -1, 0] leaves
// token 0's z alone but copies it into capture row 5, updates tokens 1..3 with slots
// 0, 2, 1, and copies token 3's row (before its update) into capture row 0. With
// vrow[2] = [3, -1, ...], token 2's head 0 uses pool row 3 and its head 1 uses v = 0.
#pragma once

#include "common.h"

namespace emosteer {
namespace head_affine_capture {

// A head with a == 1, b == 0 and c == 0 is left bit-identical (also -0.0 and NaN in z).
EMOSTEER_HD bool is_identity(float a, float b, float c) {
  return a == 1.0f && b == 0.0f && c == 0.0f;
}

// The coefficient of v given the head's norm n (read only where c != 0, so an absolute
// head never computes it, and an infinite norm cannot turn an absolute b into NaN).
EMOSTEER_HD float weight(float b, float c, float n) {
  return c != 0.0f ? add_rn(b, mul_rn(c, n)) : b;
}

// `a*z + b*v` with each product rounded before the sum, as the torch reference does;
// F is float (CUDA) or a vector of floats (CPU). A head without a pool row passes
// v = 0 (not "no term"): b*0 may be -0.0, and the sum must round the same way.
template <typename F>
EMOSTEER_HD F affine(const F& z, const F& a, const F& b, const F& v) {
  return add_rn(mul_rn(a, z), mul_rn(b, v));
}

#if !defined(__CUDACC__)
// What the CPU launcher hands the vectorized token loop (cpu_kernel.h), one ISA build
// of which runs tokens [begin, end). Indices are already checked.
struct CpuArgs {
  void* z;                    // [T, H, D] scalar_t
  const int32_t* token_slot;  // [T]
  const float* a;             // [S, H]
  const float* b;             // [S, H]
  const float* c;             // [S, H]
  const int32_t* vrow;        // [S, H]
  const int32_t* row_off;     // [T]
  const void* pool;           // [P, H, D] scalar_t
  const int32_t* cap_index;   // [T]
  void* cap_buf;              // [C, H, D] scalar_t
  int64_t H, D;
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
// Host-side checks, shared by both launchers. Returns S (slots).
inline int64_t check_args(const at::Tensor& z, const at::Tensor& token_slot,
                          const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                          const at::Tensor& vrow,
                          const at::Tensor& row_off, const at::Tensor& pool,
                          const at::Tensor& cap_index,
                          const at::Tensor& cap_buf, const at::Tensor& flag) {
  const auto dev = z.device();
  EMOSTEER_CHECK_INPUT(z, dev, 3);
  EMOSTEER_CHECK_FLOAT_DTYPE(z);
  const int64_t T = z.size(0), H = z.size(1), D = z.size(2);
  EMOSTEER_CHECK_INPUT(token_slot, dev, 1);
  EMOSTEER_CHECK_DTYPE(token_slot, at::kInt);
  EMOSTEER_CHECK_SIZE(token_slot, 0, T);
  EMOSTEER_CHECK_INPUT(a, dev, 2);
  EMOSTEER_CHECK_DTYPE(a, at::kFloat);
  EMOSTEER_CHECK_SIZE(a, 1, H);
  const int64_t S = a.size(0);
  EMOSTEER_CHECK_INPUT(b, dev, 2);
  EMOSTEER_CHECK_DTYPE(b, at::kFloat);
  EMOSTEER_CHECK_SIZE(b, 0, S);
  EMOSTEER_CHECK_SIZE(b, 1, H);
  EMOSTEER_CHECK_INPUT(c, dev, 2);
  EMOSTEER_CHECK_DTYPE(c, at::kFloat);
  EMOSTEER_CHECK_SIZE(c, 0, S);
  EMOSTEER_CHECK_SIZE(c, 1, H);
  EMOSTEER_CHECK_INPUT(vrow, dev, 2);
  EMOSTEER_CHECK_DTYPE(vrow, at::kInt);
  EMOSTEER_CHECK_SIZE(vrow, 0, S);
  EMOSTEER_CHECK_SIZE(vrow, 1, H);
  EMOSTEER_CHECK_INPUT(row_off, dev, 1);
  EMOSTEER_CHECK_DTYPE(row_off, at::kInt);
  EMOSTEER_CHECK_SIZE(row_off, 0, T);
  EMOSTEER_CHECK_INPUT(pool, dev, 3);
  EMOSTEER_CHECK_DTYPE(pool, z.scalar_type());
  EMOSTEER_CHECK_SIZE(pool, 1, H);
  EMOSTEER_CHECK_SIZE(pool, 2, D);
  EMOSTEER_CHECK_INPUT(cap_index, dev, 1);
  EMOSTEER_CHECK_DTYPE(cap_index, at::kInt);
  EMOSTEER_CHECK_SIZE(cap_index, 0, T);
  EMOSTEER_CHECK_INPUT(cap_buf, dev, 3);
  EMOSTEER_CHECK_DTYPE(cap_buf, z.scalar_type());
  EMOSTEER_CHECK_SIZE(cap_buf, 1, H);
  EMOSTEER_CHECK_SIZE(cap_buf, 2, D);
  EMOSTEER_CHECK_INPUT(flag, dev, 1);
  EMOSTEER_CHECK_DTYPE(flag, at::kInt);
  EMOSTEER_CHECK_SIZE(flag, 0, 1);
  return S;
}
#endif

}  // namespace head_affine_capture
}  // namespace emosteer
