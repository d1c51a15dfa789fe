"""Triton kernel for residual-stream steering: add, clamp and project-out terms per token.

``residual_steer`` steers the residual ``h = x[t] + r[t]`` of each token whose slot has
terms (``urow[s, k] >= 0``) by rewriting its addend ``r[t]`` as
``r[t] + sum_k w_k * u_k`` with ``u_k = pool[urow[s, k]]``, where ``w_k`` is the term's
scale (add), its target minus the component ``c_k = h . u_k`` (clamp) or ``-c_k``
(project_out), the scale or target optionally times ``||h||`` (relative). ``x`` is only
read (vLLM forms the sum in its fused add + RMSNorm, after this op). ``flag[0] == 0``
and slot / row -1 are device-side data, never a Python branch, so the launch is
CUDA-graph safe and its grid, ``(T,)``, depends on shapes only.

One program per token walks the row in chunks of ``BLOCK``: first, where some term is
not an absolute add, ``||h||^2`` and the dot products (a ``[KB, BLOCK]`` tile of the
pool rows against the chunk; ``x`` is read only there); then it writes the terms in k
order, each product rounded to float32 before its sum, one cast to r's dtype.
Reductions use the builtin ``tl.reduce`` with ``tl.standard``'s combine functions (see
``attn_image_boost``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from emosteer.ops.triton._launch import LAUNCH_OPTIONS, for_device


@triton.jit
def _residual_steer_kernel(
    r_ptr,  # [T, d] contiguous, mutated
    x_ptr,  # [T, d] r.dtype contiguous, the other addend (h = x + r), read only
    slot_ptr,  # [T] int32
    coef_ptr,  # [S, K] float32
    mode_ptr,  # [S, K] int32: bits 0-1 add / clamp / project_out, bit 2 relative
    urow_ptr,  # [S, K] int32, -1 = no term
    pool_ptr,  # [P, d] r.dtype
    flag_ptr,  # [1] int32, 0 = do nothing
    d,
    K: tl.constexpr,  # terms per slot
    KB: tl.constexpr,  # >= K, power of two
    BLOCK: tl.constexpr,  # columns per chunk, power of two
):
    """Program t: token t; it exits at once when ``flag`` is 0, the slot is -1 or the
    slot has no term. ``w_k`` of an absolute add is ``coef`` itself, so a token whose
    terms are all absolute adds rounds exactly like the reference."""
    flag = tl.load(flag_ptr)
    if flag != 0:
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            s = slot.to(tl.int64)
            ks = tl.arange(0, KB)
            k_ok = ks < K
            rows = tl.load(urow_ptr + s * K + ks, mask=k_ok, other=-1)
            if tl.reduce(rows, 0, tl.standard._elementwise_max) >= 0:
                on = rows >= 0
                modes = tl.load(mode_ptr + s * K + ks, mask=k_ok, other=0)
                # The first pass only where some term reads ||h|| or c_k.
                need = on & (modes != 0)
                rows64 = tl.where(on, rows, 0).to(tl.int64)
                row_t = r_ptr + t * d
                xrow_t = x_ptr + t * d
                cols0 = tl.arange(0, BLOCK)
                norm = tl.full([], 0.0, tl.float32)
                c = tl.full([KB], 0.0, tl.float32)
                if tl.reduce(need.to(tl.int32), 0, tl.standard._elementwise_max) > 0:
                    sq = tl.full([BLOCK], 0.0, tl.float32)
                    for start in range(0, d, BLOCK):
                        cols = start + cols0
                        c_ok = cols < d
                        h = (tl.load(xrow_t + cols, mask=c_ok, other=0.0).to(tl.float32)
                             + tl.load(row_t + cols, mask=c_ok, other=0.0).to(tl.float32))
                        sq += h * h
                        u = tl.load(pool_ptr + rows64[:, None] * d + cols[None, :],
                                    mask=need[:, None] & c_ok[None, :], other=0.0)
                        c += tl.reduce(h[None, :] * u.to(tl.float32), 1,
                                       tl.standard._sum_combine)
                    norm = tl.sqrt_rn(tl.reduce(sq, 0, tl.standard._sum_combine))
                for start in range(0, d, BLOCK):
                    cols = start + cols0
                    c_ok = cols < d
                    out = tl.load(row_t + cols, mask=c_ok, other=0.0).to(tl.float32)
                    for k in tl.static_range(K):
                        row = tl.load(urow_ptr + s * K + k)
                        if row >= 0:
                            a = tl.load(coef_ptr + s * K + k)
                            mode = tl.load(mode_ptr + s * K + k)
                            ck = tl.reduce(tl.where(ks == k, c, 0.0), 0, tl.standard._sum_combine)
                            target = tl.where((mode & 4) != 0, a * norm, a)
                            base = mode & 3
                            w = tl.where(base == 0, target, tl.where(base == 1, target - ck, -ck))
                            u = tl.load(pool_ptr + row.to(tl.int64) * d + cols, mask=c_ok,
                                        other=0.0)
                            out = out + w * u.to(tl.float32)
                    tl.store(row_t + cols, out.to(r_ptr.dtype.element_ty), mask=c_ok)


def residual_steer(
    r: torch.Tensor,  # [T, d] residual stream (or one addend of it), mutated
    x: torch.Tensor,  # [T, d] r.dtype the other addend (h = x + r)
    token_slot: torch.Tensor,  # [T] int32, -1 = no intervention
    coef: torch.Tensor,  # [S, K] float32 scale (add), target (clamp) per term
    mode: torch.Tensor,  # [S, K] int32 RES_ADD | RES_CLAMP | RES_PROJECT_OUT, + RES_RELATIVE
    urow: torch.Tensor,  # [S, K] int32 pool row per term, -1 = no term
    pool: torch.Tensor,  # [P, d] r.dtype vectors
    flag: torch.Tensor,  # [1] int32, 0 = do nothing
) -> None:
    """Triton launcher with the reference's signature; see ``reference.residual_steer``."""
    assert r.dim() == 2 and r.is_contiguous(), "r must be a contiguous [T, d] tensor"
    T, d = r.shape
    assert x.dtype == r.dtype and x.shape == r.shape and x.is_contiguous()
    assert coef.dtype == torch.float32 and coef.dim() == 2 and coef.is_contiguous()
    S, K = coef.shape
    assert token_slot.dtype == torch.int32 and token_slot.shape == (T,)
    assert token_slot.is_contiguous()
    for t in (mode, urow):
        assert t.dtype == torch.int32 and t.shape == (S, K) and t.is_contiguous()
    assert pool.dtype == r.dtype and pool.dim() == 2 and pool.shape[1] == d
    assert pool.is_contiguous()
    assert flag.dtype == torch.int32 and flag.shape == (1,)
    if T == 0 or d == 0 or K == 0:
        return
    kb = triton.next_power_of_2(K)
    # A [KB, BLOCK] tile of pool rows per chunk: at most 8192 elements.
    block = min(triton.next_power_of_2(d), max(256, 8192 // kb), 4096)
    kernel = for_device(_residual_steer_kernel, r.device)
    kernel[(T,)](r, x, token_slot, coef, mode, urow, pool, flag, d, K=K, KB=kb, BLOCK=block,
                 **LAUNCH_OPTIONS)
