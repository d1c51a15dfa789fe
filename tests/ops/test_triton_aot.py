"""Every Triton kernel compiles ahead of time for the GPUs we target (sm_80, sm_90).

No GPU needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs
the whole pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with ptxas) on the CPU,
which catches code the interpreter accepts but the compiler rejects. The block sizes
are the ones the launchers pick for a typical 7B model (32 heads x 128, hidden 4096,
intermediate 11008; for the attention kernel 8 KV heads, 64-key tiles, up to 8 image
spans).
"""

from __future__ import annotations

import importlib

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from emosteer.ops._dispatch import OPS  # noqa: E402
from emosteer.ops.triton._launch import LAUNCH_OPTIONS, for_device  # noqa: E402

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _kernel(module: str, name: str):
    """The compiled-mode (JITFunction) form of a kernel, whatever TRITON_INTERPRET says."""
    kernel = getattr(importlib.import_module(f"emosteer.ops.triton.{module}"), name)
    return for_device(kernel, torch.device("cuda"))


def _specs(t: str):
    """(module, kernel, signature, constexprs, num_warps) for activations of type ``t``."""
    return [
        ("head_affine_capture", "_head_affine_capture_kernel",
         {"z_ptr": f"*{t}", "slot_ptr": "*i32", "a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32",
          "vrow_ptr": "*i32", "row_off_ptr": "*i32", "pool_ptr": f"*{t}", "cap_index_ptr": "*i32",
          "cap_ptr": f"*{t}", "flag_ptr": "*i32", "H": "i32", "D": "i32", "P": "i32",
          "BLOCK_H": "constexpr",
          "BLOCK_D": "constexpr"},
         {"BLOCK_H": 32, "BLOCK_D": 128}, 4),
        # 4 terms per slot: [4, 2048] pool tiles (what the launcher picks for d 4096).
        ("residual_steer", "_residual_steer_kernel",
         {"r_ptr": f"*{t}", "x_ptr": f"*{t}", "slot_ptr": "*i32", "coef_ptr": "*fp32",
          "mode_ptr": "*i32", "urow_ptr": "*i32", "pool_ptr": f"*{t}", "flag_ptr": "*i32",
          "d": "i32",
          "K": "constexpr", "KB": "constexpr", "BLOCK": "constexpr"},
         {"K": 4, "KB": 4, "BLOCK": 2048}, 4),
        ("probe_gate", "_probe_gate_score_kernel",
         {"h_ptr": f"*{t}", "slot_ptr": "*i32", "prow_ptr": "*i32", "probes_ptr": "*fp32",
          "bias_ptr": "*fp32", "thresh_ptr": "*fp32", "gmode_ptr": "*i32",
          "state_row_ptr": "*i32", "state_ptr": "*i32", "score_index_ptr": "*i32",
          "score_ptr": "*fp32", "code_ptr": "*i32", "first_ptr": "*i32", "flag_ptr": "*i32",
          "d": "i32", "BLOCK": "constexpr"},
         {"BLOCK": 4096}, 4),
        ("probe_gate", "_probe_gate_apply_kernel",
         {"slot_ptr": "*i32", "state_row_ptr": "*i32", "state_ptr": "*i32", "code_ptr": "*i32",
          "first_ptr": "*i32", "flag_ptr": "*i32", "T": "i32", "BLOCK": "constexpr"},
         {"BLOCK": 1024}, 4),
        ("neuron_gain", "_neuron_gain_kernel",
         {"m_ptr": f"*{t}", "slot_ptr": "*i32", "gamma_ptr": "*fp32", "nrow_ptr": "*i32",
          "masks_ptr": "*fp32", "flag_ptr": "*i32", "I": "i32", "BLOCK": "constexpr"},
         {"BLOCK": 2048}, 4),
        # GPU cache layout [NB, 16, 8, 128] contiguous, 32 query heads (GQA group 4).
        ("attn_image_boost", "_attn_image_boost_kernel",
         {"out_ptr": f"*{t}", "q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}",
          "bt_ptr": "*i32", "row_ptr": "*i32", "pos_ptr": "*i32", "slot_ptr": "*i32",
          "beta_ptr": "*fp32", "mode_ptr": "*i32", "spans_ptr": "*i32",
          "cap_index_ptr": "*i32", "mass_ptr": "*fp32", "scale_ptr": "*fp32",
          "flag_ptr": "*i32", "H": "i32", "D": "i32", "NS": "i32", "BS": "i32",
          "GROUP": "i32", **{f"stride_{n}": "i32" for n in (
              "qt", "qh", "qd", "kb", "ks", "kh", "kd", "vb", "vs", "vh", "vd", "btr", "btb")},
          "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "BLOCK_NS": "constexpr"},
         {"BLOCK_N": 64, "BLOCK_D": 128, "BLOCK_NS": 8}, 4),
    ]


KERNELS = [s[1] for s in _specs("fp32")]
# bf16 (the serving dtype, and the one with conversion pitfalls) on both archs; the
# other dtypes on sm_90 only, to keep the suite fast (each compile takes ~0.5 s).
CASES = [(k, torch.bfloat16, cc) for k in KERNELS for cc in (80, 90)] + [
    (k, dt, 90) for k in KERNELS for dt in (torch.float16, torch.float32)
]


@pytest.mark.parametrize(
    "kernel,dtype,cc", CASES, ids=[f"{k.strip('_')}-{TYPES[d]}-sm{c}" for k, d, c in CASES]
)
def test_kernel_compiles_for_gpu(kernel, dtype, cc):
    module, name, signature, constexprs, num_warps = next(
        s for s in _specs(TYPES[dtype]) if s[1] == kernel
    )
    fn = _kernel(module, name)
    assert list(signature) == fn.arg_names, "signature out of date with the kernel"
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs),
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": num_warps, **LAUNCH_OPTIONS},
    )
    ptx = compiled.asm["ptx"]
    targets = [line for line in ptx.splitlines() if line.startswith(".target")]
    assert targets and targets[0].startswith(f".target sm_{cc}"), targets
    assert f".entry {name}" in ptx
    assert isinstance(compiled.asm["cubin"], bytes) and len(compiled.asm["cubin"]) > 1000
    # No FMA contraction (LAUNCH_OPTIONS): results round like the torch reference.
    assert "fma.rn.f32" not in ptx


def test_every_kernel_is_covered():
    """A new @triton.jit kernel in an op module must be added to this file."""
    found = set()
    for module in OPS:  # each op's kernels live in emosteer/ops/triton/<op>.py
        mod = importlib.import_module(f"emosteer.ops.triton.{module}")
        found |= {n for n, v in vars(mod).items() if n.endswith("_kernel") and hasattr(v, "fn")}
    assert found == set(KERNELS)
