"""residual_steer: every fused implementation against the torch reference, and the
geometry the terms promise.

Exact where the contract is exact (tokens without a slot or whose slot has no term,
everything while the flag is 0), bit for bit against the reference for the
implementations that promise it (tests/ops/op_cases) on tokens whose terms are all
absolute adds, within twice the same-dtype torch error of a float64 computation
elsewhere (the norm and the dot products are sums in another order). The statistics
read ``h = x + r`` (x a random non-zero other addend, never written), the update goes
to r. Shapes: a normal
one, an odd one (97 tokens, hidden 97), a wide one and one below one CPU vector; 5 pool
rows, 7 slots of 3 terms, term tables with -1 entries and rows shared by several slots.
Then closed forms: a clamp sets the component of ``h = x + r`` (after the op) along a
unit row to its target, project_out removes it (over an orthonormal basis, the whole
span), a relative add is ``coef * ||x + r|| * u``, -1 terms are skipped, absolute adds
never read x (NaN there changes nothing), and more terms than one pass of the CPU kernel
accumulates.
"""

from __future__ import annotations

import pytest
import torch

import emosteer.ops as ops
from emosteer.ops import reference
from emosteer.ops.reference import RES_ADD, RES_CLAMP, RES_PROJECT_OUT, RES_RELATIVE
from tests.ops.op_cases import ROW_PATTERNS, check_result, clone_all, flag, row_pattern
from tests.utils import (
    DTYPES,
    assert_equal,
    dtype_id,
    gpu_test,
    kernel_impls,
    randn_nonzero,
    slot_pattern,
)

CPU_IMPLS = kernel_impls("cpu")
NORMAL, ODD = (16, 64), (97, 97)  # (T, d)
WIDE = (3, 4100)  # hidden > 4096: several column chunks
TAIL = (4, 5)  # below one CPU vector step
P, S, K = 5, 7, 3
MODE_KINDS = ("add", "mixed")  # every term an absolute add / every mode
CASES = [
    (NORMAL, "none", "random", "mixed"),
    (NORMAL, "one", "shared", "add"),
    (NORMAL, "random", "random", "add"),
    (NORMAL, "random", "random", "mixed"),
    (NORMAL, "random", "none", "mixed"),
    (NORMAL, "sorted", "random", "mixed"),
    (NORMAL, "own", "shared", "mixed"),
    (ODD, "random", "random", "mixed"),
    (ODD, "sorted", "shared", "add"),
    (WIDE, "random", "random", "mixed"),
    (TAIL, "random", "random", "mixed"),
]
assert {c[2] for c in CASES} == set(ROW_PATTERNS)
ALL_MODES = [RES_ADD, RES_CLAMP, RES_PROJECT_OUT, RES_ADD | RES_RELATIVE,
             RES_CLAMP | RES_RELATIVE]


def case_id(case) -> str:
    (T, d), slot_kind, row_kind, mode_kind = case
    return f"T{T}_d{d}-slot_{slot_kind}-urow_{row_kind}-{mode_kind}"


def unit_rows(n, d, dtype, gen) -> torch.Tensor:
    """n random rows of unit length (normalised in float32, then rounded to dtype)."""
    u = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    return u.to(dtype)


def make_inputs(T, d, dtype, slot_kind, row_kind, mode_kind, gen, device="cpu"):
    """Residuals of norm ~sqrt(d), unit pool rows, coefficients of a few units (a
    relative coefficient is a fraction of the norm). ``mixed``: slot 0 all absolute adds
    (still bit-exact), the others random modes."""
    n_slots = max(T, S) if slot_kind == "own" else S
    if mode_kind == "add":
        mode = torch.zeros(n_slots, K, dtype=torch.int32)
    else:
        pick = torch.randint(0, len(ALL_MODES), (n_slots, K), generator=gen)
        mode = torch.tensor(ALL_MODES, dtype=torch.int32)[pick]
        mode[0] = RES_ADD
    coef = randn_nonzero(n_slots, K, gen=gen) * 3
    coef = torch.where((mode & RES_RELATIVE) != 0, coef / 10, coef)
    args = dict(
        r=randn_nonzero(T, d, dtype=dtype, gen=gen),
        x=randn_nonzero(T, d, dtype=dtype, gen=gen),
        token_slot=slot_pattern(slot_kind, T, n_slots, gen),
        coef=coef,
        mode=mode,
        urow=row_pattern(row_kind, (n_slots, K), P, gen),
        pool=unit_rows(P, d, dtype, gen),
        flag=flag(True),
    )
    return {k: v.to(device) for k, v in args.items()}


def steer64(args) -> torch.Tensor:
    """The op's math in float64 on the stored inputs: the precise result (all tokens)."""
    r, slot, urow = args["r"].cpu().double(), args["token_slot"].cpu(), args["urow"].cpu()
    hs = r + args["x"].cpu().double()  # exact: two stored values summed in float64
    coef, mode, pool = args["coef"].cpu().double(), args["mode"].cpu(), args["pool"].cpu().double()
    out = r.clone()
    for t in range(r.shape[0]):
        s = int(slot[t])
        if s < 0:
            continue
        h = hs[t]
        n = h.norm()
        for k in range(urow.shape[1]):
            row = int(urow[s, k])
            if row < 0:
                continue
            u = pool[row]
            c = h @ u
            m = int(mode[s, k])
            target = coef[s, k] * n if m & RES_RELATIVE else coef[s, k]
            w = target if m & 3 == RES_ADD else (target - c if m & 3 == RES_CLAMP else -c)
            out[t] = out[t] + w * u
    return out


def token_kinds(args):
    """(untouched tokens, steered tokens whose terms are all absolute adds, other steered
    tokens) as boolean [T] masks."""
    slot, urow, mode = args["token_slot"].cpu(), args["urow"].cpu(), args["mode"].cpu()
    rows = torch.where((slot >= 0)[:, None], urow[slot.clamp(min=0).long()], -1)
    modes = mode[slot.clamp(min=0).long()]
    on = rows >= 0
    untouched = ~on.any(1)
    plain = ~untouched & ~(on & (modes != RES_ADD)).any(1)
    return untouched, plain, ~untouched & ~plain


def check_residual_steer(impl, args, dtype):
    ref = clone_all(args)
    reference.residual_steer(**ref)
    precise = steer64(args)
    r_in, x_in = args["r"].clone(), args["x"].clone()
    ops.residual_steer(**args, impl=impl)
    r = args["r"]
    assert_equal(args["x"], x_in, "x (read only)")
    untouched, plain, other = (m.to(r.device) for m in token_kinds(args))
    assert_equal(r[untouched], r_in[untouched], "r (tokens without a slot or a term)")
    check_result(impl, r[plain], ref["r"][plain], precise[plain.cpu()], dtype,
                 "r (tokens of absolute adds)")
    check_result(impl, r[other], ref["r"][other], precise[other.cpu()], dtype,
                 "r (tokens with clamp / project_out / relative terms)", exact=False)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_residual_steer_matches_reference(impl, dtype, case, gen):
    (T, d), slot_kind, row_kind, mode_kind = case
    check_residual_steer(impl, make_inputs(T, d, dtype, slot_kind, row_kind, mode_kind, gen),
                         dtype)


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_flag_off_touches_nothing(impl, dtype, gen):
    args = make_inputs(*NORMAL, dtype, "one", "shared", "mixed", gen)
    args["flag"] = flag(False)
    before = clone_all(args)
    ops.residual_steer(**args, impl=impl)
    for name in args:
        assert_equal(args[name], before[name], f"{name} with flag 0")
    args["flag"] = torch.tensor([-3], dtype=torch.int32)  # any non-zero value is on
    ops.residual_steer(**args, impl=impl)
    assert not bool((args["r"] == before["r"]).all()), "flag -3 must switch the op on"


# ------------------------------------------------------------------ closed forms
def signed_hadamard(n_rows, d, gen) -> torch.Tensor:
    """n_rows orthonormal rows of ±1/sqrt(d) (d a power of 4: exact in every dtype):
    Sylvester Hadamard rows, columns with random signs."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0)
    rows = torch.randperm(d, generator=gen)[:n_rows]
    return h[rows] * signs / d**0.5


def rounding_bound(r_out, u, dtype) -> torch.Tensor:
    """Per token, a bound on |(r_out - exact) . u| from rounding r_out once to dtype
    (half an ulp per element, relative) plus float32 noise."""
    eps = torch.finfo(dtype).eps
    x = r_out.double()
    return (eps / 2 * x.abs() @ u.double().abs().T).amax(1) + 1e-5 * x.norm(dim=1)


def perp_bound(r_out, basis, dtype) -> torch.Tensor:
    """Elementwise bound on the part of r_out's rounding error (half an ulp per element)
    outside the span of the orthonormal rows ``basis``: the error itself plus what the
    projection moves into each element, plus float32 noise."""
    eps = torch.finfo(dtype).eps
    x, b = r_out.double().abs(), basis.double().abs()
    return eps * (x + (x @ b.T) @ b) + 1e-5 * (1 + r_out.double().norm(dim=-1, keepdim=True))


def run(impl, r, x, slot, coef, mode, urow, pool):
    ops.residual_steer(r, x, slot, torch.as_tensor(coef, dtype=torch.float32),
                       torch.as_tensor(mode, dtype=torch.int32),
                       torch.as_tensor(urow, dtype=torch.int32), pool, flag(), impl=impl)


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_clamp_sets_the_component(impl, dtype, gen):
    """Slot 0 clamps the component of h = x + r along u to 1.5, slot 1 to 0.4*||h||
    (relative); token 3 has no slot."""
    d = 64
    u = signed_hadamard(1, d, gen)
    pool = u.to(dtype)
    r = (randn_nonzero(4, d, gen=gen) * 2).to(dtype)
    xa = (randn_nonzero(4, d, gen=gen) * 2).to(dtype)
    x = r.double()
    h = x + xa.double()
    slot = torch.tensor([0, 1, 0, -1], dtype=torch.int32)
    r_in = r.clone()
    run(impl, r, xa, slot, [[1.5], [0.4]], [[RES_CLAMP], [RES_CLAMP | RES_RELATIVE]], [[0], [0]],
        pool)
    comp = ((xa.double() + r.double()) @ u.double().T)[:, 0]
    want = torch.tensor([1.5, 0.4 * float(h[1].norm()), 1.5], dtype=torch.float64)
    bound = rounding_bound(r, u, dtype)[:3]
    assert bool(((comp[:3] - want).abs() <= bound).all()), (comp[:3], want, bound)
    # Only the component along u moved.
    delta = r[:3].double() - x[:3]
    rest = delta - (delta @ u.double().T) * u.double()
    assert bool((rest.abs() <= perp_bound(r[:3], u, dtype)).all())
    assert_equal(r[3], r_in[3], "token without a slot")


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_project_out_removes_a_span(impl, dtype, gen):
    """Slot 0 projects out 3 orthonormal rows (with a -1 term between them), slot 1 only
    the first: the components of h = x + r along the removed rows are ~0, the rest is
    unchanged."""
    d = 64
    basis = signed_hadamard(3, d, gen)
    pool = basis.to(dtype)
    r = (randn_nonzero(5, d, gen=gen) * 2).to(dtype)
    xa = (randn_nonzero(5, d, gen=gen) * 2).to(dtype)
    x = r.double()
    h = x + xa.double()
    slot = torch.tensor([0, 1, -1, 0, 1], dtype=torch.int32)
    po = RES_PROJECT_OUT
    run(impl, r, xa, slot, [[0.0, 9.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        [[po, RES_ADD, po, po], [po, po, po, po]], [[0, -1, 1, 2], [0, -1, -1, -1]], pool)
    comp = (xa.double() + r.double()) @ basis.double().T  # [T, 3]
    bound = rounding_bound(r, basis, dtype)
    steered = [0, 1, 3, 4]
    removed = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0]]).bool()
    for t in steered:
        assert bool((comp[t][removed[t]].abs() <= bound[t]).all()), (t, comp[t], bound[t])
    # The part of h outside the removed rows is untouched (up to the one rounding).
    for t in steered:
        b = basis.double()[removed[t]]
        keep = h[t] - (h[t] @ b.T) @ b
        h_out = xa[t].double() + r[t].double()
        got = h_out - (h_out @ b.T) @ b
        assert bool(((got - keep).abs() <= perp_bound(r[t], b, dtype)).all()), t
    assert_equal(r[2], x[2].to(dtype), "token without a slot")


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_relative_add_scales_with_the_norm(impl, dtype, gen):
    """A relative add is coef * ||x + r|| * u; an absolute one coef * u; both in one
    slot."""
    d = 37
    pool = unit_rows(2, d, dtype, gen)
    r = (randn_nonzero(3, d, gen=gen) * 3).to(dtype)
    xa = (randn_nonzero(3, d, gen=gen) * 3).to(dtype)
    x = r.double()
    slot = torch.tensor([0, 1, 0], dtype=torch.int32)
    run(impl, r, xa, slot, [[0.25, 0.0], [0.1, -2.0]],
        [[RES_ADD | RES_RELATIVE, RES_ADD], [RES_ADD | RES_RELATIVE, RES_ADD]],
        [[1, -1], [0, 1]], pool)
    u = pool.double()
    n = (x + xa.double()).norm(dim=1)
    want = x.clone()
    want[0] += 0.25 * n[0] * u[1]
    want[2] += 0.25 * n[2] * u[1]
    want[1] += 0.1 * n[1] * u[0] - 2.0 * u[1]
    eps = torch.finfo(dtype).eps
    err = (r.double() - want).abs()
    assert bool((err <= eps * want.abs() + 1e-5 * (1 + x.abs() + n[:, None])).all()), err.max()


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_many_terms_and_their_order(impl, gen):
    """K = 11 terms (more than the CPU kernel's 8 dot products per pass), every mode,
    some -1; float32 against the float64 math."""
    T, d, k = 6, 40 if impl == "triton" else 300, 11
    pool = unit_rows(12, d, torch.float32, gen)
    pick = torch.randint(0, len(ALL_MODES), (2, k), generator=gen)
    mode = torch.tensor(ALL_MODES, dtype=torch.int32)[pick]
    urow = torch.randint(-1, 12, (2, k), generator=gen, dtype=torch.int32)
    urow[0, 3] = -1
    args = dict(r=randn_nonzero(T, d, gen=gen), x=randn_nonzero(T, d, gen=gen),
                token_slot=torch.tensor([0, 1, -1, 1, 0, 0], dtype=torch.int32),
                coef=randn_nonzero(2, k, gen=gen) / 4, mode=mode, urow=urow, pool=pool,
                flag=flag())
    check_residual_steer(impl, args, torch.float32)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_closed_form_add_and_empty_inputs(impl, gen):
    """Absolute adds: slots 0 and 2 share pool row 1; slot 1 has no term; bit-exact, and
    x is never read (NaN there changes nothing)."""
    r = randn_nonzero(4, 10, gen=gen)
    xa = torch.full_like(r, float("nan"))
    pool = randn_nonzero(2, 10, gen=gen)
    slot = torch.tensor([2, -1, 0, 1], dtype=torch.int32)
    want = r.clone()
    want[0] = (want[0] + -2.0 * pool[1]) + 0.5 * pool[0]
    want[2] += 0.5 * pool[1]
    run(impl, r, xa, slot, [[0.5, 0.0], [3.0, 1.0], [-2.0, 0.5]], [[0, 0], [0, 0], [0, 0]],
        [[1, -1], [-1, -1], [1, 0]], pool)
    assert_equal(r, want, "r")
    d = 6
    run(impl, torch.empty(0, d), torch.empty(0, d), torch.empty(0, dtype=torch.int32),
        torch.ones(2, 1), torch.zeros(2, 1), torch.full((2, 1), -1), torch.empty(0, d))
    r = randn_nonzero(3, d, gen=gen)
    r_in = r.clone()
    xa = randn_nonzero(3, d, gen=gen)
    run(impl, r, xa, torch.tensor([0, 1, -1], dtype=torch.int32), torch.ones(2, 2),
        torch.ones(2, 2), torch.full((2, 2), -1), torch.empty(0, d))
    assert_equal(r, r_in, "r with an empty pool")
    run(impl, r, xa, torch.tensor([0, 1, -1], dtype=torch.int32), torch.ones(2, 0),
        torch.ones(2, 0), torch.ones(2, 0), randn_nonzero(3, d, gen=gen))
    assert_equal(r, r_in, "r with no terms (K = 0)")


# ------------------------------------------------------------------------------ GPU
@gpu_test
@pytest.mark.parametrize("impl", kernel_impls("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(256, 4096), (97, 97), (3, 8192 + 5)])
def test_cuda_matches_reference(impl, dtype, shape):
    gen = torch.Generator().manual_seed(3)
    T, d = shape
    for slot_kind, row_kind, mode_kind in (("random", "random", "mixed"),
                                           ("sorted", "shared", "add"),
                                           ("none", "none", "mixed")):
        check_residual_steer(impl, make_inputs(T, d, dtype, slot_kind, row_kind, mode_kind, gen,
                                               "cuda"), dtype)
        off = make_inputs(T, d, dtype, slot_kind, row_kind, mode_kind, gen, "cuda")
        off["flag"].zero_()
        before = off["r"].clone()
        ops.residual_steer(**off, impl=impl)
        assert_equal(off["r"], before, "r with flag 0")
