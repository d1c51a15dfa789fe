// CPU twins of residual_add and fused_add_rms_norm_steer: at::parallel_for over tokens,
// per-element math from residual_add.h.
#include <ATen/Parallel.h>

#include <algorithm>

#include "residual_add/residual_add.h"

namespace emosteer {
namespace {

template <typename scalar_t>
void residual_add_kernel(scalar_t* r,                // [T, d]
                         const int32_t* token_slot,  // [T]
                         const float* alpha,         // [S]
                         const scalar_t* u,          // [S, d]
                         int64_t T, int64_t d, int64_t S) {
  at::parallel_for(0, T, grain_for(d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = token_slot[t];
      if (s < 0) continue;
      TORCH_CHECK(s < S, "token_slot[", t, "] = ", s, " but there are ", S, " slots");
      const float al = alpha[s];
      scalar_t* rt = r + t * d;
      const scalar_t* us = u + s * d;
      for (int64_t i = 0; i < d; ++i) {
        rt[i] = static_cast<scalar_t>(
            residual::steer(static_cast<float>(rt[i]), al, static_cast<float>(us[i])));
      }
    }
  });
}

template <typename scalar_t>
void fused_add_rms_norm_steer_kernel(scalar_t* x,                // [T, d]
                                     scalar_t* residual,         // [T, d]
                                     const scalar_t* weight,     // [d]
                                     float eps,
                                     const int32_t* token_slot,  // [T]
                                     const float* alpha,         // [S]
                                     const scalar_t* u,          // [S, d]
                                     int64_t T, int64_t d, int64_t S) {
  at::parallel_for(0, T, grain_for(d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = token_slot[t];
      TORCH_CHECK(s < S, "token_slot[", t, "] = ", s, " but there are ", S, " slots");
      scalar_t* xt = x + t * d;
      scalar_t* rt = residual + t * d;
      // Squares are rounded to float (as h.pow(2) is) and summed in double, which is
      // closer to torch's cascade sum than a plain float accumulation.
      double sum_sq = 0.0;
      if (s >= 0) {
        const float al = alpha[s];
        const scalar_t* us = u + s * d;
        for (int64_t i = 0; i < d; ++i) {
          const float sum = add_rn(static_cast<float>(xt[i]), static_cast<float>(rt[i]));
          rt[i] = static_cast<scalar_t>(residual::steer(sum, al, static_cast<float>(us[i])));
          const float h = static_cast<float>(rt[i]);
          sum_sq += static_cast<double>(h * h);
        }
      } else {
        for (int64_t i = 0; i < d; ++i) {
          rt[i] = static_cast<scalar_t>(add_rn(static_cast<float>(xt[i]), static_cast<float>(rt[i])));
          const float h = static_cast<float>(rt[i]);
          sum_sq += static_cast<double>(h * h);
        }
      }
      const float inv = residual::inv_rms(static_cast<float>(sum_sq), d, eps);
      for (int64_t i = 0; i < d; ++i) {
        xt[i] = residual::normed_times_weight<scalar_t>(static_cast<float>(rt[i]), inv, weight[i]);
      }
    }
  });
}

}  // namespace

void residual_add_cpu(at::Tensor& r, const at::Tensor& token_slot, const at::Tensor& alpha,
                      const at::Tensor& u) {
  TORCH_CHECK(r.device().is_cpu(), "r must be a CPU tensor for the CPU kernel");
  const int64_t S = residual::check_residual_add(r, token_slot, alpha, u);
  if (r.numel() == 0) return;
  EMOSTEER_DISPATCH_FLOAT_TYPES(r.scalar_type(), "residual_add_cpu", [&] {
    residual_add_kernel<scalar_t>(r.data_ptr<scalar_t>(), token_slot.data_ptr<int32_t>(),
                                  alpha.data_ptr<float>(), u.data_ptr<scalar_t>(), r.size(0),
                                  r.size(1), S);
  });
}

void fused_add_rms_norm_steer_cpu(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                                  double eps, const at::Tensor& token_slot,
                                  const at::Tensor& alpha, const at::Tensor& u) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernel");
  const at::Tensor w = residual::check_fused(x, residual, weight, eps, token_slot, alpha, u);
  if (x.numel() == 0) return;
  EMOSTEER_DISPATCH_FLOAT_TYPES(x.scalar_type(), "fused_add_rms_norm_steer_cpu", [&] {
    fused_add_rms_norm_steer_kernel<scalar_t>(
        x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
        static_cast<float>(eps), token_slot.data_ptr<int32_t>(), alpha.data_ptr<float>(),
        u.data_ptr<scalar_t>(), x.size(0), x.size(1), alpha.size(0));
  });
}

}  // namespace emosteer
