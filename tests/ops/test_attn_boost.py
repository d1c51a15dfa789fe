"""attn_image_boost: the reference against dense attention, every fused implementation
against the reference.

The reference (``emosteer.ops.reference.attn_image_boost``) is checked first against an
independent dense float64 computation: per sequence a dense K / V (scattered into the
paged cache by the test itself), plain softmax attention, and the closed forms of the
boost in weight mode (``o' = (o + (beta-1)*m*o_img) / (1 + (beta-1)*m)`` with ``m`` the
plain image mass and ``o_img`` the attention restricted to image keys; span masses
``beta*m_k / (1 + (beta-1)*m)``) and a direct dense computation in logit mode.

Every implementation of this op that runs here (the Triton kernel under the
interpreter, the C++ CPU kernel once it is built; see :func:`attn_impls`) is then held
to the reference on random non-zero inputs: several batch rows with different spans (no
image, one image, two images, a span the query positions only partly see, one they do
not reach), mixed slots (beta = 1 heads, a slot whose betas are all 1, slot -1 tokens,
both logit modes), padding tokens (row -1, with a slot and a capture row they must not
use), prefill-like rows (many tokens per row, chunked: the first query position > 0)
and decode-like rows (one token each, contexts of several key tiles), GQA (12 heads on
4 KV heads, 13 on 1), the odd shape (97 tokens, 13 heads, head_dim 80), head_dim 7,
block sizes 16 and 32, fp32 / fp16 / bf16, vLLM's CPU cache layout (keys a permuted view
of ``[NB, KVH, D, BS]``, values of ``[NB, KVH, BS, D]``) and the plain one with queries
sliced out of a fused qkv tensor. Attention sums in a different order than torch, so
rewritten heads are compared within ``tests.utils.TOL`` (one rounding of the output);
everything the op must not touch is compared bit for bit: (token, head) pairs that are
not rewritten, every output with all betas 1, everything with the flag 0, and the rows
of ``mass_buf`` nobody captures into (poisoned with NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import emosteer.ops as ops
from emosteer.ops import reference
from tests.ops.op_cases import clone_all, flag
from tests.utils import (
    DTYPES,
    assert_close,
    assert_equal,
    dtype_id,
    env,
    gpu_test,
    poisoned,
    randn_nonzero,
)

OP = "attn_image_boost"


def attn_impls(device: str = "cpu") -> list[str]:
    """Like ``tests.utils.kernel_impls`` but for this op: the attention op has no CUDA C++
    kernel, and a C++ build may predate it, so ask the dispatcher about this op itself
    (on the CPU with the Triton interpreter counted in)."""
    with env(TRITON_INTERPRET="1" if device == "cpu" else None):
        return [i for i in ops.available_impls(device, OP) if i != "torch"]


CPU_IMPLS = attn_impls("cpu")
NS = 3  # spans per row (padded with empty ones)
S = 4  # slots


# ---------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Row:
    """A batch row: ``length`` keys, query tokens at positions ``first .. length-1``
    (``first == length - 1``: decode), image spans ``[start, end)``, its slot."""

    length: int
    first: int
    spans: tuple = ()
    slot: int = 0


@dataclass(frozen=True)
class Case:
    name: str
    H: int
    KVH: int
    D: int
    BS: int
    layout: str  # "cpu": vLLM's CPU cache (transposed keys); "plain": [NB, BS, KVH, D]
    rows: tuple
    pad: int = 2  # padding tokens (row -1)


# Slots: 0 weight mode with some heads at beta 1, 1 logit mode likewise, 2 every beta
# exactly 1 (a slot that boosts nothing), 3 weight mode, every head damped (beta < 1).
PREFILL_ROWS = (
    Row(30, 3, ((6, 20),), slot=0),  # positions 3..5 see no image, 6..19 part of it
    Row(12, 6, ((0, 0), (9, 4)), slot=3),  # no image: empty spans only
    Row(40, 28, ((2, 9), (30, 37)), slot=1),  # two images; 28, 29 before the second
)
SHORT_PREFILL_ROWS = (  # the same situations with fewer query tokens (12 heads)
    Row(24, 4, ((6, 14),), slot=0),
    Row(12, 9, ((0, 0), (9, 4)), slot=3),
    Row(40, 33, ((2, 9), (30, 37)), slot=1),
)
DECODE_ROWS = (  # one token per row; 70+ keys: several key tiles
    Row(1, 0, ((0, 1),), slot=0),  # the only key is an image key
    Row(17, 16, ((3, 11), (14, 40)), slot=1),  # second span runs past the sequence
    Row(70, 69, ((5, 60),), slot=0),
    Row(130, 129, ((64, 65), (100, 128), (0, 3)), slot=3),  # three spans
    Row(33, 32, ((40, 50),), slot=0),  # an image the token does not reach yet
    Row(65, 64, (), slot=2),  # every beta 1
    Row(200, 199, ((130, 190),), slot=1),
)
CASES = [
    Case("prefill", 4, 2, 32, 16, "cpu", PREFILL_ROWS),
    Case("prefill-gqa3-bs32", 12, 4, 64, 32, "plain", SHORT_PREFILL_ROWS),
    Case("decode-gqa3", 12, 4, 64, 16, "plain", DECODE_ROWS, pad=1),
    Case("decode-h13-kv1-d80-bs32", 13, 1, 80, 32, "cpu", DECODE_ROWS[1:5], pad=1),
    # The odd shape: 97 tokens (40 + 20 + 35 + 2 padding), 13 heads on 1 KV head, D 80;
    # the first row's slot boosts nothing (captures only: keeps the interpreter quick).
    Case("odd-t97-h13-d80", 13, 1, 80, 16, "cpu", (
        Row(50, 10, ((4, 30),), slot=2),
        Row(20, 0, (), slot=3),
        Row(60, 25, ((0, 5), (40, 52)), slot=0),
    )),
    Case("tail-d7", 2, 1, 7, 16, "plain", (Row(20, 15, ((3, 9),), slot=3),
                                          Row(5, 4, ((0, 2),), slot=1)), pad=1),
]


def make_inputs(case: Case, dtype, gen, device="cpu", beta_one=False):
    """The op's keyword arguments for ``case`` plus the dense per-row K / V (float32)
    the cache was filled from."""
    H, KVH, D, BS = case.H, case.KVH, case.D, case.BS
    R = len(case.rows)
    MB = max(-(-row.length // BS) for row in case.rows) + 1  # one spare block per row
    NB = R * MB + 3  # a few blocks that belong to nobody
    # Distinct physical blocks per row, in random order.
    block_table = torch.randperm(NB, generator=gen)[: R * MB].view(R, MB).to(torch.int32)

    if case.layout == "cpu":
        key_cache = randn_nonzero(NB, KVH, D, BS, dtype=dtype, gen=gen).permute(0, 3, 1, 2)
        value_cache = randn_nonzero(NB, KVH, BS, D, dtype=dtype, gen=gen).permute(0, 2, 1, 3)
    else:
        key_cache = randn_nonzero(NB, BS, KVH, D, dtype=dtype, gen=gen)
        value_cache = randn_nonzero(NB, BS, KVH, D, dtype=dtype, gen=gen)
    dense_k, dense_v = [], []
    for r, row in enumerate(case.rows):
        j = torch.arange(MB * BS)
        blocks = block_table[r, j // BS].long()
        k = randn_nonzero(MB * BS, KVH, D, dtype=dtype, gen=gen)
        v = randn_nonzero(MB * BS, KVH, D, dtype=dtype, gen=gen)
        key_cache[blocks, j % BS] = k
        value_cache[blocks, j % BS] = v
        dense_k.append(k.float())
        dense_v.append(v.float())

    spans = torch.zeros(R, NS, 2, dtype=torch.int32)
    for r, row in enumerate(case.rows):
        for n, (lo, hi) in enumerate(row.spans):
            spans[r, n] = torch.tensor([lo, hi])

    # Tokens: each row's query positions in order, padding tokens spread in between.
    rows, pos = [], []
    for r, row in enumerate(case.rows):
        rows += [r] * (row.length - row.first)
        pos += list(range(row.first, row.length))
    for k in range(case.pad):
        at = (k + 1) * len(rows) // (case.pad + 1)
        rows.insert(at, -1)
        pos.insert(at, 0)
    T = len(rows)
    token_row = torch.tensor(rows, dtype=torch.int32)
    token_pos = torch.tensor(pos, dtype=torch.int32)
    token_slot = torch.tensor([case.rows[r].slot if r >= 0 else 0 for r in rows], dtype=torch.int32)
    token_slot[1::5] = -1  # a few tokens of each row without a slot

    # Betas between 1/4 and 4 (never 1 by accident); every third head exactly 1.
    beta = torch.exp(torch.rand(S, H, generator=gen) * 2.6 - 1.3)
    beta = torch.where((beta - 1).abs() < 0.05, beta + 0.1, beta)
    beta[:2, ::3] = 1.0
    beta[1] = torch.where(beta[1] == 1.0, beta[1], beta[1].clamp(0.5, 2.0))  # logit x beta
    beta[2] = 1.0
    beta[3] = torch.rand(H, generator=gen) * 0.5 + 0.25
    if beta_one:
        beta.fill_(1.0)
    logit_mode = torch.tensor([0, 1, 0, 0], dtype=torch.int32)

    # Captures: about a sixth of the tokens, padding tokens included (they must not
    # write), into distinct rows of a buffer with spare rows; the rest stays NaN.
    C = T + 3
    cap_index = torch.full((T,), -1, dtype=torch.int32)
    chosen = torch.randperm(T, generator=gen)[: max(2, T // 6)]
    cap_index[chosen] = torch.randperm(C, generator=gen)[: chosen.numel()].to(torch.int32)
    for t in (token_row < 0).nonzero().flatten().tolist():
        if cap_index[t] < 0:
            free = sorted(set(range(C)) - set(cap_index.tolist()))
            cap_index[t] = free[0]

    if case.layout == "plain":  # queries sliced out of a fused qkv projection
        qkv = randn_nonzero(T, (H + 2 * KVH) * D, dtype=dtype, gen=gen)
        query = qkv[:, : H * D].view(T, H, D)
    else:
        query = randn_nonzero(T, H, D, dtype=dtype, gen=gen)
    args = dict(
        out=randn_nonzero(T, H, D, dtype=dtype, gen=gen),
        query=query,
        key_cache=key_cache,
        value_cache=value_cache,
        block_table=block_table,
        token_row=token_row,
        token_pos=token_pos,
        token_slot=token_slot,
        beta=beta,
        logit_mode=logit_mode,
        spans=spans,
        cap_index=cap_index,
        mass_buf=poisoned((C, H, NS), torch.float32),
        sm_scale=torch.tensor([1.0 / math.sqrt(D)]),
        flag=flag(True),
    )
    moved = {k: (v.to(device) if k not in ("query", "key_cache", "value_cache") else v)
             for k, v in args.items()}
    if torch.device(device).type != "cpu":  # keep the strides of the views
        for k in ("query", "key_cache", "value_cache"):
            base = args[k]
            moved[k] = torch.empty_strided(base.shape, base.stride(), dtype=dtype,
                                           device=device).copy_(base)
    return moved, (dense_k, dense_v)


def sees_image(args) -> torch.Tensor:
    """[T] bool: the token's row has a non-empty span with a key at or before its position."""
    rows, pos, spans = (args[k].cpu().long() for k in ("token_row", "token_pos", "spans"))
    out = torch.zeros(rows.shape[0], dtype=torch.bool)
    for t in range(rows.shape[0]):
        if rows[t] >= 0:
            lo, hi = spans[rows[t], :, 0].clamp(min=0), spans[rows[t], :, 1]
            out[t] = bool(((lo < hi) & (lo <= pos[t])).any())
    return out


def rewritten(args) -> torch.Tensor:
    """[T, H] bool: the (token, head) pairs whose output the op must rewrite."""
    rows, slot = args["token_row"].cpu(), args["token_slot"].cpu().long()
    beta = args["beta"].cpu()
    b = torch.where((slot >= 0).unsqueeze(1), beta[slot.clamp(min=0)], 1.0)
    return (rows >= 0).unsqueeze(1) & (b != 1) & sees_image(args).unsqueeze(1)


def captured_rows(args) -> torch.Tensor:
    """[C] bool: rows of mass_buf the op must write (captures of tokens with a row)."""
    cap, rows = args["cap_index"].cpu(), args["token_row"].cpu()
    out = torch.zeros(args["mass_buf"].shape[0], dtype=torch.bool)
    out[cap[(cap >= 0) & (rows >= 0)].long()] = True
    return out


def run_and_check(impl, args, dtype):
    ref = {k: v.cpu().clone() for k, v in args.items()}
    out_in, mass_in = ref["out"].clone(), ref["mass_buf"].clone()
    reference.attn_image_boost(**ref)

    ops.attn_image_boost(**args, impl=impl)

    out, mass = args["out"].cpu(), args["mass_buf"].cpu()
    rw = rewritten(args)
    assert bool(rw.any()) and not bool(rw.all()), "the case must rewrite some heads, not all"
    # Not rewritten: bit-identical to the input, in the reference and the kernel.
    assert_equal(ref["out"][~rw], out_in[~rw], "reference out (heads not rewritten)")
    assert_equal(out[~rw], out_in[~rw], f"{impl} out (heads not rewritten)")
    # Rewritten: the reference's attention, one rounding apart.
    assert_close(out[rw], ref["out"][rw], dtype, f"{impl} out (rewritten heads)")
    assert not bool((ref["out"][rw] == out_in[rw]).all(-1).any()), "a rewritten head kept its input"
    # mass_buf: captured rows match, every other row is still the NaN it was.
    cap = captured_rows(args)
    assert bool(cap.any())
    assert_close(mass[cap], ref["mass_buf"][cap], torch.float32, f"{impl} mass_buf")
    assert_equal(mass[~cap], mass_in[~cap], f"{impl} mass_buf (rows nobody captures into)")
    assert not bool(ref["mass_buf"][cap].isnan().any())
    assert bool((mass[cap] >= 0).all()) and bool((mass[cap].sum(-1) <= 1 + 1e-5).all())


def case_id(case: Case) -> str:
    return case.name


# ------------------------------------------------------------- reference vs dense math
def dense_expected(args, dense, mode_override=None):
    """Float64 expectation of the op from the dense K / V: (out [T, H, D], mass [T, H, NS])
    for tokens with a row; out of other (token, head) pairs is the input."""
    dense_k, dense_v = dense
    q = args["query"].double()
    out = args["out"].double().clone()
    T, H, _ = out.shape
    KVH = args["key_cache"].shape[2]
    mass = torch.full((T, H, NS), float("nan"), dtype=torch.float64)
    scale = float(args["sm_scale"][0])
    rw = rewritten(args)
    for t in range(T):
        r = int(args["token_row"][t])
        if r < 0:
            continue
        p = int(args["token_pos"][t])
        s = int(args["token_slot"][t])
        j = torch.arange(p + 1)
        in_span = torch.stack([(j >= lo) & (j < hi) for lo, hi in args["spans"][r].tolist()])
        img = in_span.any(0)
        for h in range(H):
            kv = h // (H // KVH)
            K, V = dense_k[r][: p + 1, kv].double(), dense_v[r][: p + 1, kv].double()
            logits = K @ q[t, h] * scale
            w = torch.softmax(logits, 0)
            m_k = (in_span.double() * w).sum(1)  # plain mass per span
            if not rw[t, h]:
                mass[t, h] = m_k
                continue
            b = float(args["beta"][s, h])
            mode = int(args["logit_mode"][s]) if mode_override is None else mode_override
            if mode == 0:  # the closed form of "weights x beta, renormalised"
                m = float(w[img].sum())
                o = w @ V
                o_img = (w * img) @ V / m
                out[t, h] = (o + (b - 1) * m * o_img) / (1 + (b - 1) * m)
                mass[t, h] = b * m_k / (1 + (b - 1) * m)
            else:  # logit x beta, directly
                w2 = torch.softmax(torch.where(img, logits * b, logits), 0)
                out[t, h] = w2 @ V
                mass[t, h] = (in_span.double() * w2).sum(1)
    return out, mass


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=case_id)
def test_reference_matches_dense_attention(case, gen):
    """The reference against dense float64 attention: weight mode by its closed form,
    logit mode directly; the image mass rises with beta > 1 and falls with beta < 1."""
    args, dense = make_inputs(case, torch.float32, gen)
    want_out, want_mass = dense_expected(args, dense)
    ref = clone_all(args)
    reference.attn_image_boost(**ref)
    rw = rewritten(args)
    assert_close(ref["out"][rw], want_out[rw].float(), torch.float32, "reference out vs dense")
    for t in (args["cap_index"] >= 0).nonzero().flatten().tolist():
        if int(args["token_row"][t]) >= 0:
            row = ref["mass_buf"][int(args["cap_index"][t])]
            assert_close(row, want_mass[t].float(), torch.float32, f"reference mass of token {t}")

    # Monotonicity of the boost: the same heads, plain (beta 1) vs boosted.
    plain = clone_all(args)
    plain["beta"] = torch.ones_like(plain["beta"])
    reference.attn_image_boost(**plain)
    slot = args["token_slot"].long()
    checked = 0
    for t in (args["cap_index"] >= 0).nonzero().flatten().tolist():
        if int(args["token_row"][t]) < 0 or slot[t] < 0:
            continue
        c = int(args["cap_index"][t])
        b = args["beta"][slot[t]]
        if int(args["logit_mode"][slot[t]]) != 0:  # logit mode need not be monotonic
            continue
        boosted, base = ref["mass_buf"][c].sum(-1), plain["mass_buf"][c].sum(-1)
        mixed = rw[t] & (base > 1e-6) & (base < 1 - 1e-6)  # (all-image heads stay at 1)
        up, down = mixed & (b > 1), mixed & (b < 1)
        assert bool((boosted[up] > base[up]).all()) and bool((boosted[down] < base[down]).all())
        checked += int(up.sum() + down.sum())
    assert checked > 0


@pytest.mark.parametrize("case,mode", [(0, 0), (2, 1)], ids=["weight-closed-form", "logit-direct"])
def test_reference_every_slot_in_one_mode(gen, case, mode):
    """Every slot in weight mode: out and masses follow the closed form; every slot in
    logit mode: out = softmax(where(img, beta*l, l)) @ V, computed densely."""
    args, dense = make_inputs(CASES[case], torch.float32, gen)
    args["logit_mode"].fill_(mode)
    want_out, want_mass = dense_expected(args, dense)
    reference.attn_image_boost(**args)
    rw = rewritten(args)
    assert_close(args["out"][rw], want_out[rw].float(), torch.float32, "out")
    cap = args["cap_index"]
    for t in ((cap >= 0) & (args["token_row"] >= 0)).nonzero().flatten().tolist():
        assert_close(args["mass_buf"][int(cap[t])], want_mass[t].float(), torch.float32, "mass")


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

    from emosteer.ops import attn_boost

    want = list(inspect.signature(reference.attn_image_boost).parameters)
    assert list(inspect.signature(attn_boost.attn_image_boost).parameters) == want


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
