// CUDA kernels of the `emosteer_C` torch library (schemas in bindings_cpu.cpp, module
// emosteer._C, which must be imported first). `import emosteer._C_cuda` registers them.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(emosteer_C, CUDA, m) {
  m.impl("head_affine_capture", &emosteer::head_affine_capture_cuda);
  m.impl("residual_steer", &emosteer::residual_steer_cuda);
  m.impl("neuron_gain", &emosteer::neuron_gain_cuda);
  m.impl("probe_gate", &emosteer::probe_gate_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "emosteer CUDA kernels; ops are under torch.ops.emosteer_C";
}
