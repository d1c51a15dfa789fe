// CPU twin of residual_steer: checks, then at::parallel_for over tokens (for large
// batches only) of the vectorized token loop in residual_steer_cpu_kernel.h, AVX2 build
// where the CPU has it (residual_steer_avx2_cpu.cpp), else the portable build compiled
// here.
#include "cpu_vec.h"  // first: this file holds the portable (DEFAULT) build

#include <ATen/Parallel.h>

#include <vector>

#include "residual_steer/residual_steer.h"
#include "residual_steer/residual_steer_cpu_kernel.h"

namespace emosteer {

void residual_steer_cpu(at::Tensor& r, const at::Tensor& x, const at::Tensor& token_slot,
                        const at::Tensor& coef,
                        const at::Tensor& mode, const at::Tensor& urow, const at::Tensor& pool,
                        const at::Tensor& flag) {
  TORCH_CHECK(r.device().is_cpu(), "r must be a CPU tensor for the CPU kernel");
  const int64_t S =
      residual_steer::check_residual_steer(r, x, token_slot, coef, mode, urow, pool, flag);
  if (flag.data_ptr<int32_t>()[0] == 0) return;  // read once: the whole op is off
  if (r.numel() == 0 || coef.size(1) == 0) return;
  const int64_t T = r.size(0), d = r.size(1), K = coef.size(1);
  check_index_values(token_slot.data_ptr<int32_t>(), T, S, "token_slot", "slots");
  check_index_values(urow.data_ptr<int32_t>(), S * K, pool.size(0), "urow", "pool rows");
  std::vector<float> w(static_cast<size_t>(T * K));  // the weights, per token and term
  const residual_steer::CpuArgs args{r.data_ptr(),
                                     x.data_ptr(),
                                     token_slot.data_ptr<int32_t>(),
                                     coef.data_ptr<float>(),
                                     mode.data_ptr<int32_t>(),
                                     urow.data_ptr<int32_t>(),
                                     pool.data_ptr(),
                                     w.data(),
                                     d,
                                     K};
  EMOSTEER_DISPATCH_FLOAT_TYPES(r.scalar_type(), "residual_steer_cpu", [&] {
    auto* tokens = &residual_steer::DEFAULT::tokens<scalar_t>;
#if EMOSTEER_HAVE_AVX2_BUILD
    if (cpu_use_avx2()) tokens = &residual_steer::AVX2::tokens<scalar_t>;
#endif
    at::parallel_for(0, T, grain_for(d),
                     [&](int64_t begin, int64_t end) { tokens(args, begin, end); });
  });
}

}  // namespace emosteer
