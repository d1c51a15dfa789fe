// Per-head affine update with capture, shared by the CUDA kernel and its CPU twin:
//
//   z[t,h] = a[s,h]*z[t,h] + b[s,h]*v[s,h],   s = token_slot[t] >= 0
//   cap_buf[cap_index[t]] = z[t]  (the row before the update), cap_index[t] >= 0
//
// Running example: token_slot = [-1, 0, 2, 1], cap_index = [5, -1, -1, 0] leaves
// token 0's z alone but copies it into capture row 5, updates tokens 1..3 with slots
// 0, 2, 1, and copies token 3's row (before its update) into capture row 0.
#pragma once

#include "common.h"

namespace emosteer {
namespace head_affine {

// A head with a == 1 and b == 0 is left bit-identical (also -0.0 and NaN in z).
EMOSTEER_HD bool is_identity(float a, float b) { return a == 1.0f && b == 0.0f; }

// `a*z + b*v` with each product rounded before the sum, as the torch reference does.
EMOSTEER_HD float affine(float z, float a, float b, float v) {
  return add_rn(mul_rn(a, z), mul_rn(b, v));
}

// Host-side checks, shared by both launchers. Returns S (slots).
inline int64_t check_args(const at::Tensor& z, const at::Tensor& token_slot,
                          const at::Tensor& a, const at::Tensor& b, const at::Tensor& v,
                          const at::Tensor& cap_index, const at::Tensor& cap_buf) {
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
  EMOSTEER_CHECK_INPUT(v, dev, 3);
  EMOSTEER_CHECK_DTYPE(v, z.scalar_type());
  EMOSTEER_CHECK_SIZE(v, 0, S);
  EMOSTEER_CHECK_SIZE(v, 1, H);
  EMOSTEER_CHECK_SIZE(v, 2, D);
  EMOSTEER_CHECK_INPUT(cap_index, dev, 1);
  EMOSTEER_CHECK_DTYPE(cap_index, at::kInt);
  EMOSTEER_CHECK_SIZE(cap_index, 0, T);
  EMOSTEER_CHECK_INPUT(cap_buf, dev, 3);
  EMOSTEER_CHECK_DTYPE(cap_buf, z.scalar_type());
  EMOSTEER_CHECK_SIZE(cap_buf, 1, H);
  EMOSTEER_CHECK_SIZE(cap_buf, 2, D);
  return S;
}

}  // namespace head_affine
}  // namespace emosteer
