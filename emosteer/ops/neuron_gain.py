"""Triton kernels for per-request MLP neuron gains (ENA, emotional neuron augmentation).

``neuron_gain`` scales the MLP activation ``m[T, I]`` in place; ``silu_and_mul_gain`` is
vLLM's SiluAndMul (``silu(gate) * up``) with the gain folded in, so augmenting neurons
costs no extra pass. A gain of exactly 1 leaves an element bit-identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from emosteer.ops._triton_launch import LAUNCH_OPTIONS, for_device


@triton.jit
def _neuron_gain_kernel(
    m_ptr,  # [T, I] contiguous, mutated
    slot_ptr,  # [T] int32
    g_ptr,  # [S, I] float32
    I,
    BLOCK: tl.constexpr,
):
    """``m[t,i] = g[s,i]*m[t,i]``,  ``s = slot[t] >= 0``; slot -1 exits at once.

    Program (t, cb) handles neurons ``cb*BLOCK ...`` of token t. Elements with
    ``g == 1`` are stored back unchanged (bit-identical, also NaN / -0.0).
    """
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        s = slot.to(tl.int64)
        m = tl.load(m_ptr + t * I + cols, mask=mask)
        g = tl.load(g_ptr + s * I + cols, mask=mask, other=1.0)
        out = (m.to(tl.float32) * g).to(m_ptr.dtype.element_ty)
        tl.store(m_ptr + t * I + cols, tl.where(g == 1.0, m, out), mask=mask)


@triton.jit
def _silu_and_mul_gain_kernel(
    out_ptr,  # [T, I] contiguous, mutated
    x_ptr,  # [T, 2I] contiguous, gate | up
    slot_ptr,  # [T] int32
    g_ptr,  # [S, I] float32
    I,
    BLOCK: tl.constexpr,
):
    """``out[t,i] = rnd(silu(x[t,i]) * x[t,I+i] * g[s,i])``,  ``silu(y) = y/(1+exp(-y))``

    with the gain factor present only when ``s = slot[t] >= 0`` and ``g[s,i] != 1``;
    float32 math, one rounding ``rnd`` to out's dtype. Every token is computed (slot -1
    is plain SiluAndMul).
    """
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + t * 2 * I + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * 2 * I + I + cols, mask=mask, other=0.0).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up
    res = act.to(out_ptr.dtype.element_ty)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        g = tl.load(g_ptr + slot.to(tl.int64) * I + cols, mask=mask, other=1.0)
        res = tl.where(g == 1.0, res, (act * g).to(out_ptr.dtype.element_ty))
    tl.store(out_ptr + t * I + cols, res, mask=mask)


def neuron_gain(
    m: torch.Tensor,  # [T, I] MLP activations, mutated
    token_slot: torch.Tensor,  # [T] int32, -1 = no intervention
    g: torch.Tensor,  # [S, I] float32 gains
) -> None:
    """Triton launcher with the reference's signature; see ``reference.neuron_gain``."""
    assert m.dim() == 2 and m.is_contiguous(), "m must be a contiguous [T, I] tensor"
    T, I = m.shape
    assert token_slot.dtype == torch.int32 and token_slot.shape == (T,)
    assert token_slot.is_contiguous()
    assert g.dtype == torch.float32 and g.dim() == 2 and g.shape[1] == I and g.is_contiguous()
    if T == 0:
        return
    block = min(triton.next_power_of_2(I), 2048)
    grid = (T, triton.cdiv(I, block))
    kernel = for_device(_neuron_gain_kernel, m.device)
    kernel[grid](m, token_slot, g, I, BLOCK=block, **LAUNCH_OPTIONS)


def silu_and_mul_gain(
    out: torch.Tensor,  # [T, I] result, mutated
    x: torch.Tensor,  # [T, 2I] gate | up
    token_slot: torch.Tensor,  # [T] int32, -1 = plain SiluAndMul
    g: torch.Tensor,  # [S, I] float32 gains
) -> None:
    """Triton launcher with the reference's signature; see ``reference.silu_and_mul_gain``."""
    assert x.dim() == 2 and x.is_contiguous() and x.shape[1] % 2 == 0, "x must be [T, 2I]"
    T, I = x.shape[0], x.shape[1] // 2
    assert out.dtype == x.dtype and out.shape == (T, I) and out.is_contiguous()
    assert token_slot.dtype == torch.int32 and token_slot.shape == (T,)
    assert token_slot.is_contiguous()
    assert g.dtype == torch.float32 and g.dim() == 2 and g.shape[1] == I and g.is_contiguous()
    if T == 0:
        return
    block = min(triton.next_power_of_2(I), 2048)
    grid = (T, triton.cdiv(I, block))
    kernel = for_device(_silu_and_mul_gain_kernel, x.device)
    kernel[grid](out, x, token_slot, g, I, BLOCK=block, **LAUNCH_OPTIONS)
