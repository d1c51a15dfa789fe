"""Torch reference implementations of the fused steering operators.

Every op here has exactly the signature of its fused twins (Triton, CUDA, C++ CPU),
mutates its outputs in place and returns ``None``. Math is done in float32, each product
rounded before a sum, and cast back once, which is what the kernels do. Tests compare
every kernel against these.

State model: a *vector pool* of rows shared by all requests, and per-slot tables that
hold only indices into it (``vrow`` / ``urow`` / ``nrow``, -1 = no vector) plus scalar
coefficients. A request's slot therefore costs a few numbers, not a copy of its
vectors, and several slots may use the same pool row. A device-side ``flag`` ([1]
int32) switches a whole op off: with ``flag[0] == 0`` nothing is read or written, so
a layer without any intervention costs one tiny read per program.

Index layout, a running example with 4 tokens from 3 requests::

    token_slot = [-1, 0, 2, 1]   # token 0 untouched, tokens 1..3 use slots 0, 2, 1
    cap_index  = [ 5, -1, -1, 0]  # token 0 captured into row 5, token 3 into row 0
    vrow[2, h] = 3               # slot 2 uses pool row 3 for head h (-1: v = 0)

There is no fused add + RMSNorm or SiluAndMul variant any more (there were
``fused_add_rms_norm_steer`` and ``silu_and_mul_gain``): their slot -1 output is not
guaranteed bit-equal to vLLM's own fused add+RMSNorm / SiluAndMul kernels on each
platform, so the plugin runs the un-fused in-place ops (``residual_steer``,
``neuron_gain``) right after vLLM's own; dead fused variants are deleted rather than
kept.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "head_affine_capture",
    "residual_steer",
    "neuron_gain",
    "attn_image_boost",
    "probe_gate",
]


def _off(flag: torch.Tensor) -> bool:
    return int(flag[0]) == 0


def head_affine_capture(
    z: torch.Tensor,  # [T, H, D] attention output before o_proj, mutated
    token_slot: torch.Tensor,  # [T] int32, -1 = no intervention
    a: torch.Tensor,  # [S, H] float32 multiplicative coefficient
    b: torch.Tensor,  # [S, H] float32 coefficient of v
    c: torch.Tensor,  # [S, H] float32 coefficient of |z[t,h]| * v (relative add), 0 = none
    vrow: torch.Tensor,  # [S, H] int32 pool row of v per slot and head, -1 = v is 0
    row_off: torch.Tensor,  # [T] int32 added to the token's pool rows (0 = the slot's own)
    pool: torch.Tensor,  # [P, H, D] z.dtype head vectors
    cap_index: torch.Tensor,  # [T] int32, -1 = no capture
    cap_buf: torch.Tensor,  # [C, H, D] z.dtype capture rows, mutated
    flag: torch.Tensor,  # [1] int32, 0 = the op does nothing at all
) -> None:
    """``z[t,h] = a[s,h]*z[t,h] + w*v`` with ``s = token_slot[t] >= 0``,
    ``v = pool[vrow[s,h] + row_off[t], h]`` (zeros where ``vrow[s,h] == -1``, whatever
    ``row_off[t]``; elsewhere the sum must be a row of the pool) and ``w = b[s,h]`` where
    ``c[s,h] == 0``, else ``w = b[s,h] + c[s,h]*n`` with ``n = ||z[t,h]||`` (float32, the
    head's output before the update). With ``c = scale / ||v||`` the add is relative:
    ``scale * ||z[t,h]|| * v / ||v||``, a fraction of the head's own norm.

    ``row_off`` lets one slot read a run of rows, one per token: a position-aligned
    head patch (one vector per listed prompt position) stores its vectors in
    consecutive pool rows, and its k-th listed position gets ``row_off = k``.

    Before the update, ``z[t]`` is copied to ``cap_buf[cap_index[t]]`` where
    ``cap_index[t] >= 0``. With ``flag[0] == 0`` neither happens.
    """
    if _off(flag):
        return
    cap = cap_index >= 0
    if bool(cap.any()):
        cap_buf[cap_index[cap].long()] = z[cap]
    sel = token_slot >= 0
    if not bool(sel.any()):
        return
    s = token_slot[sel].long()
    zz = z[sel].float()
    rows = vrow[s].long()  # [n, H]
    if pool.shape[0] > 0:
        heads = torch.arange(z.shape[1], device=z.device)
        at = torch.where(rows >= 0, rows + row_off[sel].long().unsqueeze(1), 0)
        v = pool[at, heads].float()  # [n, H, D]
        v = torch.where((rows >= 0).unsqueeze(-1), v, 0.0)
    else:
        v = torch.zeros_like(zz)
    cs = c[s].float()  # [n, H]
    norm = torch.linalg.vector_norm(zz, dim=-1)  # [n, H]
    w = torch.where(cs != 0, b[s].float() + cs * norm, b[s].float())
    out = a[s].float().unsqueeze(-1) * zz + w.unsqueeze(-1) * v
    # A head with a == 1, b == 0 and c == 0 is left bit-identical (also -0.0 and NaN).
    keep = ((a[s] == 1) & (b[s] == 0) & (c[s] == 0)).unsqueeze(-1)
    z[sel] = torch.where(keep, z[sel], out.to(z.dtype))


# Term modes of ``residual_steer`` (``mode[s, k]``): the low bits pick the rule, bit 2
# makes the scale relative to the norm of the residual being steered.
RES_ADD, RES_CLAMP, RES_PROJECT_OUT = 0, 1, 2
RES_RELATIVE = 4
RES_MODES = {"add": RES_ADD, "clamp": RES_CLAMP, "project_out": RES_PROJECT_OUT}


def residual_steer(
    r: torch.Tensor,  # [T, d] residual stream (or one addend of it), mutated
    x: torch.Tensor,  # [T, d] r.dtype the other addend (h = x + r), zeros if r is all of h
    token_slot: torch.Tensor,  # [T] int32, -1 = no intervention
    coef: torch.Tensor,  # [S, K] float32 scale (add), target (clamp) per term
    mode: torch.Tensor,  # [S, K] int32 RES_ADD | RES_CLAMP | RES_PROJECT_OUT, + RES_RELATIVE
    urow: torch.Tensor,  # [S, K] int32 pool row per term, -1 = no term
    pool: torch.Tensor,  # [P, d] r.dtype vectors (unit length for clamp / project_out / relative)
    flag: torch.Tensor,  # [1] int32, 0 = the op does nothing at all
) -> None:
    """Steer the residual ``h = x + r`` of each token ``t`` whose slot
    ``s = token_slot[t] >= 0`` has terms (``urow[s, k] >= 0``) by updating its addend
    ``r`` (vLLM forms the sum inside its fused add + RMSNorm, after this op). With
    ``h = x[t] + r[t]`` (float32), ``n = ||h||`` and, per term, ``u_k = pool[urow[s, k]]``
    and ``c_k = h . u_k``::

        w_k = coef            (add)          coef * n            (add, relative)
              coef - c_k      (clamp)        coef * n - c_k      (clamp, relative)
              -c_k            (project_out)
        r[t] = r[t] + w_0 * u_0 + w_1 * u_1 + ...   (terms in k order, -1 rows skipped)

    Every term reads the residual entering the op, so ``project_out`` over k orthonormal
    rows removes their span and a clamp sets the component along ``u`` (unit) to its
    target. Float32 math, each product rounded before its sum, one rounding to r's
    dtype; tokens without a slot or without terms are left bit-identical. A single add
    term is ``r + coef * u``, the plain steering add.
    """
    if _off(flag):
        return
    sel = token_slot >= 0
    if not bool(sel.any()):
        return
    tok = torch.nonzero(sel).flatten()
    s = token_slot[tok].long()
    rows = urow[s]  # [n, K]
    has = (rows >= 0).any(1)
    tok, s, rows = tok[has], s[has], rows[has]
    if tok.numel() == 0:
        return
    x = r[tok].float() + x[tok].float()  # [n, d] the residual h
    base = mode[s] & 3
    rel = (mode[s] & RES_RELATIVE) != 0
    norm = torch.linalg.vector_norm(x, dim=1)  # [n]
    out = r[tok].float()
    for k in range(rows.shape[1]):
        on = rows[:, k] >= 0
        if not bool(on.any()):
            continue
        u = pool[rows[:, k].clamp(min=0).long()].float()  # [n, d]
        c = (x * u).sum(1)
        a = coef[s, k].float()
        target = torch.where(rel[:, k], a * norm, a)
        w = torch.where(base[:, k] == RES_ADD, target,
                        torch.where(base[:, k] == RES_CLAMP, target - c, -c))
        step = w.unsqueeze(1) * u
        out = torch.where(on.unsqueeze(1), out + step, out)
    r[tok] = out.to(r.dtype)


def probe_gate(
    h: torch.Tensor,  # [T, d] residual stream the probe reads
    token_slot: torch.Tensor,  # [T] int32, mutated: -1 where the gate is closed
    prow: torch.Tensor,  # [S] int32 probe row per slot at this layer, -1 = no gate here
    probes: torch.Tensor,  # [P, d] float32 probe directions w
    bias: torch.Tensor,  # [S] float32 probe bias b
    thresh: torch.Tensor,  # [S] float32 threshold
    gmode: torch.Tensor,  # [S] int32 bit 0: 1 = open below the threshold (else above); bit 1: latch
    state_row: torch.Tensor,  # [T] int32 latch-state row of each token's request, -1 = none
    state: torch.Tensor,  # [R] int32 latch state per request (1 = has held), mutated
    score_index: torch.Tensor,  # [T] int32 row of score_buf, -1 = no capture
    score_buf: torch.Tensor,  # [C] float32 captured scores, mutated
    flag: torch.Tensor,  # [1] int32, 0 = the op does nothing at all
) -> None:
    """Probe-gated steering: for each token ``t`` whose slot ``s = token_slot[t] >= 0``
    has a probe here (``prow[s] >= 0``) the score ``p = h[t] . probes[prow[s]] + bias[s]``
    (float32) decides whether the slot keeps acting on ``t`` in the later layers. It
    *holds* when ``p > thresh[s]`` (``p < thresh[s]`` with bit 0 of ``gmode[s]``). The
    gate is open where it holds; with the latch bit (and ``g = state_row[t] >= 0``) it is
    open where it holds at ``t`` or held at an earlier token of the same request: in an
    earlier step (``state[g] == 1``) or earlier in this step (tokens of a request are
    contiguous and in position order), and ``state[g]`` becomes 1 once it holds. Where
    the gate is closed ``token_slot[t]`` is set to -1, so every op of the later layers
    leaves the token alone. ``score_buf[score_index[t]]`` receives ``p`` where
    ``score_index[t] >= 0`` (whether or not the gate opens). Other tokens are untouched.
    """
    if _off(flag):
        return
    T = token_slot.shape[0]
    if T == 0:
        return
    slot = token_slot.clone()
    active = slot >= 0
    rows = torch.full_like(slot, -1)
    rows[active] = prow[slot[active].long()]
    gated = rows >= 0
    if not bool(gated.any()):
        return
    tok = torch.nonzero(gated).flatten()
    s = slot[tok].long()
    w = probes[rows[tok].long()].float()
    p = (h[tok].float() * w).sum(1) + bias[s]
    cap = score_index[tok]
    if bool((cap >= 0).any()):
        score_buf[cap[cap >= 0].long()] = p[cap >= 0]
    below = (gmode[s] & 1) != 0
    hold = torch.where(below, p < thresh[s], p > thresh[s])
    latch = ((gmode[s] & 2) != 0) & (state_row[tok] >= 0)
    opened = hold.clone()
    seen: dict[int, bool] = {}
    for i in range(tok.numel()):  # the latch: a running OR per request, in token order
        if not bool(latch[i]):
            continue
        g = int(state_row[tok[i]])
        was = seen.get(g, bool(state[g] != 0))
        now = was or bool(hold[i])
        seen[g] = now
        opened[i] = now
    for g, now in seen.items():
        if now:
            state[g] = 1
    closed = tok[~opened]
    token_slot[closed] = -1


def neuron_gain(
    m: torch.Tensor,  # [T, I] MLP activations, mutated
    token_slot: torch.Tensor,  # [T] int32, -1 = no intervention
    gamma: torch.Tensor,  # [S] float32 gain of the masked neurons
    nrow: torch.Tensor,  # [S] int32 row of masks per slot, -1 = no gain
    masks: torch.Tensor,  # [P, I] float32 neuron masks (weights, usually 0 / 1)
    flag: torch.Tensor,  # [1] int32, 0 = the op does nothing at all
) -> None:
    """``m[t,i] = g*m[t,i]`` with ``g = 1 + (gamma[s]-1)*masks[nrow[s], i]`` for
    ``s = token_slot[t] >= 0`` and ``nrow[s] >= 0``. Elements with ``g == 1`` (and
    all other tokens) are left bit-identical."""
    if _off(flag):
        return
    sel = token_slot >= 0
    if not bool(sel.any()):
        return
    rows = torch.full_like(token_slot, -1)
    rows[sel] = nrow[token_slot[sel].long()]
    sel = rows >= 0
    if not bool(sel.any()):
        return
    s = token_slot[sel].long()
    # Rounded in this order by every kernel: gamma - 1, times the mask, plus 1.
    g = 1.0 + (gamma[s].float() - 1.0).unsqueeze(-1) * masks[rows[sel].long()].float()
    out = (m[sel].float() * g).to(m.dtype)
    m[sel] = torch.where(g == 1, m[sel], out)


def attn_image_boost(
    out: torch.Tensor,  # [T, H, D] attention output of the layer (o_proj input), mutated
    query: torch.Tensor,  # [T, H, D] queries after rotary embedding (any strides)
    key_cache: torch.Tensor,  # [NB, BS, KVH, D] paged keys (any strides)
    value_cache: torch.Tensor,  # [NB, BS, KVH, D] paged values (any strides)
    block_table: torch.Tensor,  # [R, MB] int32 physical block of each logical block, per row
    token_row: torch.Tensor,  # [T] int32 batch row (block table / spans row), -1 = skip
    token_pos: torch.Tensor,  # [T] int32 position in its sequence: it sees keys 0..pos
    token_slot: torch.Tensor,  # [T] int32, -1 = no boost
    beta: torch.Tensor,  # [S, H] float32 boost of image keys, > 0, 1 = none
    logit_mode: torch.Tensor,  # [S] int32, 0 = weights x beta (logit + log beta), else logit x beta
    spans: torch.Tensor,  # [R, NS, 2] int32 image key spans [start, end); start >= end = none
    cap_index: torch.Tensor,  # [T] int32 row of mass_buf, -1 = no capture
    mass_buf: torch.Tensor,  # [C, H, NS] float32 attention mass per image span, mutated
    sm_scale: torch.Tensor,  # [1] float32 softmax scale (1/sqrt(D) for most models)
    flag: torch.Tensor,  # [1] int32, 0 = the op does nothing at all
) -> None:
    """VEE inside attention, and the attention mass on image keys, for selected tokens.

    Token ``t`` (row ``r = token_row[t] >= 0``, position ``p = token_pos[t]``) attends
    causally to keys ``j = 0..p`` of its sequence, read from the paged cache through
    ``block_table[r, j // BS]``; query head ``h`` reads key/value head ``h // (H // KVH)``.
    With ``s = token_slot[t] >= 0`` and ``beta[s, h] != 1`` the logit of every image key
    (``j`` in a span of row ``r``) becomes ``l_j + log(beta)`` (``logit_mode[s] == 0``:
    the softmax weight is multiplied by beta, then all weights renormalised) or
    ``beta * l_j`` (``logit_mode[s] == 1``), and ``out[t, h]`` is rewritten with that
    attention. It is rewritten only then, and only when ``t`` sees at least one image
    key; every other (token, head) is left bit-identical, so beta = 1 is exactly plain
    attention. Where ``cap_index[t] >= 0``, ``mass_buf[cap_index[t], h, k]`` receives the
    softmax mass of the keys of span ``k`` (0 for empty spans) under the attention the
    token actually runs with. Math in float32; ``out`` is cast once.
    """
    if _off(flag):
        return
    T, H, D = out.shape
    if T == 0:
        return
    BS, KVH = key_cache.shape[1], key_cache.shape[2]
    group = H // KVH
    scale = float(sm_scale[0])
    NS = spans.shape[1]
    for t in range(T):
        r = int(token_row[t])
        if r < 0:
            continue
        s = int(token_slot[t])
        c = int(cap_index[t])
        boosted = s >= 0 and bool((beta[s] != 1).any())
        if not boosted and c < 0:
            continue
        p = int(token_pos[t])
        j = torch.arange(p + 1, device=out.device)
        blocks = block_table[r, j // BS].long()
        k = key_cache[blocks, j % BS].float()  # [p+1, KVH, D]
        v = value_cache[blocks, j % BS].float()
        in_span = torch.zeros((NS, p + 1), dtype=torch.bool, device=out.device)
        for n in range(NS):
            lo, hi = int(spans[r, n, 0]), int(spans[r, n, 1])
            if lo < hi:
                in_span[n] = (j >= lo) & (j < hi)
        img = in_span.any(0)
        sees_image = bool(img.any())
        q = query[t].float()  # [H, D]
        for h in range(H):
            kv = h // group
            logits = (k[:, kv] @ q[h]) * scale
            b = float(beta[s, h]) if s >= 0 else 1.0
            rewrite = s >= 0 and b != 1.0 and sees_image
            if rewrite:
                if int(logit_mode[s]) == 0:
                    logits = torch.where(img, logits + math.log(b), logits)
                else:
                    logits = torch.where(img, logits * b, logits)
            w = torch.softmax(logits, dim=0)
            if rewrite:
                out[t, h] = (w @ v[:, kv]).to(out.dtype)
            if c >= 0:
                mass_buf[c, h] = (in_span.float() * w).sum(1)
