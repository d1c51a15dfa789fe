"""Triton kernels for residual-stream steering: a plain per-token add and the same add
folded into vLLM's fused add + RMSNorm.

``residual_add`` adds ``alpha[s]*u[s]`` to the rows of tokens with a slot;
``fused_add_rms_norm_steer`` is vLLM's ``fused_add_rms_norm`` (residual = x + residual
rounded to the dtype, x = rms_norm(residual) * weight) with that add folded into the sum,
so steering at a layer boundary costs no extra pass over the residual stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from emosteer.ops._triton_launch import LAUNCH_OPTIONS, add_combine, for_device


@triton.jit
def _residual_add_kernel(
    r_ptr,  # [T, d] contiguous, mutated
    slot_ptr,  # [T] int32
    alpha_ptr,  # [S] float32
    u_ptr,  # [S, d] r.dtype
    d,
    BLOCK: tl.constexpr,
):
    """``r[t] = r[t] + alpha[s]*u[s]``,  ``s = slot[t] >= 0``; slot -1 exits at once.

    Program (t, cb) handles columns ``cb*BLOCK ...`` of token t; float32 math, one
    rounding to r's dtype.
    """
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        s = slot.to(tl.int64)
        alpha = tl.load(alpha_ptr + s)
        r = tl.load(r_ptr + t * d + cols, mask=mask)
        u = tl.load(u_ptr + s * d + cols, mask=mask, other=0.0)
        out = r.to(tl.float32) + alpha * u.to(tl.float32)
        tl.store(r_ptr + t * d + cols, out.to(r_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_add_rms_norm_steer_kernel(
    x_ptr,  # [T, d] contiguous, layer output in, normed hidden out
    res_ptr,  # [T, d] contiguous, residual stream, mutated
    w_ptr,  # [d] RMSNorm weight
    slot_ptr,  # [T] int32
    alpha_ptr,  # [S] float32
    u_ptr,  # [S, d] x.dtype
    d,
    eps,
    BLOCK: tl.constexpr,
):
    """``res[t] = rnd(x[t] + res[t] + alpha[s]*u[s])``;  ``x[t] = rnd(rnd(res[t]*rstd)*w)``

    with ``rstd = 1/sqrt(mean(res[t]**2) + eps)``, ``rnd`` = rounding to the tensors'
    dtype, and the steering term present only when ``s = slot[t] >= 0``. One program
    per token, looping over the row in BLOCK chunks: pass 1 writes the rounded residual
    and accumulates its sum of squares, pass 2 reads it back (same thread, same
    addresses) and writes the normed row.
    """
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    s = slot.to(tl.int64)
    x_row = x_ptr + t * d
    res_row = res_ptr + t * d
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < d
        h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        h += tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
        if slot >= 0:
            u = tl.load(u_ptr + s * d + cols, mask=mask, other=0.0)
            h += tl.load(alpha_ptr + s) * u.to(tl.float32)
        h = h.to(res_ptr.dtype.element_ty)
        tl.store(res_row + cols, h, mask=mask)
        hf = h.to(tl.float32)
        acc += hf * hf
    # IEEE-rounded sqrt and divisions (tl.sqrt / `/` compile to approximations).
    mean_sq = tl.div_rn(tl.reduce(acc, 0, add_combine), d * 1.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < d
        h = tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(x_ptr.dtype.element_ty)
        normed = (h * rstd).to(x_ptr.dtype.element_ty)
        out = normed.to(tl.float32) * w.to(tl.float32)
        tl.store(x_row + cols, out.to(x_ptr.dtype.element_ty), mask=mask)


def residual_add(
    r: torch.Tensor,  # [T, d] residual stream, mutated
    token_slot: torch.Tensor,  # [T] int32, -1 = no intervention
    alpha: torch.Tensor,  # [S] float32 scale
    u: torch.Tensor,  # [S, d] r.dtype steering vectors
) -> None:
    """Triton launcher with the reference's signature; see ``reference.residual_add``."""
    assert r.dim() == 2 and r.is_contiguous(), "r must be a contiguous [T, d] tensor"
    T, d = r.shape
    S = alpha.shape[0]
    assert token_slot.dtype == torch.int32 and token_slot.shape == (T,)
    assert token_slot.is_contiguous()
    assert alpha.dtype == torch.float32 and alpha.dim() == 1 and alpha.is_contiguous()
    assert u.dtype == r.dtype and u.shape == (S, d) and u.is_contiguous()
    if T == 0:
        return
    block = min(triton.next_power_of_2(d), 4096)
    grid = (T, triton.cdiv(d, block))
    kernel = for_device(_residual_add_kernel, r.device)
    kernel[grid](r, token_slot, alpha, u, d, BLOCK=block, **LAUNCH_OPTIONS)


def fused_add_rms_norm_steer(
    x: torch.Tensor,  # [T, d] layer output (in) / normed hidden (out), mutated
    residual: torch.Tensor,  # [T, d] residual stream, mutated
    weight: torch.Tensor,  # [d] RMSNorm weight
    eps: float,
    token_slot: torch.Tensor,  # [T] int32, -1 = no steering (plain vLLM op)
    alpha: torch.Tensor,  # [S] float32
    u: torch.Tensor,  # [S, d] x.dtype
) -> None:
    """Triton launcher with the reference's signature; see
    ``reference.fused_add_rms_norm_steer``."""
    assert x.dim() == 2 and x.is_contiguous(), "x must be a contiguous [T, d] tensor"
    T, d = x.shape
    S = alpha.shape[0]
    assert residual.dtype == x.dtype and residual.shape == (T, d) and residual.is_contiguous()
    assert weight.shape == (d,) and weight.is_contiguous()
    assert token_slot.dtype == torch.int32 and token_slot.shape == (T,)
    assert token_slot.is_contiguous()
    assert alpha.dtype == torch.float32 and alpha.dim() == 1 and alpha.is_contiguous()
    assert u.dtype == x.dtype and u.shape == (S, d) and u.is_contiguous()
    if T == 0:
        return
    block = min(triton.next_power_of_2(d), 4096)
    num_warps = min(max(block // 256, 1), 16)
    kernel = for_device(_fused_add_rms_norm_steer_kernel, x.device)
    kernel[(T,)](
        x, residual, weight, token_slot, alpha, u, d, eps,
        BLOCK=block, num_warps=num_warps, **LAUNCH_OPTIONS,
    )
