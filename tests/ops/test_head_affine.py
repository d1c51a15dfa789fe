"""head_affine_capture: every fused implementation against the torch reference.

Exact where the contract is exact (untouched tokens, heads with a=1/b=0, captured rows,
rows that are not captured stay poisoned), within twice the same-dtype torch error
elsewhere. Shapes: a normal one and an odd one (13 heads, head_dim 80, 97 tokens).
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
    capture_pattern,
    dtype_id,
    error_factor,
    gpu_test,
    kernel_impls,
    poisoned,
    randn_nonzero,
    slot_pattern,
)

CPU_IMPLS = kernel_impls("cpu")
NORMAL, ODD = (16, 8, 64), (97, 13, 80)  # (T, H, D)
WIDE = (3, 40, 128)  # H*D > 4096: several head blocks per token
# (shape, slot pattern, capture pattern): every pattern of each kind on the normal
# shape; the odd and wide shapes (interpreter time grows with programs) with mixed ones.
CASES = [
    (NORMAL, "none", "none"),
    (NORMAL, "none", "random"),
    (NORMAL, "one", "last"),
    (NORMAL, "random", "random"),
    (NORMAL, "sorted", "all"),
    (NORMAL, "own", "none"),
    (ODD, "random", "random"),
    (ODD, "sorted", "all"),
    (WIDE, "random", "random"),
]


def case_id(case) -> str:
    (T, H, D), slot_kind, cap_kind = case
    return f"T{T}_H{H}_D{D}-slot_{slot_kind}-cap_{cap_kind}"


def make_inputs(T, H, D, dtype, slot_kind, cap_kind, gen, device="cpu"):
    S = max(T, 4) if slot_kind == "own" else 4
    C = T + 3
    z = randn_nonzero(T, H, D, dtype=dtype, gen=gen)
    v = randn_nonzero(S, H, D, dtype=dtype, gen=gen)
    a = randn_nonzero(S, H, gen=gen)
    b = randn_nonzero(S, H, gen=gen)
    # Head 0 is a=1, b=0 for every slot: must stay bit-identical, even NaN and -0.0.
    a[:, 0], b[:, 0] = 1.0, 0.0
    z[:, 0, 0] = float("nan")
    z[:, 0, 1] = -0.0
    # The other modes: patch (a=0, b=1), ablate (a=0, b=0), scale (a=2, b=0).
    if H >= 4:
        a[:, 1], b[:, 1] = 0.0, 1.0
        a[:, 2], b[:, 2] = 0.0, 0.0
        a[:, 3], b[:, 3] = 2.0, 0.0
    slot = slot_pattern(slot_kind, T, S, gen)
    cap = capture_pattern(cap_kind, T, C, gen)
    cap_buf = poisoned((C, H, D), dtype)
    return [t.to(device) for t in (z, slot, a, b, v, cap, cap_buf)]


def run_and_check(impl, z, slot, a, b, v, cap, cap_buf, dtype):
    z_ref, buf_ref = z.clone(), cap_buf.clone()
    reference.head_affine_capture(z_ref, slot, a, b, v, cap, buf_ref)
    z_hi, buf_hi = z.double(), cap_buf.double()
    reference.head_affine_capture(z_hi, slot, a, b, v.double(), cap, buf_hi)
    z_in = z.clone()

    ops.head_affine_capture(z, slot, a, b, v, cap, cap_buf, impl=impl)

    # Captures: exact copies of the pre-intervention rows, other rows still NaN.
    assert_equal(cap_buf, buf_ref, "cap_buf")
    captured = cap[cap >= 0].long()
    for t in (cap >= 0).nonzero().flatten().tolist():
        assert_equal(cap_buf[cap[t].long()], z_in[t], f"cap_buf row of token {t}")
    free = torch.ones(cap_buf.shape[0], dtype=torch.bool, device=cap_buf.device)
    free[captured] = False
    assert bool(cap_buf[free].isnan().all()), "a row nobody captured into was written"

    # Untouched tokens and a=1/b=0 heads: bit-identical to the input.
    untouched = slot < 0
    assert_equal(z[untouched], z_in[untouched], "z (slot -1 tokens)")
    sel = ~untouched
    s = slot[sel].long()
    keep = (a[s] == 1) & (b[s] == 0)  # [n, H]
    assert_equal(z[sel][keep], z_in[sel][keep], "z (a=1, b=0 heads)")
    # Everything else: within twice the same-dtype torch error of a precise result.
    changed = ~keep
    k = error_factor(impl, dtype, z.device)
    assert_error_bound(
        z[sel][changed], z_ref[sel][changed], z_hi[sel][changed], dtype, "z (steered heads)", k
    )


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(impl, dtype, case, gen):
    shape, slot_kind, cap_kind = case
    inputs = make_inputs(*shape, dtype, slot_kind, cap_kind, gen)
    run_and_check(impl, *inputs, dtype)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_modes_closed_form(impl, dtype, gen):
    """add / patch / ablate / scale give the values the spec promises."""
    T, H, D = 4, 4, 24
    z = randn_nonzero(T, H, D, dtype=dtype, gen=gen)
    v = randn_nonzero(1, H, D, dtype=dtype, gen=gen)
    a = torch.tensor([[1.0, 0.0, 0.0, 3.0]])
    b = torch.tensor([[0.5, 1.0, 0.0, 0.0]])
    slot = torch.tensor([0, -1, 0, 0], dtype=torch.int32)
    cap = torch.full((T,), -1, dtype=torch.int32)
    z_in = z.clone()
    ops.head_affine_capture(z, slot, a, b, v, cap, poisoned((1, H, D), dtype), impl=impl)
    on = slot >= 0
    add = (z_in[on, 0].float() + 0.5 * v[0, 0].float()).to(dtype)
    assert_close(z[on, 0], add, dtype, "add")
    assert_equal(z[on, 1], v[0, 1].expand_as(z[on, 1]).contiguous(), "patch")
    assert bool((z[on, 2] == 0).all()), "ablate must write zeros"
    assert_close(z[on, 3], (3.0 * z_in[on, 3].float()).to(dtype), dtype, "scale")
    assert_equal(z[~on], z_in[~on], "slot -1 token")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_capture_without_intervention_and_empty_batch(impl, gen):
    """Capture works when no token intervenes; a zero-token batch is a no-op."""
    T, H, D, C = 5, 3, 7, 8
    z = randn_nonzero(T, H, D, gen=gen)
    slot = torch.full((T,), -1, dtype=torch.int32)
    cap = torch.tensor([7, -1, 0, -1, 3], dtype=torch.int32)
    a, b = torch.ones(2, H), torch.zeros(2, H)
    v = randn_nonzero(2, H, D, gen=gen)
    buf = poisoned((C, H, D), torch.float32)
    z_in = z.clone()
    ops.head_affine_capture(z, slot, a, b, v, cap, buf, impl=impl)
    assert_equal(z, z_in, "z")
    for t, row in ((0, 7), (2, 0), (4, 3)):
        assert_equal(buf[row], z_in[t], f"row {row}")
    assert bool(buf[[1, 2, 4, 5, 6]].isnan().all())

    empty = torch.empty(0, H, D)
    none = torch.empty(0, dtype=torch.int32)
    ops.head_affine_capture(empty, none, a, b, v, none, buf, impl=impl)


# ------------------------------------------------------------------------------ GPU
@gpu_test
@pytest.mark.parametrize("impl", kernel_impls("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(300, 32, 128), (97, 13, 80), (1, 64, 256)])
def test_cuda_matches_reference(impl, dtype, shape):
    gen = torch.Generator().manual_seed(7)
    for slot_kind, cap_kind in (("random", "random"), ("sorted", "all"), ("none", "last")):
        inputs = make_inputs(*shape, dtype, slot_kind, cap_kind, gen, device="cuda")
        run_and_check(impl, *inputs, dtype)


@gpu_test
@pytest.mark.parametrize("impl", kernel_impls("cuda"))
def test_cuda_offsets_past_int32(impl):
    """T*H*D > 2**31 elements: the last token's offsets need 64-bit arithmetic."""
    H, D = 32, 128
    T = 2**31 // (H * D) + 3
    try:
        z = torch.ones(T, H, D, dtype=torch.float16, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a > 2**31-element tensor")
    z[-1].fill_(2.0)
    slot = torch.full((T,), -1, dtype=torch.int32, device="cuda")
    slot[-1] = 0
    cap = torch.full((T,), -1, dtype=torch.int32, device="cuda")
    cap[-1] = 0
    a = torch.full((1, H), 3.0, device="cuda")
    b = torch.zeros(1, H, device="cuda")
    v = torch.zeros(1, H, D, dtype=torch.float16, device="cuda")
    buf = torch.zeros(1, H, D, dtype=torch.float16, device="cuda")
    ops.head_affine_capture(z, slot, a, b, v, cap, buf, impl=impl)
    assert bool((buf == 2.0).all()), "capture of the last token read the wrong row"
    assert bool((z[-1] == 6.0).all()), "last token not steered"
    assert bool((z[0] == 1.0).all()) and bool((z[-2] == 1.0).all()), "other rows touched"
