// The `emosteer_C` torch library: schemas of the five ops (with their mutation
// annotations), the CPU kernels, and no-op Meta kernels so that the ops trace under
// fake tensors. `import emosteer._C` registers all of it; the CUDA kernels live in the
// separate module emosteer._C_cuda (bindings_cuda.cpp), imported after this one.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(emosteer_C, m) {
  m.def(
      "head_affine_capture(Tensor(a!) z, Tensor token_slot, Tensor a, Tensor b, Tensor v, "
      "Tensor cap_index, Tensor(b!) cap_buf) -> ()");
  m.def("residual_add(Tensor(a!) r, Tensor token_slot, Tensor alpha, Tensor u) -> ()");
  m.def(
      "fused_add_rms_norm_steer(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps, "
      "Tensor token_slot, Tensor alpha, Tensor u) -> ()");
  m.def("neuron_gain(Tensor(a!) m, Tensor token_slot, Tensor g) -> ()");
  m.def("silu_and_mul_gain(Tensor(a!) out, Tensor x, Tensor token_slot, Tensor g) -> ()");
}

TORCH_LIBRARY_IMPL(emosteer_C, CPU, m) {
  m.impl("head_affine_capture", &emosteer::head_affine_capture_cpu);
  m.impl("residual_add", &emosteer::residual_add_cpu);
  m.impl("fused_add_rms_norm_steer", &emosteer::fused_add_rms_norm_steer_cpu);
  m.impl("neuron_gain", &emosteer::neuron_gain_cpu);
  m.impl("silu_and_mul_gain", &emosteer::silu_and_mul_gain_cpu);
}

// In-place ops with no outputs: under fake/meta tensors there is nothing to compute.
namespace {
void head_affine_capture_meta(at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              at::Tensor&) {}
void residual_add_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {}
void fused_add_rms_norm_steer_meta(at::Tensor&, at::Tensor&, const at::Tensor&, double,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&) {}
void neuron_gain_meta(at::Tensor&, const at::Tensor&, const at::Tensor&) {}
void silu_and_mul_gain_meta(at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&) {}
}  // namespace

TORCH_LIBRARY_IMPL(emosteer_C, Meta, m) {
  m.impl("head_affine_capture", &head_affine_capture_meta);
  m.impl("residual_add", &residual_add_meta);
  m.impl("fused_add_rms_norm_steer", &fused_add_rms_norm_steer_meta);
  m.impl("neuron_gain", &neuron_gain_meta);
  m.impl("silu_and_mul_gain", &silu_and_mul_gain_meta);
}

// Importing the module is what registers the library; it has no Python functions.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "emosteer CPU kernels; ops are under torch.ops.emosteer_C";
}
