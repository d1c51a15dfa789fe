"""The cases of the attn_image_boost tests: batches of paged-cache rows and the op's
arguments built from them, which (token, head) pairs and capture rows the op must
write, its float64 expectation from dense attention, and one check of an implementation
against the reference.

The cases hold several batch rows with different spans (no image, one image, two
images, a span the query positions only partly see, one they do not reach), mixed slots
(beta = 1 heads, a slot whose betas are all 1, slot -1 tokens, both logit modes),
padding tokens (row -1, with a slot and a capture row they must not use), prefill-like
rows (many tokens per row, chunked: the first query position > 0) and decode-like rows
(one token each, contexts of several key tiles), GQA (12 heads on 4 KV heads, 13 on 1),
the odd shape (97 tokens, 13 heads, head_dim 80), head_dim 7, block sizes 16 and 32,
vLLM's CPU cache layout (keys a permuted view of ``[NB, KVH, D, BS]``, values of
``[NB, KVH, BS, D]``) and the plain one with queries sliced out of a fused qkv tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import emosteer.ops as ops
from emosteer.ops import reference
from tests.ops.op_cases import flag
from tests.utils import assert_close, assert_equal, env, poisoned, randn_nonzero

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


def case_id(case: Case) -> str:
    return case.name
