"""residual_add and fused_add_rms_norm_steer: every fused implementation against the
torch reference, and the no-steering path against vLLM's own fused add + RMSNorm.

Exact where the contract is exact (tokens without a slot in residual_add), within
twice the same-dtype torch error elsewhere. Shapes: a normal one and an odd one
(97 tokens, hidden 97 / 80).
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
    randn_nonzero,
    slot_pattern,
)

CPU_IMPLS = kernel_impls("cpu")
NORMAL, ODD = (16, 64), (97, 97)  # (T, d)
WIDE = (3, 4100)  # hidden > 4096: several column blocks / norm chunks
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
EPS = 1e-6


def case_id(case) -> str:
    (T, d), slot_kind = case
    return f"T{T}_d{d}-slot_{slot_kind}"


def steer_inputs(T, d, dtype, slot_kind, gen, device="cpu"):
    S = max(T, 3) if slot_kind == "own" else 3
    alpha = randn_nonzero(S, gen=gen) * 4
    u = randn_nonzero(S, d, dtype=dtype, gen=gen)
    slot = slot_pattern(slot_kind, T, S, gen)
    return slot.to(device), alpha.to(device), u.to(device)


# ------------------------------------------------------------------- residual_add
def check_residual_add(impl, r, slot, alpha, u, dtype):
    r_ref, r_hi, r_in = r.clone(), r.double(), r.clone()
    reference.residual_add(r_ref, slot, alpha, u)
    reference.residual_add(r_hi, slot, alpha, u.double())
    ops.residual_add(r, slot, alpha, u, impl=impl)
    off = slot < 0
    assert_equal(r[off], r_in[off], "r (slot -1 tokens)")
    k = error_factor(impl, dtype, r.device)
    assert_error_bound(r[~off], r_ref[~off], r_hi[~off], dtype, "r (steered tokens)", k)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_residual_add_matches_reference(impl, dtype, case, gen):
    (T, d), slot_kind = case
    r = randn_nonzero(T, d, dtype=dtype, gen=gen)
    slot, alpha, u = steer_inputs(T, d, dtype, slot_kind, gen)
    check_residual_add(impl, r, slot, alpha, u, dtype)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_residual_add_closed_form(impl, gen):
    r = randn_nonzero(3, 10, gen=gen)
    u = randn_nonzero(2, 10, gen=gen)
    alpha = torch.tensor([0.5, -2.0])
    slot = torch.tensor([1, -1, 0], dtype=torch.int32)
    want = r.clone()
    want[0] += -2.0 * u[1]
    want[2] += 0.5 * u[0]
    ops.residual_add(r, slot, alpha, u, impl=impl)
    assert_close(r, want, torch.float32, "r")


# -------------------------------------------------------- fused_add_rms_norm_steer
def check_fused(impl, x, res, w, slot, alpha, u, dtype):
    x_ref, res_ref = x.clone(), res.clone()
    reference.fused_add_rms_norm_steer(x_ref, res_ref, w, EPS, slot, alpha, u)
    x_hi, res_hi = x.double(), res.double()
    reference.fused_add_rms_norm_steer(x_hi, res_hi, w.double(), EPS, slot, alpha, u.double())
    ops.fused_add_rms_norm_steer(x, res, w, EPS, slot, alpha, u, impl=impl)
    k = error_factor(impl, dtype, x.device)
    assert_error_bound(res, res_ref, res_hi, dtype, "residual", k)
    assert_error_bound(x, x_ref, x_hi, dtype, "x (normed)", k)
    assert not bool(x.isnan().any()) and not bool(res.isnan().any()), "NaN in the outputs"


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_matches_reference(impl, dtype, case, gen):
    (T, d), slot_kind = case
    x = randn_nonzero(T, d, dtype=dtype, gen=gen)
    res = randn_nonzero(T, d, dtype=dtype, gen=gen)
    w = randn_nonzero(d, dtype=dtype, gen=gen)
    slot, alpha, u = steer_inputs(T, d, dtype, slot_kind, gen)
    check_fused(impl, x, res, w, slot, alpha, u, dtype)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_fused_equals_plain_add_then_norm(impl, gen):
    """Steering at the norm == residual_add on the summed stream, then plain RMSNorm."""
    T, d = 6, 40
    x = randn_nonzero(T, d, gen=gen)
    res = randn_nonzero(T, d, gen=gen)
    w = randn_nonzero(d, gen=gen)
    slot, alpha, u = steer_inputs(T, d, torch.float32, "random", gen)
    summed = (x.double() + res.double() + torch.where(
        (slot >= 0)[:, None], alpha[slot.long()][:, None].double() * u[slot.long()].double(), 0.0
    ))
    normed = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + EPS) * w.double()
    ops.fused_add_rms_norm_steer(x, res, w, EPS, slot, alpha, u, impl=impl)
    assert_close(res, summed.float(), torch.float32, "residual")
    assert_close(x, normed.float(), torch.float32, "x")


def _vllm_fused_add_rms_norm():
    try:
        import vllm._custom_ops  # noqa: F401  (registers torch.ops._C.*)

        return torch.ops._C.fused_add_rms_norm
    except (ImportError, AttributeError, RuntimeError):
        return None


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(16, 64), (97, 80)], ids=lambda s: f"T{s[0]}_d{s[1]}")
def test_fused_no_slot_matches_vllm(impl, dtype, shape, gen):
    """Slot -1 everywhere is vLLM's fused_add_rms_norm (its CPU op wants d % 16 == 0)."""
    vllm_op = _vllm_fused_add_rms_norm()
    if vllm_op is None:
        pytest.skip("vLLM's fused_add_rms_norm op is not importable here")
    T, d = shape
    x = randn_nonzero(T, d, dtype=dtype, gen=gen)
    res = randn_nonzero(T, d, dtype=dtype, gen=gen)
    w = randn_nonzero(d, dtype=dtype, gen=gen)
    slot, alpha, u = steer_inputs(T, d, dtype, "none", gen)
    x_v, res_v = x.clone(), res.clone()
    vllm_op(x_v, res_v, w, EPS)
    ops.fused_add_rms_norm_steer(x, res, w, EPS, slot, alpha, u, impl=impl)
    assert_close(res, res_v, dtype, "residual vs vLLM")
    assert_close(x, x_v, dtype, "x vs vLLM")


# ------------------------------------------------------------------------------ GPU
@gpu_test
@pytest.mark.parametrize("impl", kernel_impls("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(256, 4096), (97, 97), (3, 8192 + 5)])
def test_cuda_matches_reference(impl, dtype, shape):
    gen = torch.Generator().manual_seed(3)
    T, d = shape
    for slot_kind in ("random", "sorted", "none"):
        slot, alpha, u = steer_inputs(T, d, dtype, slot_kind, gen, device="cuda")
        r = randn_nonzero(T, d, dtype=dtype, gen=gen).cuda()
        check_residual_add(impl, r, slot, alpha, u, dtype)
        x = randn_nonzero(T, d, dtype=dtype, gen=gen).cuda()
        res = randn_nonzero(T, d, dtype=dtype, gen=gen).cuda()
        w = randn_nonzero(d, dtype=dtype, gen=gen).cuda()
        check_fused(impl, x, res, w, slot, alpha, u, dtype)
