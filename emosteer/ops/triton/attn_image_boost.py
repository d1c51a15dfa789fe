"""Triton kernel for VEE inside attention: image-key boosting over vLLM's paged KV cache.

``attn_image_boost`` runs after vLLM's own attention, on the same layer. For each
(token, query head) that needs it, one program recomputes that head's causal attention
straight from the paged cache and either rewrites ``out[t, h]`` with the boosted
attention or only writes the attention mass per image span (or both):

* token ``t`` belongs to batch row ``r = token_row[t]`` and sees keys ``0..token_pos[t]``;
  key ``j`` lives in physical block ``block_table[r, j // BS]``, offset ``j % BS``, KV
  head ``h // (H // KVH)`` (GQA). Every cache / query / block-table stride is a kernel
  argument, so vLLM's CPU layout (keys stored ``[NB, KVH, D, BS]``, seen through a
  permuted ``[NB, BS, KVH, D]`` view) and the GPU layout are read as they are;
* the program walks its keys in tiles of ``BLOCK_N`` with the online softmax (running
  max ``m``, denominator ``l``, value accumulator ``acc[D]``) plus one mass
  accumulator per image span (``BLOCK_NS`` >= NS, a power of two), rescaled by
  ``exp(m_old - m_new)`` exactly like ``l``; image-key logits get ``+ log(beta)``
  (``logit_mode`` 0) or ``* beta`` (any other mode) when the head is boosted;
* ``out[t, h]`` is stored (``acc / l``, one cast) only for boosted heads that see an
  image key, ``mass_buf[cap_index[t], h]`` (``mass / l``) only for captured tokens; all
  else is never written, so it stays bit-identical.

Whether anything happens is device data (``flag``, row / slot / capture -1, beta == 1,
the spans), read by the programs: a program with nothing to do exits after a few scalar
loads and the launcher never reads a tensor value, so the launch is CUDA-graph safe and
its grid, ``(T, H)``, depends on shapes only.

Reductions go through the builtin ``tl.reduce`` with ``tl.standard``'s own combine
functions rather than ``tl.sum`` / ``tl.max``: those are ``@triton.jit`` library
functions frozen in one form when ``triton.language`` is imported (see ``_launch``),
whereas the combine functions are resolved while the kernel runs (the interpreter
recognises them and reduces with numpy) or compiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from emosteer.ops.triton._launch import LAUNCH_OPTIONS, for_device


@triton.jit
def _attn_image_boost_kernel(
    out_ptr,  # [T, H, D] contiguous, mutated
    q_ptr,  # [T, H, D] out.dtype, strides stride_q*
    k_ptr,  # [NB, BS, KVH, D] out.dtype, strides stride_k*
    v_ptr,  # [NB, BS, KVH, D] out.dtype, strides stride_v*
    bt_ptr,  # [R, MB] int32, strides stride_bt*
    row_ptr,  # [T] int32, -1 = skip the token
    pos_ptr,  # [T] int32 position: the token sees keys 0..pos
    slot_ptr,  # [T] int32, -1 = no boost
    beta_ptr,  # [S, H] float32
    mode_ptr,  # [S] int32, 0 = logit + log(beta), else logit * beta
    spans_ptr,  # [R, NS, 2] int32 contiguous, [start, end) image key spans
    cap_index_ptr,  # [T] int32, -1 = no capture
    mass_ptr,  # [C, H, NS] float32 contiguous, mutated
    scale_ptr,  # [1] float32 softmax scale
    flag_ptr,  # [1] int32, 0 = do nothing
    H,
    D,
    NS,
    BS,  # cache block size
    GROUP,  # query heads per KV head, H // KVH
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_btr,
    stride_btb,
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,  # >= D, power of two
    BLOCK_NS: tl.constexpr,  # >= NS, power of two
):
    """Program (t, h): token t, query head h; see the module docstring.

    ``rewrite`` = slot >= 0, beta[slot, h] != 1 and t sees a key of a non-empty span;
    the program returns at once unless ``rewrite`` or ``cap_index[t] >= 0``. Masked
    keys (j > pos, tile padding) get logit -inf; should every key so far be -inf (a
    logit overflowing to -inf), the softmax shift is 0 instead of -inf, so exp never
    sees -inf - -inf. float32 math; out is cast once.
    """
    flag = tl.load(flag_ptr)
    # No `mask & (slot >= 0)`: the 3.9 interpreter rejects load / store masks built from
    # loaded scalars, so the per-program conditions are branches on device data instead.
    # Indices are int64 from the start: offsets into a large cache exceed 2**31, and the
    # interpreter checks every int32 product for overflow (slow), never int64 ones.
    if flag != 0:
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        row = tl.load(row_ptr + t)
        slot = tl.load(slot_ptr + t)
        cap = tl.load(cap_index_ptr + t)
        if (row >= 0) & ((slot >= 0) | (cap >= 0)):
            beta = tl.load(scale_ptr) * 0.0 + 1.0  # float32 1, typed like the loads below
            mode = slot * 0
            if slot >= 0:
                beta = tl.load(beta_ptr + slot.to(tl.int64) * H + h)
                mode = tl.load(mode_ptr + slot)
            # beta != 1 implies slot >= 0 (beta stays 1 without a slot).
            if (beta != 1.0) | (cap >= 0):
                r = row.to(tl.int64)
                pos = tl.load(pos_ptr + t).to(tl.int64)
                # The row's spans; padding spans are [0, 0), i.e. empty.
                ks = tl.arange(0, BLOCK_NS).to(tl.int64)
                ks_ok = ks < NS
                span_ptr = spans_ptr + (r * NS + ks) * 2
                lo = tl.load(span_ptr, mask=ks_ok, other=0).to(tl.int64)
                hi = tl.load(span_ptr + 1, mask=ks_ok, other=0).to(tl.int64)
                first = tl.maximum(lo, 0)  # first key of the span (keys are >= 0)
                seen = ((first < hi) & (first <= pos)).to(tl.int32)
                sees_image = tl.reduce(seen, 0, tl.standard._elementwise_max) > 0
                rewrite = (beta != 1.0) & sees_image
                if rewrite | (cap >= 0):
                    # Image-key logits become x * mul + add: (1, log beta) in mode 0,
                    # (beta, 0) in logit mode, (1, 0) -- unchanged -- without a rewrite.
                    mul = tl.where(rewrite & (mode != 0), beta, 1.0)
                    add = tl.where(rewrite & (mode == 0), tl.log(beta), 0.0)
                    scale = tl.load(scale_ptr)
                    dims = tl.arange(0, BLOCK_D).to(tl.int64)
                    d_ok = dims < D
                    kvh = h // GROUP
                    q = tl.load(q_ptr + t * stride_qt + h * stride_qh + dims * stride_qd,
                                mask=d_ok, other=0.0).to(tl.float32)
                    k_base = k_ptr + kvh * stride_kh + dims[None, :] * stride_kd
                    v_base = v_ptr + kvh * stride_vh + dims[None, :] * stride_vd
                    bt_row = bt_ptr + r * stride_btr
                    # Loop invariants broadcast once (each op costs in the interpreter).
                    q_row = q[None, :]
                    d_ok_row = d_ok[None, :]
                    lo_row = lo[None, :]
                    hi_row = hi[None, :]
                    keys = tl.arange(0, BLOCK_N).to(tl.int64)
                    neg_inf = float("-inf")
                    m = scale * 0.0 + neg_inf  # running max (a float32 scalar)
                    den = scale * 0.0  # running softmax denominator
                    acc = tl.full([BLOCK_D], 0.0, tl.float32)
                    mass = tl.full([BLOCK_NS], 0.0, tl.float32)
                    for start in range(0, pos + 1, BLOCK_N):
                        j = start + keys
                        valid = j <= pos
                        blk = tl.load(bt_row + (j // BS) * stride_btb, mask=valid,
                                      other=0).to(tl.int64)
                        off = j % BS
                        kv_mask = valid[:, None] & d_ok_row
                        k_off = (blk * stride_kb + off * stride_ks)[:, None]
                        k = tl.load(k_base + k_off, mask=kv_mask, other=0.0).to(tl.float32)
                        x = tl.reduce(k * q_row, 1, tl.standard._sum_combine) * scale
                        j_col = j[:, None]
                        in_span = (j_col >= lo_row) & (j_col < hi_row)  # [BLOCK_N, BLOCK_NS]
                        if rewrite:
                            img = tl.reduce(in_span.to(tl.int32), 1,
                                            tl.standard._elementwise_max) > 0
                            x = tl.where(img, x * mul + add, x)
                        x = tl.where(valid, x, neg_inf)
                        m_new = tl.maximum(m, tl.reduce(x, 0, tl.standard._elementwise_max))
                        shift = tl.where(m_new == neg_inf, 0.0, m_new)
                        alpha = tl.exp(m - shift)
                        w = tl.exp(x - shift)  # 0 for masked keys
                        den = den * alpha + tl.reduce(w, 0, tl.standard._sum_combine)
                        if cap >= 0:
                            span_w = tl.where(in_span, w[:, None], 0.0)
                            mass = mass * alpha + tl.reduce(span_w, 0, tl.standard._sum_combine)
                        if rewrite:
                            v_off = (blk * stride_vb + off * stride_vs)[:, None]
                            v = tl.load(v_base + v_off, mask=kv_mask, other=0.0).to(tl.float32)
                            acc = acc * alpha + tl.reduce(w[:, None] * v, 0,
                                                          tl.standard._sum_combine)
                        m = m_new
                    if rewrite:
                        o = acc / den
                        tl.store(out_ptr + t * H * D + h * D + dims,
                                 o.to(out_ptr.dtype.element_ty), mask=d_ok)
                    if cap >= 0:
                        tl.store(mass_ptr + (cap.to(tl.int64) * H + h) * NS + ks, mass / den,
                                 mask=ks_ok)


def _block_n(block_d: int) -> int:
    """Keys per tile: a [BLOCK_N, BLOCK_D] tile of at most 8192 elements, 16..64 keys."""
    return max(16, min(64, 8192 // block_d))


def attn_image_boost(
    out: torch.Tensor,  # [T, H, D] attention output (o_proj input), mutated
    query: torch.Tensor,  # [T, H, D] queries after rotary embedding (any strides)
    key_cache: torch.Tensor,  # [NB, BS, KVH, D] paged keys (any strides)
    value_cache: torch.Tensor,  # [NB, BS, KVH, D] paged values (any strides)
    block_table: torch.Tensor,  # [R, MB] int32
    token_row: torch.Tensor,  # [T] int32, -1 = skip
    token_pos: torch.Tensor,  # [T] int32
    token_slot: torch.Tensor,  # [T] int32, -1 = no boost
    beta: torch.Tensor,  # [S, H] float32
    logit_mode: torch.Tensor,  # [S] int32
    spans: torch.Tensor,  # [R, NS, 2] int32
    cap_index: torch.Tensor,  # [T] int32, -1 = no capture
    mass_buf: torch.Tensor,  # [C, H, NS] float32, mutated
    sm_scale: torch.Tensor,  # [1] float32
    flag: torch.Tensor,  # [1] int32, 0 = do nothing
) -> None:
    """Triton launcher with the reference's signature; see ``reference.attn_image_boost``."""
    assert out.dim() == 3 and out.is_contiguous(), "out must be a contiguous [T, H, D] tensor"
    T, H, D = out.shape
    assert query.dtype == out.dtype and query.shape == (T, H, D)
    assert key_cache.dim() == 4 and key_cache.dtype == out.dtype and key_cache.shape[3] == D
    NB, BS, KVH, _ = key_cache.shape
    assert value_cache.dtype == out.dtype and value_cache.shape == key_cache.shape
    assert KVH > 0 and H % KVH == 0, "H must be a multiple of the KV heads"
    assert block_table.dtype == torch.int32 and block_table.dim() == 2
    R = block_table.shape[0]
    assert spans.dtype == torch.int32 and spans.dim() == 3 and spans.shape[2] == 2
    assert spans.shape[0] >= R and spans.is_contiguous()
    NS = spans.shape[1]
    S = beta.shape[0]
    assert beta.dtype == torch.float32 and beta.shape == (S, H) and beta.is_contiguous()
    assert logit_mode.dtype == torch.int32 and logit_mode.shape == (S,)
    assert logit_mode.is_contiguous()
    assert mass_buf.dtype == torch.float32 and mass_buf.dim() == 3
    assert mass_buf.shape[1:] == (H, NS) and mass_buf.is_contiguous()
    for idx in (token_row, token_pos, token_slot, cap_index):
        assert idx.dtype == torch.int32 and idx.shape == (T,) and idx.is_contiguous()
    assert sm_scale.dtype == torch.float32 and sm_scale.shape == (1,)
    assert flag.dtype == torch.int32 and flag.shape == (1,)
    if T == 0 or H == 0:
        return
    block_d = triton.next_power_of_2(D)
    grid = (T, H)
    for_device(_attn_image_boost_kernel, out.device)[grid](
        out, query, key_cache, value_cache, block_table, token_row, token_pos, token_slot,
        beta, logit_mode, spans, cap_index, mass_buf, sm_scale, flag,
        H, D, NS, BS, H // KVH,
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(),
        BLOCK_N=_block_n(block_d), BLOCK_D=block_d,
        BLOCK_NS=triton.next_power_of_2(max(NS, 1)), **LAUNCH_OPTIONS,
    )
