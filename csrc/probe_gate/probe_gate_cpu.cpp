// CPU twin of probe_gate: checks, the probe scores of the gated tokens (at::parallel_for
// over tokens, for large batches only, of the vectorized loop in probe_gate_cpu_kernel.h,
// AVX2 build where the CPU has it), then one sequential pass in token order: capture,
// gate, latch. In token order the latch needs no scratch: a latched token that opens
// sets state[g] = 1 at once, which is what "held earlier in this step" means for the
// tokens of g after it.
#include "cpu_vec.h"  // first: this file holds the portable (DEFAULT) build

#include <ATen/Parallel.h>

#include <vector>

#include "probe_gate/probe_gate.h"
#include "probe_gate/probe_gate_cpu_kernel.h"

namespace emosteer {

void probe_gate_cpu(const at::Tensor& h, at::Tensor& token_slot, const at::Tensor& prow,
                    const at::Tensor& probes, const at::Tensor& bias, const at::Tensor& thresh,
                    const at::Tensor& gmode, const at::Tensor& state_row, at::Tensor& state,
                    const at::Tensor& score_index, at::Tensor& score_buf, const at::Tensor& flag) {
  TORCH_CHECK(h.device().is_cpu(), "h must be a CPU tensor for the CPU kernel");
  const int64_t S = probe_gate::check_probe_gate(h, token_slot, prow, probes, bias, thresh, gmode,
                                                 state_row, state, score_index, score_buf, flag);
  if (flag.data_ptr<int32_t>()[0] == 0) return;  // read once: the whole op is off
  const int64_t T = h.size(0), d = h.size(1);
  if (T == 0) return;
  int32_t* slot = token_slot.data_ptr<int32_t>();
  check_index_values(slot, T, S, "token_slot", "slots");
  check_index_values(prow.data_ptr<int32_t>(), S, probes.size(0), "prow", "probe rows");
  check_index_values(state_row.data_ptr<int32_t>(), T, state.size(0), "state_row",
                     "state rows");
  check_index_values(score_index.data_ptr<int32_t>(), T, score_buf.size(0), "score_index",
                     "score rows");
  std::vector<float> score(static_cast<size_t>(T));
  const probe_gate::CpuArgs args{h.data_ptr(),       slot,  prow.data_ptr<int32_t>(),
                                 probes.data_ptr<float>(), bias.data_ptr<float>(),
                                 score.data(),       d};
  EMOSTEER_DISPATCH_FLOAT_TYPES(h.scalar_type(), "probe_gate_cpu", [&] {
    auto* scores = &probe_gate::DEFAULT::scores<scalar_t>;
#if EMOSTEER_HAVE_AVX2_BUILD
    if (cpu_use_avx2()) scores = &probe_gate::AVX2::scores<scalar_t>;
#endif
    at::parallel_for(0, T, grain_for(d),
                     [&](int64_t begin, int64_t end) { scores(args, begin, end); });
  });
  const int32_t* prow_p = prow.data_ptr<int32_t>();
  const float* thresh_p = thresh.data_ptr<float>();
  const int32_t* gmode_p = gmode.data_ptr<int32_t>();
  const int32_t* state_row_p = state_row.data_ptr<int32_t>();
  const int32_t* score_index_p = score_index.data_ptr<int32_t>();
  int32_t* state_p = state.data_ptr<int32_t>();
  float* score_buf_p = score_buf.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = slot[t];
    if (s < 0 || prow_p[s] < 0) continue;
    const float p = score[t];
    if (score_index_p[t] >= 0) score_buf_p[score_index_p[t]] = p;
    const int32_t gm = gmode_p[s];
    bool open = probe_gate::holds(p, thresh_p[s], gm);
    const int64_t g = state_row_p[t];
    if (probe_gate::latched(gm, g)) {
      open = open || state_p[g] != 0;
      if (open) state_p[g] = 1;
    }
    if (!open) slot[t] = -1;
  }
}

}  // namespace emosteer
