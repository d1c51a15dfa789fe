// The `emosteer_C` torch library: schemas of the ops (with their mutation
// annotations), the CPU kernels, and no-op Meta kernels so that the ops trace under
// fake tensors. `import emosteer._C` registers all of it; the CUDA kernels live in the
// separate module emosteer._C_cuda (bindings_cuda.cpp), imported after this one.
#include <ATen/Version.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "common.h"
#include "ops.h"

// No argument is named `mode` or `ctx`: torch.compile's functionalization passes an op's
// arguments by keyword to functions whose own first parameter has that name (the vLLM
// plugin calls these ops inside the compiled graph), so residual_steer's is `mode_`.
TORCH_LIBRARY(emosteer_C, m) {
  m.def(
      "head_affine_capture(Tensor(a!) z, Tensor token_slot, Tensor a, Tensor b, Tensor c, Tensor vrow, "
      "Tensor row_off, Tensor pool, Tensor cap_index, Tensor(b!) cap_buf, Tensor flag) -> ()");
  m.def(
      "residual_steer(Tensor(a!) r, Tensor x, Tensor token_slot, Tensor coef, Tensor mode_, "
      "Tensor urow, Tensor pool, Tensor flag) -> ()");
  m.def(
      "neuron_gain(Tensor(a!) m, Tensor token_slot, Tensor gamma, Tensor nrow, Tensor masks, "
      "Tensor flag) -> ()");
  m.def(
      "probe_gate(Tensor h, Tensor(a!) token_slot, Tensor prow, Tensor probes, Tensor bias, "
      "Tensor thresh, Tensor gmode, Tensor state_row, Tensor(b!) state, Tensor score_index, "
      "Tensor(c!) score_buf, Tensor flag) -> ()");
  // CPU kernel only (ops.h); the GPU path is Triton.
  m.def(
      "attn_image_boost(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_table, Tensor token_row, Tensor token_pos, Tensor token_slot, Tensor beta, "
      "Tensor logit_mode, Tensor spans, Tensor cap_index, Tensor(b!) mass_buf, "
      "Tensor sm_scale, Tensor flag) -> ()");
}

TORCH_LIBRARY_IMPL(emosteer_C, CPU, m) {
  m.impl("head_affine_capture", &emosteer::head_affine_capture_cpu);
  m.impl("residual_steer", &emosteer::residual_steer_cpu);
  m.impl("neuron_gain", &emosteer::neuron_gain_cpu);
  m.impl("probe_gate", &emosteer::probe_gate_cpu);
  m.impl("attn_image_boost", &emosteer::attn_image_boost_cpu);
}

// In-place ops with no outputs: under fake/meta tensors there is nothing to compute.
namespace {
void head_affine_capture_meta(at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, at::Tensor&,
                              const at::Tensor&) {}
void residual_steer_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&) {}
void neuron_gain_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&) {}
void probe_gate_meta(const at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     at::Tensor&, const at::Tensor&, at::Tensor&, const at::Tensor&) {}
void attn_image_boost_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, at::Tensor&, const at::Tensor&,
                           const at::Tensor&) {}
}  // namespace

TORCH_LIBRARY_IMPL(emosteer_C, Meta, m) {
  m.impl("head_affine_capture", &head_affine_capture_meta);
  m.impl("residual_steer", &residual_steer_meta);
  m.impl("neuron_gain", &neuron_gain_meta);
  m.impl("probe_gate", &probe_gate_meta);
  m.impl("attn_image_boost", &attn_image_boost_meta);
}

namespace emosteer {
bool cpu_use_avx2() {
#if EMOSTEER_HAVE_AVX2_BUILD
  static const bool yes = [] {
    const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
    return cap == "AVX2" || cap == "AVX512";
  }();
  return yes;
#else
  return false;
#endif
}
}  // namespace emosteer

// Importing the module is what registers the library; cpu_isa() says which build of the
// CPU kernels runs here ("avx2" or "default").
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "emosteer CPU kernels; ops are under torch.ops.emosteer_C";
  module.def("cpu_isa", [] { return std::string(emosteer::cpu_use_avx2() ? "avx2" : "default"); },
             "Which build of the vectorized CPU kernels runs on this machine.");
}
