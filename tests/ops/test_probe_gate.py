"""probe_gate: every fused implementation against the torch reference, and the gate's
contract on hand-made scores.

The gate decisions (``token_slot``, ``state``) must equal the reference's exactly; the
thresholds of the random cases are moved away from every score (by far more than the
rounding of a reordered float32 sum), so a decision never hangs on the summation order.
Captured scores are within the error bound of a reordered float32 dot product; score
rows nobody writes stay as they were (NaN), ``h`` is never written. Shapes: a normal
one, an odd one, a wide one (several column chunks) and one below one CPU vector; 5
probe rows, 7 slots, tokens of 4 requests in contiguous runs. Then closed forms with
exact scores (probe row e_0): never / always holding, below-threshold mode, the latch
within a step and across two calls, capture of closed tokens, flag 0.
"""

from __future__ import annotations

import pytest
import torch

import emosteer.ops as ops
from emosteer.ops import reference
from tests.ops.op_cases import (
    ROW_PATTERNS,
    clone_all,
    flag,
    gate_scores64,
    request_runs,
    row_pattern,
    separate,
)
from tests.utils import (
    DTYPES,
    assert_equal,
    capture_pattern,
    dtype_id,
    gpu_test,
    kernel_impls,
    poisoned,
    randn_nonzero,
)

CPU_IMPLS = kernel_impls("cpu")
NORMAL, ODD = (16, 64), (97, 97)  # (T, d)
WIDE = (3, 4100)  # d > 4096: several column chunks
TAIL = (4, 5)  # below one CPU vector step
P, S, R, C = 5, 7, 4, 8  # probe rows, slots, latch-state rows, score rows
LATCH, BELOW = 2, 1
# (shape, token slots, probe rows of the slots)
CASES = [
    (NORMAL, "requests", "random"),
    (NORMAL, "requests", "shared"),
    (NORMAL, "requests", "none"),
    (NORMAL, "random", "random"),
    (ODD, "requests", "random"),
    (ODD, "random", "shared"),
    (WIDE, "requests", "random"),
    (TAIL, "random", "random"),
]
assert {c[2] for c in CASES} == set(ROW_PATTERNS)
EPS32 = 2.0**-24


def case_id(case) -> str:
    (T, d), slot_kind, row_kind = case
    return f"T{T}_d{d}-slot_{slot_kind}-prow_{row_kind}"


def make_inputs(T, d, dtype, slot_kind, row_kind, gen, device="cpu"):
    """``requests``: tokens in contiguous runs per request, each request on one slot (or
    none); ``random``: any slot and request per token. gmode random over all four modes,
    latch states random, thresholds near the median score, half the tokens captured."""
    state_row = request_runs(T, R, gen)
    if slot_kind == "requests":
        req_slot = torch.randint(-1, S, (R,), generator=gen, dtype=torch.int32)
        req_slot[0] = S - 1  # at least one request steered, whatever the draw
        slot = torch.where(state_row >= 0, req_slot[state_row.clamp(min=0).long()], -1)
        slot = slot.to(torch.int32)
    else:
        slot = torch.randint(-1, S, (T,), generator=gen, dtype=torch.int32)
        state_row = torch.randint(-1, R, (T,), generator=gen, dtype=torch.int32)
    args = dict(
        h=randn_nonzero(T, d, dtype=dtype, gen=gen),
        token_slot=slot,
        prow=row_pattern(row_kind, (S,), P, gen),
        probes=randn_nonzero(P, d, gen=gen) / d**0.5,
        bias=randn_nonzero(S, gen=gen) / 4,
        thresh=randn_nonzero(S, gen=gen) / 2,
        gmode=torch.randint(0, 4, (S,), generator=gen, dtype=torch.int32),
        state_row=state_row,
        state=torch.randint(0, 2, (R,), generator=gen, dtype=torch.int32),
        score_index=capture_pattern("random", T, C, gen),
        score_buf=poisoned((C,), torch.float32),
        flag=flag(True),
    )
    separate(args)
    return {k: v.to(device) for k, v in args.items()}


def check_probe_gate(impl, args):
    want = clone_all(args)
    reference.probe_gate(**want)
    before = clone_all(args)
    gated, _, mag = gate_scores64(args)
    ops.probe_gate(**args, impl=impl)
    assert_equal(args["token_slot"], want["token_slot"], "token_slot")
    assert_equal(args["state"], want["state"], "state")
    assert_equal(args["h"], before["h"], "h (read only)")
    # Scores: rows of gated, captured tokens within a reordered-sum bound, others as
    # they were.
    idx = args["score_index"].cpu()
    written = idx[gated & (idx >= 0)].long()
    got, ref = args["score_buf"].cpu(), want["score_buf"].cpu()
    kept = torch.ones(C, dtype=torch.bool)
    kept[written] = False
    assert_equal(got[kept], before["score_buf"].cpu()[kept], "score_buf (rows not written)")
    d = args["h"].shape[1]
    bound = 2 * (d + 2) * EPS32 * mag[gated & (idx >= 0)]
    diff = (got[written].double() - ref[written].double()).abs()
    assert bool((diff <= bound).all()), f"score_buf: diff {diff} > bound {bound}"


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_probe_gate_matches_reference(impl, dtype, case, gen):
    (T, d), slot_kind, row_kind = case
    for _ in range(2):  # two steps: the second sees the latch states of the first
        args = make_inputs(T, d, dtype, slot_kind, row_kind, gen)
        check_probe_gate(impl, args)


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_flag_off_touches_nothing(impl, dtype, gen):
    args = make_inputs(*NORMAL, dtype, "requests", "shared", gen)
    args["thresh"].fill_(float("inf"))  # on, every gated token would close
    args["flag"] = flag(False)
    before = clone_all(args)
    ops.probe_gate(**args, impl=impl)
    for name in args:
        assert_equal(args[name], before[name], f"{name} with flag 0")
    args["flag"] = torch.tensor([-3], dtype=torch.int32)  # any non-zero value is on
    ops.probe_gate(**args, impl=impl)
    assert not bool((args["token_slot"] == before["token_slot"]).all()), "flag -3 must be on"


# ------------------------------------------------------------------ closed forms
def exact_inputs(scores, slots, state_row, gmode, thresh, dtype=torch.float32, state=None):
    """Inputs whose score of token t is exactly ``scores[t]``: the probe row is e_0, h's
    column 0 holds the score (exact in every dtype), the bias is 0; one probe row for
    every slot, every token captured into row t."""
    T, d = len(scores), 9
    h = randn_nonzero(T, d, gen=torch.Generator().manual_seed(5))
    h[:, 0] = torch.tensor(scores, dtype=torch.float32)
    probes = torch.zeros(2, d)
    probes[1, 0] = 1.0
    n_slots = len(gmode)
    return dict(
        h=h.to(dtype),
        token_slot=torch.tensor(slots, dtype=torch.int32),
        prow=torch.ones(n_slots, dtype=torch.int32),
        probes=probes,
        bias=torch.zeros(n_slots),
        thresh=torch.tensor(thresh, dtype=torch.float32),
        gmode=torch.tensor(gmode, dtype=torch.int32),
        state_row=torch.tensor(state_row, dtype=torch.int32),
        state=torch.tensor(state if state is not None else [0] * R, dtype=torch.int32),
        score_index=torch.arange(T, dtype=torch.int32),
        score_buf=poisoned((T,), torch.float32),
        flag=flag(True),
    )


def run(impl, args):
    ops.probe_gate(**args, impl=impl)
    return args["token_slot"].tolist(), args["state"].tolist()


ALL = ["torch", *CPU_IMPLS]


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_never_and_always_holding(impl, dtype):
    """Never holds: every gated token closes (slot -1), the others keep their slot;
    always holds: nothing changes but the latch states of latched requests."""
    scores = [1.0, -2.0, 0.5, 3.0, -0.25]
    slots = [0, 1, -1, 1, 0]
    rows = [0, 0, 1, 2, 3]
    never = exact_inputs(scores, slots, rows, [LATCH, 0], [float("inf"), float("inf")], dtype)
    never["prow"][1] = -1  # slot 1 has no gate at this layer: its tokens stay
    assert run(impl, never) == ([-1, 1, -1, 1, -1], [0, 0, 0, 0])
    always = exact_inputs(scores, slots, rows, [LATCH, 0], [-float("inf")] * 2, dtype)
    assert run(impl, always) == (slots, [1, 0, 0, 1])
    buf = always["score_buf"]
    assert buf[[0, 1, 3, 4]].tolist() == [1.0, -2.0, 3.0, -0.25]
    assert bool(buf[2].isnan()), "token 2 has no slot: no score"


@pytest.mark.parametrize("impl", ALL)
def test_thresholds_above_and_below(impl):
    """Bit 0 of gmode opens below the threshold; equality holds in neither mode."""
    scores = [0.5, 1.0, 1.5, 0.5, 1.0, 1.5]
    args = exact_inputs(scores, [0, 0, 0, 1, 1, 1], [-1] * 6, [0, BELOW], [1.0, 1.0])
    assert run(impl, args) == ([-1, -1, 0, 1, -1, -1], [0] * R)


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_latch_within_one_step(impl, dtype):
    """Request 2 (tokens 0-4, latched slot 0) holds first at token 2: tokens 0-1 close,
    2-4 stay open. Request 0 (tokens 5-7, slot 1 without the latch) only where it holds.
    Request 3 (tokens 8-9, latched) never holds: closed, state stays 0. Token 10 has
    no request: no latch, it holds."""
    scores = [0.0, -1.0, 2.0, -1.0, 0.0, 2.0, -1.0, 2.0, -1.0, -1.0, 2.0]
    slots = [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    rows = [2, 2, 2, 2, 2, 0, 0, 0, 3, 3, -1]
    args = exact_inputs(scores, slots, rows, [LATCH, 0], [1.0, 1.0], dtype)
    got_slots, got_state = run(impl, args)
    assert got_slots == [-1, -1, 0, 0, 0, 1, -1, 1, -1, -1, 0]
    assert got_state == [0, 0, 1, 0]


@pytest.mark.parametrize("impl", ALL)
def test_latch_across_two_calls(impl):
    """Step 1 (prefill): request 1 holds at its last token, request 2 never. Step 2 (one
    decode token each): request 1 stays open though it does not hold (state 1),
    request 2 stays closed, then opens once it holds, and stays open after that."""
    state = torch.zeros(R, dtype=torch.int32)
    step1 = exact_inputs([2.0, 2.0, 0.0, 2.0, 2.0], [0, 0, 0, 0, 0], [1, 1, 1, 2, 2],
                         [LATCH | BELOW], [1.0])  # holds below 1
    step1["state"] = state
    assert run(impl, step1) == ([-1, -1, 0, -1, -1], [0, 1, 0, 0])
    step2 = exact_inputs([2.0, 2.0], [0, 0], [1, 2], [LATCH | BELOW], [1.0])
    step2["state"] = state
    assert run(impl, step2) == ([0, -1], [0, 1, 0, 0])
    step3 = exact_inputs([0.0, 2.0], [0, 0], [2, 1], [LATCH | BELOW], [1.0])
    step3["state"] = state
    assert run(impl, step3) == ([0, 0], [0, 1, 1, 0])
    step4 = exact_inputs([2.0], [0], [2], [LATCH | BELOW], [1.0])
    step4["state"] = state
    assert run(impl, step4) == ([0], [0, 1, 1, 0])


@pytest.mark.parametrize("impl", ALL)
def test_score_capture(impl):
    """Scores are captured for gated tokens whether the gate opens or not, with the
    bias; tokens without a slot or without a probe write nothing."""
    args = exact_inputs([1.5, -2.0, 4.0, 0.25], [0, 1, -1, 2], [-1] * 4, [0, 0, 0],
                        [0.0, 0.0, 0.0])
    args["bias"] = torch.tensor([0.5, 0.25, 1.0])
    args["prow"][2] = -1
    args["score_index"] = torch.tensor([3, 0, 1, 2], dtype=torch.int32)
    out_slots, _ = run(impl, args)
    assert out_slots == [0, -1, -1, 2]
    buf = args["score_buf"]
    assert buf[3].item() == 2.0 and buf[0].item() == -1.75
    assert bool(buf[1:3].isnan().all())


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_empty_batch(impl):
    args = exact_inputs([1.0], [0], [0], [LATCH], [0.0])
    empty = {k: (v[:0] if k in ("h", "token_slot", "state_row", "score_index") else v)
             for k, v in args.items()}
    before = clone_all(empty)
    ops.probe_gate(**empty, impl=impl)
    for name in empty:
        assert_equal(empty[name], before[name], name)


# ------------------------------------------------------------------------------ GPU
@gpu_test
@pytest.mark.parametrize("impl", kernel_impls("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(256, 4096), (97, 97), (3, 8192 + 5), (2048, 64)])
def test_cuda_matches_reference(impl, dtype, shape):
    gen = torch.Generator().manual_seed(3)
    T, d = shape
    for slot_kind, row_kind in (("requests", "random"), ("random", "shared")):
        check_probe_gate(impl, make_inputs(T, d, dtype, slot_kind, row_kind, gen, "cuda"))
        off = make_inputs(T, d, dtype, slot_kind, row_kind, gen, "cuda")
        off["flag"].zero_()
        before = clone_all(off)
        ops.probe_gate(**off, impl=impl)
        for name in off:
            assert_equal(off[name], before[name], f"{name} with flag 0")
    for th in (float("inf"), -float("inf")):  # never / always holds
        args = make_inputs(T, d, dtype, "requests", "shared", gen, "cuda")
        args["thresh"].fill_(th)
        check_probe_gate(impl, args)
