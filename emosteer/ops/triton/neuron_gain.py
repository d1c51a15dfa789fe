"""Triton kernel for per-request MLP neuron gains (ENA, emotional neuron augmentation).

``neuron_gain`` scales the MLP activation ``m[T, I]`` (the ``down_proj`` input) in place
by ``g = 1 + (gamma[s]-1)*masks[nrow[s]]``: a per-slot scalar gain and a pooled neuron
mask. It runs right after vLLM's own SiluAndMul. A gain of exactly 1 leaves an element
bit-identical; ``flag[0] == 0`` and slot / row -1 are device-side data.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from emosteer.ops.triton._launch import LAUNCH_OPTIONS, for_device


@triton.jit
def _neuron_gain_kernel(
    m_ptr,  # [T, I] contiguous, mutated
    slot_ptr,  # [T] int32
    gamma_ptr,  # [S] float32
    nrow_ptr,  # [S] int32, -1 = no gain
    masks_ptr,  # [P, I] float32
    flag_ptr,  # [1] int32, 0 = do nothing
    I,
    BLOCK: tl.constexpr,
):
    """``m[t,i] = g*m[t,i]``, ``g = 1 + (gamma[s]-1)*masks[nrow[s], i]``, ``s = slot[t]``.

    Program (t, cb) handles neurons ``cb*BLOCK ...`` of token t; it exits at once when
    ``flag`` is 0, the slot is -1 or the slot has no mask row. ``g`` is rounded as the
    reference does it (``gamma - 1``, times the mask, plus 1; no FMA); elements with
    ``g == 1`` are stored back unchanged (bit-identical, also NaN / -0.0).
    """
    flag = tl.load(flag_ptr)
    if flag != 0:
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            row = tl.load(nrow_ptr + slot)
            if row >= 0:
                cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
                mask = cols < I
                gm1 = tl.load(gamma_ptr + slot) - 1.0
                mk = tl.load(masks_ptr + row.to(tl.int64) * I + cols, mask=mask, other=0.0)
                g = 1.0 + gm1 * mk
                m = tl.load(m_ptr + t * I + cols, mask=mask)
                out = (m.to(tl.float32) * g).to(m_ptr.dtype.element_ty)
                tl.store(m_ptr + t * I + cols, tl.where(g == 1.0, m, out), mask=mask)


def neuron_gain(
    m: torch.Tensor,  # [T, I] MLP activations, mutated
    token_slot: torch.Tensor,  # [T] int32, -1 = no intervention
    gamma: torch.Tensor,  # [S] float32 gain of the masked neurons
    nrow: torch.Tensor,  # [S] int32 row of masks per slot, -1 = no gain
    masks: torch.Tensor,  # [P, I] float32 neuron masks
    flag: torch.Tensor,  # [1] int32, 0 = do nothing
) -> None:
    """Triton launcher with the reference's signature; see ``reference.neuron_gain``."""
    assert m.dim() == 2 and m.is_contiguous(), "m must be a contiguous [T, I] tensor"
    T, I = m.shape
    S = gamma.shape[0]
    assert token_slot.dtype == torch.int32 and token_slot.shape == (T,)
    assert token_slot.is_contiguous()
    assert gamma.dtype == torch.float32 and gamma.dim() == 1 and gamma.is_contiguous()
    assert nrow.dtype == torch.int32 and nrow.shape == (S,) and nrow.is_contiguous()
    assert masks.dtype == torch.float32 and masks.dim() == 2 and masks.shape[1] == I
    assert masks.is_contiguous()
    assert flag.dtype == torch.int32 and flag.shape == (1,)
    if T == 0:
        return
    block = min(triton.next_power_of_2(I), 2048)
    grid = (T, triton.cdiv(I, block))
    kernel = for_device(_neuron_gain_kernel, m.device)
    kernel[grid](m, token_slot, gamma, nrow, masks, flag, I, BLOCK=block, **LAUNCH_OPTIONS)
