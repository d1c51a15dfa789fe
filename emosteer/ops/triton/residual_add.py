"""Triton kernel for residual-stream steering: a per-token add of a pooled vector.

``residual_add`` adds ``alpha[s]*pool[urow[s]]`` to the rows of tokens whose slot names
a pool row; it runs in place right after vLLM's own add + RMSNorm, on the residual that
op returned. ``flag[0] == 0`` and slot / row -1 are device-side data, never a Python
branch, so the launch is CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from emosteer.ops.triton._launch import LAUNCH_OPTIONS, for_device


@triton.jit
def _residual_add_kernel(
    r_ptr,  # [T, d] contiguous, mutated
    slot_ptr,  # [T] int32
    alpha_ptr,  # [S] float32
    urow_ptr,  # [S] int32, -1 = no vector
    pool_ptr,  # [P, d] r.dtype
    flag_ptr,  # [1] int32, 0 = do nothing
    d,
    BLOCK: tl.constexpr,
):
    """``r[t] = r[t] + alpha[s]*pool[urow[s]]``,  ``s = slot[t] >= 0``, ``urow[s] >= 0``.

    Program (t, cb) handles columns ``cb*BLOCK ...`` of token t; it exits at once when
    ``flag`` is 0, the slot is -1 or the slot has no pool row. Float32 math (the
    product rounded before the sum), one rounding to r's dtype.
    """
    flag = tl.load(flag_ptr)
    if flag != 0:
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            row = tl.load(urow_ptr + slot)
            if row >= 0:
                s = slot.to(tl.int64)
                cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
                mask = cols < d
                alpha = tl.load(alpha_ptr + s)
                r = tl.load(r_ptr + t * d + cols, mask=mask)
                u = tl.load(pool_ptr + row.to(tl.int64) * d + cols, mask=mask, other=0.0)
                out = r.to(tl.float32) + alpha * u.to(tl.float32)
                tl.store(r_ptr + t * d + cols, out.to(r_ptr.dtype.element_ty), mask=mask)


def residual_add(
    r: torch.Tensor,  # [T, d] residual stream, mutated
    token_slot: torch.Tensor,  # [T] int32, -1 = no intervention
    alpha: torch.Tensor,  # [S] float32 scale
    urow: torch.Tensor,  # [S] int32 pool row per slot, -1 = no vector
    pool: torch.Tensor,  # [P, d] r.dtype steering vectors
    flag: torch.Tensor,  # [1] int32, 0 = do nothing
) -> None:
    """Triton launcher with the reference's signature; see ``reference.residual_add``."""
    assert r.dim() == 2 and r.is_contiguous(), "r must be a contiguous [T, d] tensor"
    T, d = r.shape
    S = alpha.shape[0]
    assert token_slot.dtype == torch.int32 and token_slot.shape == (T,)
    assert token_slot.is_contiguous()
    assert alpha.dtype == torch.float32 and alpha.dim() == 1 and alpha.is_contiguous()
    assert urow.dtype == torch.int32 and urow.shape == (S,) and urow.is_contiguous()
    assert pool.dtype == r.dtype and pool.dim() == 2 and pool.shape[1] == d
    assert pool.is_contiguous()
    assert flag.dtype == torch.int32 and flag.shape == (1,)
    if T == 0:
        return
    block = min(triton.next_power_of_2(d), 4096)
    grid = (T, triton.cdiv(d, block))
    kernel = for_device(_residual_add_kernel, r.device)
    kernel[grid](r, token_slot, alpha, urow, pool, flag, d, BLOCK=block, **LAUNCH_OPTIONS)
