"""neuron_gain: every fused implementation against the torch reference.

Exact where the contract is exact (tokens without a slot or whose slot has no mask row,
elements whose gain is exactly 1, everything while the flag is 0), bit for bit against
the reference for the implementations that promise it (tests/ops/op_cases), within
twice the same-dtype torch error elsewhere. Shapes: a normal one, an odd one
(97 tokens, 97 neurons), a wide one and one below one CPU vector; 5 mask rows, 7 slots.
"""

from __future__ import annotations

import pytest
import torch

import emosteer.ops as ops
from emosteer.ops import reference
from tests.ops.op_cases import ROW_PATTERNS, check_result, clone_all, flag, row_pattern
from tests.utils import (
    DTYPES,
    assert_close,
    assert_equal,
    dtype_id,
    gpu_test,
    kernel_impls,
    randn_nonzero,
    slot_pattern,
)

CPU_IMPLS = kernel_impls("cpu")
NORMAL, ODD = (16, 64), (97, 97)  # (T, I)
WIDE = (3, 2100)  # I > 2048: several column blocks per token
TAIL = (4, 5)  # below one CPU vector step
P, S = 5, 7
CASES = [
    (NORMAL, "none", "random"),
    (NORMAL, "one", "shared"),
    (NORMAL, "random", "random"),
    (NORMAL, "random", "none"),
    (NORMAL, "sorted", "random"),
    (NORMAL, "own", "shared"),
    (ODD, "random", "random"),
    (ODD, "sorted", "shared"),
    (WIDE, "random", "random"),
    (TAIL, "random", "random"),
]
assert {c[2] for c in CASES} == set(ROW_PATTERNS)


def case_id(case) -> str:
    (T, I), slot_kind, row_kind = case
    return f"T{T}_I{I}-slot_{slot_kind}-nrow_{row_kind}"


def make_inputs(T, I, dtype, slot_kind, row_kind, gen, device="cpu"):
    """Masks of ENA: about 2/3 of the neurons 0 (gain exactly 1), the rest 1 or a
    fractional weight; row 0 all ones. Gammas around 1..3, slot 1's exactly 1 (gain 1 on
    every neuron)."""
    n_slots = max(T, S) if slot_kind == "own" else S
    masks = torch.rand(P, I, generator=gen)
    masks = torch.where(masks < 0.66, 0.0, torch.where(masks < 0.85, 1.0, masks))
    masks[0] = 1.0
    gamma = 1.0 + randn_nonzero(n_slots, gen=gen).abs() * 2
    gamma[1] = 1.0
    args = dict(
        m=randn_nonzero(T, I, dtype=dtype, gen=gen),
        token_slot=slot_pattern(slot_kind, T, n_slots, gen),
        gamma=gamma,
        nrow=row_pattern(row_kind, (n_slots,), P, gen),
        masks=masks,
        flag=flag(True),
    )
    return {k: v.to(device) for k, v in args.items()}


def gains(args) -> tuple[torch.Tensor, torch.Tensor]:
    """(token has a gain row, the [T, I] gains of those tokens) as the reference rounds them."""
    slot, nrow = args["token_slot"], args["nrow"]
    rows = torch.where(slot >= 0, nrow[slot.clamp(min=0).long()], -1)
    on = rows >= 0
    gm1 = args["gamma"][slot[on].long()] - 1.0
    return on, 1.0 + gm1.unsqueeze(-1) * args["masks"][rows[on].long()]


def check_neuron_gain(impl, args, dtype):
    ref, hi = clone_all(args), clone_all(args)
    reference.neuron_gain(**ref)
    hi["m"] = hi["m"].double()
    reference.neuron_gain(**hi)
    m = args["m"]
    m_in = m.clone()
    on, g = gains(args)
    ops.neuron_gain(**args, impl=impl)
    assert_equal(m[~on], m_in[~on], "m (tokens without a slot or a mask row)")
    unit = g == 1
    assert_equal(m[on][unit], m_in[on][unit], "m (gain exactly 1)")
    check_result(impl, m[on][~unit], ref["m"][on][~unit], hi["m"][on][~unit], dtype, "m")


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_neuron_gain_matches_reference(impl, dtype, case, gen):
    (T, I), slot_kind, row_kind = case
    check_neuron_gain(impl, make_inputs(T, I, dtype, slot_kind, row_kind, gen), dtype)


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_flag_off_touches_nothing(impl, dtype, gen):
    args = make_inputs(*NORMAL, dtype, "one", "shared", gen)
    args["masks"].fill_(1.0)
    args["flag"] = flag(False)
    before = clone_all(args)
    ops.neuron_gain(**args, impl=impl)
    assert_equal(args["m"], before["m"], "m with flag 0")
    args["flag"] = torch.tensor([1], dtype=torch.int32)
    ops.neuron_gain(**args, impl=impl)
    assert not bool((args["m"] == before["m"]).all()), "flag 1 must switch the op on"


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_neuron_gain_unit_keeps_nan_and_negative_zero(impl, dtype, gen):
    """A gain of exactly 1 stores the element back untouched, NaN and -0.0 included,
    also inside a vector step with other, scaled elements."""
    I = 37
    m = randn_nonzero(2, I, dtype=dtype, gen=gen)
    m[0, 0], m[0, 1], m[0, 20] = float("nan"), -0.0, float("nan")
    masks = torch.zeros(1, I)
    masks[0, [5, 19, 36]] = 1.0
    masks[0, 21] = 0.5
    slot = torch.tensor([0, -1], dtype=torch.int32)
    m_in = m.clone()
    ops.neuron_gain(m, slot, torch.tensor([3.0]), torch.tensor([0], dtype=torch.int32), masks,
                    flag(), impl=impl)
    keep = masks[0] == 0
    assert_equal(m[0, keep], m_in[0, keep], "gain 1")
    assert_equal(m[1], m_in[1], "slot -1")
    assert_close(m[0, [5, 19, 36]], (3.0 * m_in[0, [5, 19, 36]].float()).to(dtype), dtype,
                 "gain 3")
    assert_close(m[0, 21], (2.0 * m_in[0, 21].float()).to(dtype), dtype, "gain 1 + 2*0.5")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_neuron_gain_closed_form(impl, gen):
    """Slots 0 and 2 share mask row 1 with different gammas; slot 1 has no mask."""
    m = randn_nonzero(4, 6, gen=gen)
    masks = torch.tensor([[1.0] * 6, [0.0, 1.0, 0.0, 1.0, 0.25, 0.0]])
    gamma = torch.tensor([2.0, 5.0, 0.5])
    nrow = torch.tensor([1, -1, 1], dtype=torch.int32)
    slot = torch.tensor([0, 1, 2, -1], dtype=torch.int32)
    want = m.clone()
    want[0] *= 1 + 1.0 * masks[1]
    want[2] *= 1 - 0.5 * masks[1]
    ops.neuron_gain(m, slot, gamma, nrow, masks, flag(), impl=impl)
    assert_close(m, want, torch.float32, "m")


# ------------------------------------------------------------------------------ GPU
@gpu_test
@pytest.mark.parametrize("impl", kernel_impls("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(256, 11008), (97, 97), (1, 4096 + 3)])
def test_cuda_matches_reference(impl, dtype, shape):
    gen = torch.Generator().manual_seed(5)
    T, I = shape
    for slot_kind, row_kind in (("random", "random"), ("sorted", "shared"), ("none", "none")):
        check_neuron_gain(impl, make_inputs(T, I, dtype, slot_kind, row_kind, gen, "cuda"), dtype)
        off = make_inputs(T, I, dtype, slot_kind, row_kind, gen, "cuda")
        off["flag"].zero_()
        before = off["m"].clone()
        ops.neuron_gain(**off, impl=impl)
        assert_equal(off["m"], before, "m with flag 0")
