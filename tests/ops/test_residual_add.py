"""residual_add: every fused implementation against the torch reference.

Exact where the contract is exact (tokens without a slot or whose slot has no pool row,
everything while the flag is 0), bit for bit against the reference for the
implementations that promise it (tests/ops/op_cases), within twice the same-dtype torch
error elsewhere. Shapes: a normal one, an odd one (97 tokens, hidden 97), a wide one and
one below one CPU vector; 5 pool rows, 7 slots, pool-row tables with -1 entries and rows
shared by several slots.
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
NORMAL, ODD = (16, 64), (97, 97)  # (T, d)
WIDE = (3, 4100)  # hidden > 4096: several column blocks
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
    (T, d), slot_kind, row_kind = case
    return f"T{T}_d{d}-slot_{slot_kind}-urow_{row_kind}"


def make_inputs(T, d, dtype, slot_kind, row_kind, gen, device="cpu"):
    n_slots = max(T, S) if slot_kind == "own" else S
    args = dict(
        r=randn_nonzero(T, d, dtype=dtype, gen=gen),
        token_slot=slot_pattern(slot_kind, T, n_slots, gen),
        alpha=randn_nonzero(n_slots, gen=gen) * 4,
        urow=row_pattern(row_kind, (n_slots,), P, gen),
        pool=randn_nonzero(P, d, dtype=dtype, gen=gen),
        flag=flag(True),
    )
    return {k: v.to(device) for k, v in args.items()}


def check_residual_add(impl, args, dtype):
    ref, hi = clone_all(args), clone_all(args)
    reference.residual_add(**ref)
    hi["r"], hi["pool"] = hi["r"].double(), hi["pool"].double()
    reference.residual_add(**hi)
    r, slot, urow = args["r"], args["token_slot"], args["urow"]
    r_in = r.clone()
    ops.residual_add(**args, impl=impl)
    rows = torch.where(slot >= 0, urow[slot.clamp(min=0).long()], -1)
    off = rows < 0
    assert_equal(r[off], r_in[off], "r (tokens without a slot or a pool row)")
    check_result(impl, r[~off], ref["r"][~off], hi["r"][~off], dtype, "r (steered tokens)")


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_residual_add_matches_reference(impl, dtype, case, gen):
    (T, d), slot_kind, row_kind = case
    check_residual_add(impl, make_inputs(T, d, dtype, slot_kind, row_kind, gen), dtype)


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_flag_off_touches_nothing(impl, dtype, gen):
    args = make_inputs(*NORMAL, dtype, "one", "shared", gen)
    args["flag"] = flag(False)
    before = clone_all(args)
    ops.residual_add(**args, impl=impl)
    assert_equal(args["r"], before["r"], "r with flag 0")
    args["flag"] = torch.tensor([-3], dtype=torch.int32)  # any non-zero value is on
    ops.residual_add(**args, impl=impl)
    assert not bool((args["r"] == before["r"]).all()), "flag -3 must switch the op on"


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_residual_add_closed_form(impl, gen):
    """Slots 0 and 2 share pool row 1; slot 1 has no vector."""
    r = randn_nonzero(4, 10, gen=gen)
    pool = randn_nonzero(2, 10, gen=gen)
    alpha = torch.tensor([0.5, 3.0, -2.0])
    urow = torch.tensor([1, -1, 1], dtype=torch.int32)
    slot = torch.tensor([2, -1, 0, 1], dtype=torch.int32)
    want = r.clone()
    want[0] += -2.0 * pool[1]
    want[2] += 0.5 * pool[1]
    r_in = r.clone()
    ops.residual_add(r, slot, alpha, urow, pool, flag(), impl=impl)
    assert_close(r, want, torch.float32, "r")
    assert_equal(r[[1, 3]], r_in[[1, 3]], "untouched tokens")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_empty_batch_and_empty_pool(impl, gen):
    d = 6
    ops.residual_add(torch.empty(0, d), torch.empty(0, dtype=torch.int32), torch.ones(2),
                     torch.full((2,), -1, dtype=torch.int32), torch.empty(0, d), flag(),
                     impl=impl)
    r = randn_nonzero(3, d, gen=gen)
    r_in = r.clone()
    ops.residual_add(r, torch.tensor([0, 1, -1], dtype=torch.int32), torch.ones(2),
                     torch.full((2,), -1, dtype=torch.int32), torch.empty(0, d), flag(),
                     impl=impl)
    assert_equal(r, r_in, "r with an empty pool")


# ------------------------------------------------------------------------------ GPU
@gpu_test
@pytest.mark.parametrize("impl", kernel_impls("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(256, 4096), (97, 97), (3, 8192 + 5)])
def test_cuda_matches_reference(impl, dtype, shape):
    gen = torch.Generator().manual_seed(3)
    T, d = shape
    for slot_kind, row_kind in (("random", "random"), ("sorted", "shared"), ("none", "none")):
        check_residual_add(impl, make_inputs(T, d, dtype, slot_kind, row_kind, gen, "cuda"), dtype)
        off = make_inputs(T, d, dtype, slot_kind, row_kind, gen, "cuda")
        off["flag"].zero_()
        before = off["r"].clone()
        ops.residual_add(**off, impl=impl)
        assert_equal(off["r"], before, "r with flag 0")
