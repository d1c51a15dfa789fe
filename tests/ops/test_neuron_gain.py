"""neuron_gain and silu_and_mul_gain: every fused implementation against the torch
reference, and the no-slot SiluAndMul path against vLLM's own op.

Exact where the contract is exact (tokens without a slot in neuron_gain, gain exactly
1), within twice the same-dtype torch error elsewhere. Shapes: a normal one and an odd
one (97 tokens, 97 neurons).
"""

from __future__ import annotations

import pytest
import torch

import emosteer.ops as ops
from emosteer.ops import reference
from tests.utils import (
    DTYPES,
    assert_close,
    assert_equal,
    assert_error_bound,
    dtype_id,
    error_factor,
    gpu_test,
    kernel_impls,
    poisoned,
    randn_nonzero,
    slot_pattern,
)

CPU_IMPLS = kernel_impls("cpu")
NORMAL, ODD = (16, 64), (97, 97)  # (T, I)
WIDE = (3, 2100)  # I > 2048: several column blocks per token
CASES = [
    (NORMAL, "none"),
    (NORMAL, "one"),
    (NORMAL, "random"),
    (NORMAL, "sorted"),
    (NORMAL, "own"),
    (ODD, "random"),
    (ODD, "sorted"),
    (WIDE, "random"),
]


def case_id(case) -> str:
    (T, I), slot_kind = case
    return f"T{T}_I{I}-slot_{slot_kind}"


def gain_inputs(T, I, slot_kind, gen, device="cpu"):
    """Slots and gains where about a third of the gains are exactly 1 (ENA masks)."""
    S = max(T, 3) if slot_kind == "own" else 3
    g = 1.0 + randn_nonzero(S, I, gen=gen).abs()
    g[torch.rand(S, I, generator=gen) < 0.33] = 1.0
    slot = slot_pattern(slot_kind, T, S, gen)
    return slot.to(device), g.to(device)


# -------------------------------------------------------------------- neuron_gain
def check_neuron_gain(impl, m, slot, g, dtype):
    m_ref, m_hi, m_in = m.clone(), m.double(), m.clone()
    reference.neuron_gain(m_ref, slot, g)
    reference.neuron_gain(m_hi, slot, g)
    ops.neuron_gain(m, slot, g, impl=impl)
    off = slot < 0
    assert_equal(m[off], m_in[off], "m (slot -1 tokens)")
    unit = g[slot[~off].long()] == 1
    assert_equal(m[~off][unit], m_in[~off][unit], "m (gain exactly 1)")
    k = error_factor(impl, dtype, m.device)
    assert_error_bound(m[~off][~unit], m_ref[~off][~unit], m_hi[~off][~unit], dtype, "m", k)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_neuron_gain_matches_reference(impl, dtype, case, gen):
    (T, I), slot_kind = case
    m = randn_nonzero(T, I, dtype=dtype, gen=gen)
    slot, g = gain_inputs(T, I, slot_kind, gen)
    check_neuron_gain(impl, m, slot, g, dtype)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_neuron_gain_unit_keeps_nan_and_negative_zero(impl, gen):
    """A gain of exactly 1 stores the element back untouched, NaN and -0.0 included."""
    m = randn_nonzero(2, 9, gen=gen)
    m[0, 0], m[0, 1] = float("nan"), -0.0
    g = torch.full((1, 9), 1.0)
    g[0, 5] = 3.0
    slot = torch.tensor([0, -1], dtype=torch.int32)
    m_in = m.clone()
    ops.neuron_gain(m, slot, g, impl=impl)
    keep = torch.ones(9, dtype=torch.bool)
    keep[5] = False
    assert_equal(m[0, keep], m_in[0, keep], "gain 1")
    assert_equal(m[1], m_in[1], "slot -1")
    assert_close(m[0, 5], 3.0 * m_in[0, 5], torch.float32, "gain 3")


# -------------------------------------------------------------- silu_and_mul_gain
def check_silu(impl, x, slot, g, dtype):
    T, I = x.shape[0], x.shape[1] // 2
    out = poisoned((T, I), dtype, x.device)
    out_ref, out_hi = out.clone(), out.double()
    reference.silu_and_mul_gain(out_ref, x, slot, g)
    reference.silu_and_mul_gain(out_hi, x.double(), slot, g)
    ops.silu_and_mul_gain(out, x, slot, g, impl=impl)
    assert not bool(out.isnan().any()), "an output element was not written"
    k = error_factor(impl, dtype, x.device)
    assert_error_bound(out, out_ref, out_hi, dtype, "out", k)
    return out


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_silu_and_mul_gain_matches_reference(impl, dtype, case, gen):
    (T, I), slot_kind = case
    x = randn_nonzero(T, 2 * I, dtype=dtype, gen=gen) * 3
    slot, g = gain_inputs(T, I, slot_kind, gen)
    check_silu(impl, x, slot, g, dtype)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_silu_and_mul_gain_is_gain_after_silu(impl, dtype, gen):
    """Fused == plain SiluAndMul then neuron_gain (same impl): gain 1 and slot -1
    elements are bit-identical to plain SiluAndMul."""
    T, I = 8, 24
    x = randn_nonzero(T, 2 * I, dtype=dtype, gen=gen)
    slot, g = gain_inputs(T, I, "random", gen)
    fused = check_silu(impl, x, slot, g, dtype)
    plain = poisoned((T, I), dtype)
    ops.silu_and_mul_gain(plain, x, torch.full((T,), -1, dtype=torch.int32), g, impl=impl)
    off = slot < 0
    assert_equal(fused[off], plain[off], "slot -1 tokens vs plain SiluAndMul")
    unit = g[slot[~off].long()] == 1
    assert_equal(fused[~off][unit], plain[~off][unit], "gain 1 vs plain SiluAndMul")


def _vllm_silu_and_mul():
    """vLLM's compiled op where importable, else its native torch formula."""
    try:
        import vllm._custom_ops  # noqa: F401  (registers torch.ops._C.*)

        op = torch.ops._C.silu_and_mul
        return lambda out, x: op(out, x)
    except (ImportError, AttributeError, RuntimeError):
        pass
    try:
        from vllm.model_executor.layers.activation import SiluAndMul
    except ImportError:
        return None
    return lambda out, x: out.copy_(SiluAndMul.forward_native(x))  # a staticmethod


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(16, 64), (97, 80)], ids=lambda s: f"T{s[0]}_I{s[1]}")
def test_no_slot_matches_vllm_silu_and_mul(impl, dtype, shape, gen):
    """No slots: vLLM's SiluAndMul (its CPU op wants I % 16 == 0)."""
    vllm_op = _vllm_silu_and_mul()
    if vllm_op is None:
        pytest.skip("vLLM's SiluAndMul is not importable here")
    T, I = shape
    x = randn_nonzero(T, 2 * I, dtype=dtype, gen=gen) * 3
    slot, g = gain_inputs(T, I, "none", gen)
    want = poisoned((T, I), dtype)
    vllm_op(want, x)
    out = poisoned((T, I), dtype)
    ops.silu_and_mul_gain(out, x, slot, g, impl=impl)
    assert_close(out, want, dtype, "out vs vLLM SiluAndMul")


# ------------------------------------------------------------------------------ GPU
@gpu_test
@pytest.mark.parametrize("impl", kernel_impls("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(256, 11008), (97, 97), (1, 4096 + 3)])
def test_cuda_matches_reference(impl, dtype, shape):
    gen = torch.Generator().manual_seed(5)
    T, I = shape
    for slot_kind in ("random", "sorted", "none"):
        slot, g = gain_inputs(T, I, slot_kind, gen, device="cuda")
        m = randn_nonzero(T, I, dtype=dtype, gen=gen).cuda()
        check_neuron_gain(impl, m, slot, g, dtype)
        x = (randn_nonzero(T, 2 * I, dtype=dtype, gen=gen) * 3).cuda()
        check_silu(impl, x, slot, g, dtype)
