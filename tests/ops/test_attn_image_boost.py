"""attn_image_boost: every fused implementation against the torch reference, and the
argument checks.

Every implementation of this op that runs here (the Triton kernel under the
interpreter, the C++ CPU kernel once it is built; see ``attn_impls``) is held to the
reference (itself checked against dense attention in
test_attn_image_boost_reference.py) on random non-zero inputs, the cases of
``tests.ops.attn_image_boost_cases``, in fp32 / fp16 / bf16. Attention sums in a
different order than torch, so rewritten heads are compared within ``tests.utils.TOL``
(one rounding of the output); everything the op must not touch is compared bit for bit:
(token, head) pairs that are not rewritten, every output with all betas 1, everything
with the flag 0, and the rows of ``mass_buf`` nobody captures into (poisoned with NaN).
"""

from __future__ import annotations

import math

import pytest
import torch

import emosteer.ops as ops
from emosteer.ops import reference
from tests.ops.attn_image_boost_cases import (
    CASES,
    CPU_IMPLS,
    DECODE_ROWS,
    NS,
    Case,
    Row,
    S,
    attn_impls,
    captured_rows,
    case_id,
    dense_expected,
    make_inputs,
    rewritten,
    run_and_check,
)
from tests.ops.op_cases import clone_all, flag
from tests.utils import DTYPES, assert_close, assert_equal, dtype_id, gpu_test, poisoned


# ---------------------------------------------------------- implementations vs reference
@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(impl, dtype, case, gen):
    args, _ = make_inputs(case, dtype, gen)
    run_and_check(impl, args, dtype)


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_beta_one_is_exact(impl, dtype, gen):
    """Every beta 1: out bit-identical to its input; captured masses are the plain ones."""
    args, dense = make_inputs(CASES[0], dtype, gen, beta_one=True)
    out_in = args["out"].clone()
    ops.attn_image_boost(**args, impl=impl)
    assert_equal(args["out"], out_in, "out with every beta 1")
    _, want_mass = dense_expected(args, dense)
    cap = args["cap_index"]
    for t in ((cap >= 0) & (args["token_row"] >= 0)).nonzero().flatten().tolist():
        assert_close(args["mass_buf"][int(cap[t])], want_mass[t].float(), torch.float32,
                     f"plain mass of token {t}")


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_flag_off_touches_nothing(impl, dtype, gen):
    """flag 0: out and mass_buf bit-identical although slots, betas and captures are set;
    any non-zero flag is on."""
    args, _ = make_inputs(CASES[0], dtype, gen)
    args["flag"] = flag(False)
    before = clone_all(args)
    ops.attn_image_boost(**args, impl=impl)
    assert_equal(args["out"], before["out"], "out with flag 0")
    assert_equal(args["mass_buf"], before["mass_buf"], "mass_buf with flag 0")

    args["flag"] = torch.tensor([7], dtype=torch.int32)
    ops.attn_image_boost(**args, impl=impl)
    assert not torch.equal(args["out"], before["out"]), "flag 7 must switch the op on"
    assert not bool(args["mass_buf"][captured_rows(args)].isnan().any())


# Prefill runs longer than the C++ kernel's 64-token tiles: a chunk starting at 37
# (tiles 37..100, 101..164, ..., 293..299), images that cross tile boundaries, both
# logit modes, and a run whose tokens see no image until a later tile.
LONG_PREFILL = Case("long-prefill-tiles", 6, 2, 16, 16, "cpu", (
    Row(300, 37, ((10, 150), (280, 290)), slot=0),
    Row(270, 0, ((129, 140),), slot=1),
    Row(290, 1, ((261, 262),), slot=3),
))


@pytest.mark.skipif("cpp" not in CPU_IMPLS, reason="the C++ CPU kernel is not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpp_long_prefill_tiles(dtype, gen):
    """The C++ kernel's prefill path cuts long runs into tiles (the products of each tile
    over the keys its last token sees); every tile boundary matches the reference."""
    args, _ = make_inputs(LONG_PREFILL, dtype, gen)
    run_and_check("cpp", args, dtype)


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
def test_tiny_beta_ignores_image_keys(impl, gen):
    """Weight mode with beta 1e-30 (log beta = -69; beta 0 itself is rejected): the
    attention of the text keys alone and no mass on the image; a token whose only key is
    an image key keeps weight 1 on it (softmax of one logit)."""
    case = CASES[2]  # decode: row 0's only key is an image key
    args, dense = make_inputs(case, torch.float32, gen)
    args["beta"][0] = 1e-30
    args["logit_mode"][0] = 0
    for r in (0, 2):
        t = (args["token_row"] == r).nonzero().flatten()
        args["token_slot"][t] = 0
        args["cap_index"][t] = args["cap_index"].max() + 1 + r
    args["mass_buf"] = poisoned((int(args["cap_index"].max()) + 1, case.H, NS), torch.float32)
    out_in = args["out"].clone()
    ops.attn_image_boost(**args, impl=impl)
    q, H = args["query"], case.H
    scale = 1.0 / math.sqrt(case.D)
    for r in (0, 2):
        t = int((args["token_row"] == r).nonzero()[0])
        c = int(args["cap_index"][t])
        p = int(args["token_pos"][t])
        j = torch.arange(p + 1)
        lo, hi = args["spans"][r, 0].tolist()
        text = ~((j >= lo) & (j < hi))
        for h in range(H):
            kv = h // (H // case.KVH)
            K, V = dense[0][r][: p + 1, kv].double(), dense[1][r][: p + 1, kv].double()
            if not bool(text.any()):
                assert_close(args["out"][t, h], V[0].float(), torch.float32, "one image key")
                assert float(args["mass_buf"][c, h, 0]) == 1.0
                continue
            w = torch.softmax((K[text] @ q[t, h].double()) * scale, 0)
            want = w @ V[text]
            assert_close(args["out"][t, h], want.float(), torch.float32, f"row {r} head {h}")
            assert float(args["mass_buf"][c, h, 0]) < 1e-20
    untouched = ~rewritten(args)
    assert_equal(args["out"][untouched], out_in[untouched], "heads not rewritten")


@pytest.mark.parametrize("impl", ["torch", *CPU_IMPLS])
def test_no_spans_and_empty_batch(impl, gen):
    """No span at all (NS = 0): nothing is rewritten, captured rows are empty; a batch
    without tokens is a no-op."""
    args, _ = make_inputs(CASES[5], torch.float32, gen)
    T, H, _ = args["out"].shape
    args["spans"] = torch.zeros(len(CASES[5].rows), 0, 2, dtype=torch.int32)
    args["mass_buf"] = torch.zeros(T + 3, H, 0)
    out_in = args["out"].clone()
    ops.attn_image_boost(**args, impl=impl)
    assert_equal(args["out"], out_in, "out without spans")

    empty = {k: v for k, v in args.items()}
    empty["out"] = args["out"][:0]
    empty["query"] = args["query"][:0]
    for k in ("token_row", "token_pos", "token_slot", "cap_index"):
        empty[k] = args[k][:0]
    ops.attn_image_boost(**empty, impl=impl)


# ------------------------------------------------------------------------ validation
def _small_args():
    return make_inputs(CASES[5], torch.float32, torch.Generator().manual_seed(3))[0]


def _set(name, value):
    def mutate(a):
        a[name] = value(a) if callable(value) else value
    return mutate


def _fill(name, pos, value):
    def mutate(a):
        a[name] = a[name].clone()
        a[name][pos] = value
    return mutate


def _kv_heads(a):
    NB, BS, _, D = a["key_cache"].shape
    a["key_cache"] = torch.zeros(NB, BS, 3, D)
    a["value_cache"] = torch.zeros(NB, BS, 3, D)


BAD = [
    # (argument named in the message, mutation)
    ("out", _set("out", lambda a: a["out"].double())),
    ("out", _set("out", lambda a: a["out"][:, :, None])),
    ("query", _set("query", lambda a: a["query"].half())),
    ("query", _set("query", lambda a: a["query"][:, :, :-1])),
    ("key_cache", _set("key_cache", lambda a: a["key_cache"][..., :-1])),
    ("key_cache", _set("key_cache", lambda a: a["key_cache"][0])),
    ("value_cache", _set("value_cache", lambda a: a["value_cache"][:, :-1])),
    ("value_cache", _set("value_cache", lambda a: a["value_cache"].half())),
    ("KV heads", _kv_heads),
    ("block_table", _set("block_table", lambda a: a["block_table"].long())),
    ("block_table", _set("block_table", lambda a: a["block_table"][0])),
    ("spans", _set("spans", lambda a: torch.zeros(2, NS, 3, dtype=torch.int32))),
    ("spans", _set("spans", lambda a: a["spans"][:1])),
    ("spans", _set("spans", lambda a: a["spans"].long())),
    ("beta", _set("beta", lambda a: a["beta"].double())),
    ("beta", _set("beta", lambda a: a["beta"][:, :1])),
    ("beta", _fill("beta", (0, 0), 0.0)),  # beta must be > 0 (log beta in weight mode)
    ("beta", _fill("beta", (1, 1), -2.0)),
    ("logit_mode", _set("logit_mode", lambda a: a["logit_mode"][:-1])),
    ("logit_mode", _set("logit_mode", lambda a: a["logit_mode"].float())),
    ("mass_buf", _set("mass_buf", lambda a: a["mass_buf"][:, :, :-1].contiguous())),
    ("mass_buf", _set("mass_buf", lambda a: a["mass_buf"].half())),
    ("token_row", _set("token_row", lambda a: a["token_row"][:-1])),
    ("token_pos", _set("token_pos", lambda a: a["token_pos"].long())),
    ("token_slot", _set("token_slot", lambda a: a["token_slot"][:-1])),
    ("cap_index", _set("cap_index", lambda a: a["cap_index"].long())),
    ("sm_scale", _set("sm_scale", lambda a: torch.ones(2))),
    ("sm_scale", _set("sm_scale", lambda a: torch.ones(1, dtype=torch.float64))),
    ("flag", _set("flag", lambda a: torch.ones(1, dtype=torch.int64))),
    # Index values out of range.
    ("token_row", _fill("token_row", 0, 2)),  # 2 block-table rows
    ("token_row", _fill("token_row", 0, -2)),
    ("token_slot", _fill("token_slot", 0, S)),
    ("cap_index", _fill("cap_index", 0, 10**4)),
    ("token_pos", _fill("token_pos", 0, 10**4)),
    ("token_pos", _fill("token_pos", 0, -1)),  # token 0 has a row
]


@pytest.mark.parametrize("name,mutate", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_validation_names_the_argument(name, mutate):
    args = _small_args()
    assert int(args["token_row"][0]) >= 0
    mutate(args)
    with pytest.raises((TypeError, ValueError, IndexError), match=name):
        ops.attn_image_boost(**args, impl="torch")


def test_triton_module_signature_is_the_reference_one():
    """The dispatcher calls the Triton launcher with the reference's arguments."""
    import inspect

    from emosteer.ops.triton import attn_image_boost

    want = list(inspect.signature(reference.attn_image_boost).parameters)
    assert list(inspect.signature(attn_image_boost.attn_image_boost).parameters) == want


# ------------------------------------------------------------------------------ GPU
GPU_CASES = [
    Case("gpu-prefill-h32-kv8-d128", 32, 8, 128, 16, "plain", (
        Row(300, 240, ((10, 150), (250, 270)), slot=0),
        Row(80, 30, (), slot=1),
        Row(260, 200, ((0, 20), (180, 240)), slot=3),
    )),
    Case("gpu-decode-h32-kv8-d128-cpu-layout", 32, 8, 128, 32, "cpu", DECODE_ROWS + (
        Row(1500, 1499, ((100, 900), (1000, 1200)), slot=0),
    )),
    Case("gpu-odd-t97-h13-d80", 13, 1, 80, 16, "plain", CASES[4].rows),
]


@gpu_test
@pytest.mark.parametrize("impl", attn_impls("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_cuda_matches_reference(impl, dtype, case):
    gen = torch.Generator().manual_seed(7)
    args, _ = make_inputs(case, dtype, gen, device="cuda")
    run_and_check(impl, args, dtype)
    off, _ = make_inputs(case, dtype, gen, device="cuda")
    off["flag"].zero_()
    before = {k: v.clone() for k, v in off.items()}
    ops.attn_image_boost(**off, impl=impl)
    assert_equal(off["out"], before["out"], "out with flag 0")
    assert_equal(off["mass_buf"], before["mass_buf"], "mass_buf with flag 0")


@gpu_test
@pytest.mark.parametrize("impl", attn_impls("cuda"))
def test_cuda_graph_replay_reads_device_data(impl):
    """Captured once in a CUDA graph, the launch follows later changes of the device
    data (flag, betas, slots) on replay, like the plugin's per-step tables."""
    gen = torch.Generator().manual_seed(11)
    args, _ = make_inputs(GPU_CASES[2], torch.bfloat16, gen, device="cuda")
    out_in = args["out"].clone()
    args["flag"].zero_()
    op = torch.ops.emosteer.attn_image_boost
    call = lambda: op(*args.values(), impl)  # noqa: E731
    call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    args["out"].copy_(out_in)
    graph.replay()
    assert_equal(args["out"], out_in, "flag 0 at replay")

    args["flag"].fill_(1)
    args["beta"].mul_(1.5)
    args["mass_buf"].fill_(float("nan"))
    ref = {k: v.cpu().clone() for k, v in args.items()}
    reference.attn_image_boost(**ref)
    graph.replay()
    rw = rewritten(args)
    assert_close(args["out"].cpu()[rw], ref["out"][rw], torch.bfloat16, "out after replay")
    assert_equal(args["out"].cpu()[~rw], out_in.cpu()[~rw], "untouched heads after replay")
    cap = captured_rows(args)
    assert_close(args["mass_buf"].cpu()[cap], ref["mass_buf"][cap], torch.float32, "mass")
