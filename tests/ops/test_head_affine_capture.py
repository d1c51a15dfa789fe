"""head_affine_capture: every fused implementation against the torch reference.

Exact where the contract is exact (untouched tokens, heads with a=1/b=0/c=0, captured rows,
rows that are not captured stay poisoned, everything while the flag is 0), and bit for
bit against the reference for the implementations that promise it (tests/ops/op_cases),
within twice the same-dtype torch error elsewhere. Shapes: a normal one, an odd one
(97 tokens, 13 heads, head_dim 80, 5 pool rows, 7 slots), a wide one and one with a
head_dim below one CPU vector. Pool-row tables with -1 entries and rows shared by
several slots; per-token row offsets (``row_off``: zero, random, and the runs 0, 1, 2,
... of a position-aligned patch).
"""

from __future__ import annotations

import pytest
import torch

import emosteer.ops as ops
from emosteer.ops import reference
from tests.ops.op_cases import (
    MAX_OFF,
    OFF_PATTERNS,
    ROW_PATTERNS,
    check_result,
    clone_all,
    flag,
    off_pattern,
    row_pattern,
)
from tests.utils import (
    DTYPES,
    assert_close,
    assert_equal,
    capture_pattern,
    dtype_id,
    gpu_test,
    kernel_impls,
    poisoned,
    randn_nonzero,
    slot_pattern,
)

CPU_IMPLS = kernel_impls("cpu")
NORMAL, ODD = (16, 8, 64), (97, 13, 80)  # (T, H, D)
WIDE = (3, 40, 128)  # H*D > 4096: several head blocks per token
TAIL = (5, 3, 7)  # head_dim below one CPU vector step: only partial vectors
P, S = 5, 7  # pool rows the tables name (the pool holds MAX_OFF more), slots
# (shape, slot pattern, capture pattern, vrow pattern, row_off pattern): every pattern
# of each kind on the normal shape; the others (interpreter time grows with programs)
# with mixed ones.
CASES = [
    (NORMAL, "none", "none", "random", "random"),
    (NORMAL, "none", "random", "random", "zero"),
    (NORMAL, "one", "last", "shared", "aligned"),
    (NORMAL, "random", "random", "random", "zero"),
    (NORMAL, "random", "random", "random", "random"),
    (NORMAL, "random", "all", "none", "random"),
    (NORMAL, "sorted", "all", "random", "aligned"),
    (NORMAL, "own", "none", "shared", "random"),
    (ODD, "random", "random", "random", "aligned"),
    (ODD, "sorted", "all", "shared", "random"),
    (WIDE, "random", "random", "random", "random"),
    (TAIL, "random", "all", "random", "aligned"),
]
assert {c[3] for c in CASES} == set(ROW_PATTERNS)
assert {c[4] for c in CASES} == set(OFF_PATTERNS)


def case_id(case) -> str:
    (T, H, D), slot_kind, cap_kind, vrow_kind, off_kind = case
    return f"T{T}_H{H}_D{D}-slot_{slot_kind}-cap_{cap_kind}-vrow_{vrow_kind}-off_{off_kind}"


def make_inputs(T, H, D, dtype, slot_kind, cap_kind, vrow_kind, gen, device="cpu", off_kind="zero"):
    n_slots = max(T, S) if slot_kind == "own" else S
    C = T + 3
    z = randn_nonzero(T, H, D, dtype=dtype, gen=gen)
    pool = randn_nonzero(P + MAX_OFF, H, D, dtype=dtype, gen=gen)
    a = randn_nonzero(n_slots, H, gen=gen)
    b = randn_nonzero(n_slots, H, gen=gen)
    # Head 0 is a=1, b=0 for every slot: must stay bit-identical, even NaN and -0.0.
    a[:, 0], b[:, 0] = 1.0, 0.0
    z[:, 0, 0] = float("nan")
    if D > 1:
        z[:, 0, 1] = -0.0
    # The other modes: patch (a=0, b=1), ablate (a=0, b=0), scale (a=2, b=0); every
    # third head from 4 on is a relative add (c = scale/|v|; here also with a and b set).
    c = torch.zeros(n_slots, H)
    if H >= 4:
        a[:, 1], b[:, 1] = 0.0, 1.0
        a[:, 2], b[:, 2] = 0.0, 0.0
        a[:, 3], b[:, 3] = 2.0, 0.0
        rel = torch.arange(H) % 3 == 1
        rel[:4] = False
        c[:, rel] = randn_nonzero(n_slots, int(rel.sum()), gen=gen)
        b[:, 4:5] = 0.0  # head 4: a pure relative add (a = 1, b = 0)
        a[:, 4:5] = 1.0
    args = dict(
        z=z,
        token_slot=slot_pattern(slot_kind, T, n_slots, gen),
        a=a,
        b=b,
        c=c,
        vrow=row_pattern(vrow_kind, (n_slots, H), P, gen),
        row_off=off_pattern(off_kind, T, gen),
        pool=pool,
        cap_index=capture_pattern(cap_kind, T, C, gen),
        cap_buf=poisoned((C, H, D), dtype),
        flag=flag(True),
    )
    return {k: v.to(device) for k, v in args.items()}


def run_and_check(impl, args, dtype):
    z, slot, a, b, c, cap, cap_buf = (args[k] for k in ("z", "token_slot", "a", "b", "c",
                                                         "cap_index", "cap_buf"))
    ref = clone_all(args)
    reference.head_affine_capture(**ref)
    hi = clone_all(args)
    for k in ("z", "pool", "cap_buf"):
        hi[k] = hi[k].double()
    reference.head_affine_capture(**hi)
    z_in = z.clone()

    ops.head_affine_capture(**args, impl=impl)

    # Captures: exact copies of the pre-intervention rows, other rows still NaN.
    assert_equal(cap_buf, ref["cap_buf"], "cap_buf")
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
    keep = (a[s] == 1) & (b[s] == 0) & (c[s] == 0)  # [n, H]
    assert_equal(z[sel][keep], z_in[sel][keep], "z (a=1, b=0, c=0 heads)")
    # Everything else: bit for bit, or within twice the same-dtype error of a precise one;
    # relative adds (c != 0) always within the bound: the norm's sum order is the kernel's.
    changed = ~keep & (c[s] == 0)
    check_result(impl, z[sel][changed], ref["z"][sel][changed], hi["z"][sel][changed], dtype,
                 "z (steered heads)")
    rel = c[s] != 0
    check_result(impl, z[sel][rel], ref["z"][sel][rel], precise64(args, z_in)[sel][rel], dtype,
                 "z (relative adds)", exact=False)


def precise64(args, z_in) -> torch.Tensor:
    """The op's result in float64 throughout (the reference computes in float32):
    ``a*z + (b + c*|z|)*v`` for every token with a slot, z elsewhere."""
    slot, pool, off = args["token_slot"], args["pool"].double(), args["row_off"]
    out = z_in.double().clone()
    for t in (slot >= 0).nonzero().flatten().tolist():
        s = int(slot[t])
        for h in range(out.shape[1]):
            zz = z_in[t, h].double()
            r = int(args["vrow"][s, h])
            v = pool[r + int(off[t]), h] if r >= 0 else torch.zeros_like(zz)
            w = float(args["b"][s, h]) + (float(args["c"][s, h]) * float(zz.norm()) if args["c"][s, h] != 0 else 0.0)
            out[t, h] = float(args["a"][s, h]) * zz + w * v
    return out


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(impl, dtype, case, gen):
    shape, slot_kind, cap_kind, vrow_kind, off_kind = case
    run_and_check(impl, make_inputs(*shape, dtype, slot_kind, cap_kind, vrow_kind, gen,
                                    off_kind=off_kind), dtype)


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_flag_off_touches_nothing(impl, dtype, gen):
    """flag 0: z and cap_buf bit-identical to the input although slots and captures are set;
    any non-zero flag is on."""
    args = make_inputs(*NORMAL, dtype, "random", "all", "random", gen, off_kind="random")
    args["flag"] = flag(False)
    before = clone_all(args)
    ops.head_affine_capture(**args, impl=impl)
    assert_equal(args["z"], before["z"], "z with flag 0")
    assert_equal(args["cap_buf"], before["cap_buf"], "cap_buf with flag 0")

    args["flag"] = torch.tensor([7], dtype=torch.int32)
    ref = clone_all(args)
    reference.head_affine_capture(**ref)
    ops.head_affine_capture(**args, impl=impl)
    assert_equal(args["cap_buf"], ref["cap_buf"], "cap_buf with flag 7")
    assert_close(args["z"], ref["z"], dtype, "z with flag 7")
    assert not bool((args["z"].view(torch.int8) == before["z"].view(torch.int8)).all()), (
        "flag 7 must switch the op on"
    )


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_modes_closed_form(impl, dtype, gen):
    """add / patch / ablate / scale give the values the spec promises; a head without a
    pool row patches in zeros; two slots sharing a pool row read the same vector."""
    T, H, D = 5, 5, 24
    z = randn_nonzero(T, H, D, dtype=dtype, gen=gen)
    pool = randn_nonzero(3, H, D, dtype=dtype, gen=gen)
    a = torch.tensor([[1.0, 0.0, 0.0, 3.0, 0.0], [1.0, 0.0, 1.0, 1.0, 1.0]])
    b = torch.tensor([[0.5, 1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    c = torch.zeros_like(b)
    vrow = torch.tensor([[2, 2, 0, -1, -1], [0, 2, 1, 1, -1]], dtype=torch.int32)
    slot = torch.tensor([0, -1, 0, 1, 0], dtype=torch.int32)
    cap = torch.full((T,), -1, dtype=torch.int32)
    z_in = z.clone()
    off = torch.zeros(T, dtype=torch.int32)
    ops.head_affine_capture(z, slot, a, b, c, vrow, off, pool, cap, poisoned((1, H, D), dtype),
                            flag(), impl=impl)
    on = slot == 0
    add = (z_in[on, 0].float() + 0.5 * pool[2, 0].float()).to(dtype)
    assert_close(z[on, 0], add, dtype, "add")
    assert_equal(z[on, 1], pool[2, 1].expand_as(z[on, 1]).contiguous(), "patch (slot 0)")
    assert_equal(z[3, 1], pool[2, 1], "patch (slot 1, same pool row)")
    assert bool((z[on, 2] == 0).all()), "ablate must write zeros"
    assert_close(z[on, 3], (3.0 * z_in[on, 3].float()).to(dtype), dtype, "scale")
    zeros = torch.zeros_like(z[on, 4])
    assert_equal(z[on, 4], zeros, "patch from no pool row: +0.0")
    assert_equal(z[3, [0, 2, 3, 4]], z_in[3, [0, 2, 3, 4]], "slot 1: identity heads")
    assert_equal(z[1], z_in[1], "slot -1 token")


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_relative_add_is_a_fraction_of_the_head_norm(impl, dtype, gen):
    """A relative add (a = 1, b = 0, c = scale / |v|) adds ``scale * |z[t,h]| * v / |v|``
    per token and head, each token its own norm (computed in float64 here, from the
    input); c = 0 beside it is the absolute add, bit for bit as without c; a relative
    add of a zero-norm head (z = 0) adds nothing; an infinite norm on an absolute head
    does not reach its result (the norm is read only where c != 0)."""
    T, H, D = 6, 4, 37
    z = randn_nonzero(T, H, D, dtype=dtype, gen=gen) * 3
    z[2, 0] = 0
    z[3, 1, 5] = float("inf")  # head 1 is absolute: finite v, finite b
    pool = randn_nonzero(2, H, D, dtype=dtype, gen=gen)
    scale = torch.tensor([0.25, 0.0, -0.5, 0.1])
    vnorm = pool[1].double().norm(dim=-1)
    a = torch.ones(1, H)
    b = torch.tensor([[0.0, 0.75, 0.0, 0.0]])
    c = (scale.double() / vnorm).float().unsqueeze(0)
    c[0, 1] = 0.0
    vrow = torch.ones(1, H, dtype=torch.int32)
    slot = torch.zeros(T, dtype=torch.int32)
    z_in = z.clone()
    ops.head_affine_capture(z, slot, a, b, c, vrow, torch.zeros(T, dtype=torch.int32), pool,
                            torch.full((T,), -1, dtype=torch.int32), poisoned((1, H, D), dtype),
                            flag(), impl=impl)
    for h in (0, 2, 3):
        n = z_in[:, h].double().norm(dim=-1, keepdim=True)
        want = z_in[:, h].double() + float(scale[h]) * n * pool[1, h].double() / vnorm[h]
        assert_close(z[:, h], want.to(dtype), dtype, f"relative add, head {h}")
    assert_equal(z[2, 0], z_in[2, 0], "a zero head gains nothing")
    absolute = z_in.clone()
    ops.head_affine_capture(absolute, slot, a, b, torch.zeros_like(c), vrow,
                            torch.zeros(T, dtype=torch.int32), pool,
                            torch.full((T,), -1, dtype=torch.int32), poisoned((1, H, D), dtype),
                            flag(), impl=impl)
    assert_equal(z[:, 1], absolute[:, 1], "absolute head beside relative ones")
    assert bool(z[3, 1, :5].isfinite().all()), "an infinite norm leaked into an absolute head"


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_capture_only_on_residual(impl, dtype, gen):
    """The plugin's residual capture: z = residual.view(T, 1, d), every slot -1, an
    empty pool. The residual stays bit-identical; captured rows are its rows."""
    T, d, C = 9, 97, 4
    r = randn_nonzero(T, d, dtype=dtype, gen=gen)
    r_in = r.clone()
    slot = torch.full((T,), -1, dtype=torch.int32)
    cap = torch.full((T,), -1, dtype=torch.int32)
    cap[[0, 4, 8]] = torch.tensor([3, 0, 1], dtype=torch.int32)
    buf = poisoned((C, 1, d), dtype)
    ops.head_affine_capture(
        r.view(T, 1, d), slot, torch.ones(1, 1), torch.zeros(1, 1), torch.zeros(1, 1),
        torch.full((1, 1), -1, dtype=torch.int32), torch.zeros(T, dtype=torch.int32),
        torch.empty(0, 1, d, dtype=dtype), cap, buf, flag(), impl=impl,
    )
    assert_equal(r, r_in, "residual")
    for t, row in ((0, 3), (4, 0), (8, 1)):
        assert_equal(buf[row, 0], r_in[t], f"capture row {row}")
    assert bool(buf[2].isnan().all())


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_capture_without_intervention_and_empty_batch(impl, gen):
    """Capture works when no token intervenes; a zero-token batch is a no-op."""
    T, H, D, C = 5, 3, 7, 8
    z = randn_nonzero(T, H, D, gen=gen)
    slot = torch.full((T,), -1, dtype=torch.int32)
    cap = torch.tensor([7, -1, 0, -1, 3], dtype=torch.int32)
    a, b, c = torch.ones(2, H), torch.zeros(2, H), torch.zeros(2, H)
    vrow = torch.zeros(2, H, dtype=torch.int32)
    pool = randn_nonzero(1, H, D, gen=gen)
    buf = poisoned((C, H, D), torch.float32)
    z_in = z.clone()
    ops.head_affine_capture(z, slot, a, b, c, vrow, torch.zeros(T, dtype=torch.int32), pool, cap,
                            buf, flag(), impl=impl)
    assert_equal(z, z_in, "z")
    for t, row in ((0, 7), (2, 0), (4, 3)):
        assert_equal(buf[row], z_in[t], f"row {row}")
    assert bool(buf[[1, 2, 4, 5, 6]].isnan().all())

    empty = torch.empty(0, H, D)
    none = torch.empty(0, dtype=torch.int32)
    ops.head_affine_capture(empty, none, a, b, c, vrow, none, pool, none, buf, flag(), impl=impl)


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_row_offsets_read_a_run_of_rows(impl, dtype, gen):
    """A position-aligned patch in one slot: slot 0 names pool row 2 for heads 0 and 2
    (the first row of a run of 4), its tokens carry row_off 0..3 and read rows 2..5,
    patch bit for bit; head 1 has no row (v = 0 whatever the offset); a token of another
    slot with offset 0 reads that slot's own row; a token without a slot ignores its
    offset."""
    T, H, D = 7, 3, 10
    z = randn_nonzero(T, H, D, dtype=dtype, gen=gen)
    pool = randn_nonzero(6, H, D, dtype=dtype, gen=gen)
    a = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    c = torch.zeros_like(b)
    vrow = torch.tensor([[2, -1, 2], [0, -1, -1]], dtype=torch.int32)
    slot = torch.tensor([-1, 0, 0, 0, 0, 1, -1], dtype=torch.int32)
    off = torch.tensor([5, 0, 1, 2, 3, 0, 9], dtype=torch.int32)
    z_in = z.clone()
    ops.head_affine_capture(z, slot, a, b, c, vrow, off, pool, torch.full((T,), -1, dtype=torch.int32),
                            poisoned((1, H, D), dtype), flag(), impl=impl)
    for k, t in enumerate((1, 2, 3, 4)):
        assert_equal(z[t, 0], pool[2 + k, 0], f"token {t} head 0: pool row {2 + k}")
        assert_equal(z[t, 2], pool[2 + k, 2], f"token {t} head 2: pool row {2 + k}")
        assert_equal(z[t, 1], torch.zeros_like(z[t, 1]), f"token {t} head 1: no row, v = 0")
    assert_equal(z[5, 0], pool[0, 0], "slot 1, offset 0: its own row")
    assert_equal(z[5, 1:], z_in[5, 1:], "slot 1: identity heads")
    assert_equal(z[[0, 6]], z_in[[0, 6]], "tokens without a slot ignore their offset")


def test_row_offset_past_the_pool_is_refused(gen):
    """vrow + row_off outside the pool (where the token has a slot and the head a row) is
    an IndexError naming row_off, from the validating wrapper; the C++ kernel refuses it
    too, before writing anything. An offset on a token without a slot or a head without
    a row is never read, so any value passes."""
    T, H, D = 4, 2, 8
    z = randn_nonzero(T, H, D, gen=gen)
    pool = randn_nonzero(3, H, D, gen=gen)
    a, b, c = torch.zeros(1, H), torch.ones(1, H), torch.zeros(1, H)
    vrow = torch.tensor([[1, -1]], dtype=torch.int32)
    slot = torch.tensor([0, 0, -1, 0], dtype=torch.int32)
    cap = torch.full((T,), -1, dtype=torch.int32)
    buf = poisoned((1, H, D), torch.float32)
    for bad in (2, -2):
        off = torch.tensor([0, bad, 0, 0], dtype=torch.int32)
        z_in = z.clone()
        with pytest.raises(IndexError, match="row_off"):
            ops.head_affine_capture(z, slot, a, b, c, vrow, off, pool, cap, buf, flag(), impl="torch")
        assert_equal(z, z_in, "z after a refused call")
        if "cpp" in CPU_IMPLS:
            from emosteer.ops._dispatch import backend_fn

            with pytest.raises(RuntimeError, match="row_off"):
                backend_fn("cpp", "head_affine_capture")(z, slot, a, b, c, vrow, off, pool, cap, buf,
                                                         flag())
            assert_equal(z, z_in, "z after a refused C++ call")
    ok = torch.tensor([0, 1, 100, 0], dtype=torch.int32)  # token 2 has no slot
    ops.head_affine_capture(z, slot, a, b, c, vrow, ok, pool, cap, buf, flag(), impl="torch")
    assert_equal(z[1, 0], pool[2, 0], "offset 1 from row 1")


# ------------------------------------------------------------------------------ GPU
@gpu_test
@pytest.mark.parametrize("impl", kernel_impls("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(300, 32, 128), (97, 13, 80), (1, 64, 256)])
def test_cuda_matches_reference(impl, dtype, shape):
    gen = torch.Generator().manual_seed(7)
    for slot_kind, cap_kind, vrow_kind, off_kind in (("random", "random", "random", "random"),
                                                     ("sorted", "all", "shared", "aligned"),
                                                     ("none", "last", "none", "zero")):
        args = make_inputs(*shape, dtype, slot_kind, cap_kind, vrow_kind, gen, device="cuda",
                           off_kind=off_kind)
        run_and_check(impl, args, dtype)
        off = make_inputs(*shape, dtype, slot_kind, cap_kind, vrow_kind, gen, device="cuda",
                          off_kind=off_kind)
        off["flag"].zero_()
        before = clone_all(off)
        ops.head_affine_capture(**off, impl=impl)
        assert_equal(off["z"], before["z"], "z with flag 0")
        assert_equal(off["cap_buf"], before["cap_buf"], "cap_buf with flag 0")


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
    c = torch.zeros(1, H, device="cuda")
    vrow = torch.zeros(1, H, dtype=torch.int32, device="cuda")
    pool = torch.zeros(1, H, D, dtype=torch.float16, device="cuda")
    buf = torch.zeros(1, H, D, dtype=torch.float16, device="cuda")
    row_off = torch.zeros(T, dtype=torch.int32, device="cuda")
    ops.head_affine_capture(z, slot, a, b, c, vrow, row_off, pool, cap, buf, flag(device="cuda"),
                            impl=impl)
    assert bool((buf == 2.0).all()), "capture of the last token read the wrong row"
    assert bool((z[-1] == 6.0).all()), "last token not steered"
    assert bool((z[0] == 1.0).all()) and bool((z[-2] == 1.0).all()), "other rows touched"
