"""Triton kernel for per-head affine steering/patching with a pre-intervention capture.

One pass over the attention output ``z[T, H, D]`` (the ``o_proj`` input): each token
reads its slot and capture row, copies its row to the capture buffer before touching it,
and applies ``a*z + b*v`` per head, ``v`` being the pool row the slot's table names for
that head. Whether anything happens is device-side data (``flag``, slot / capture index /
pool row = -1), never a Python branch, so the launch is CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from emosteer.ops.triton._launch import LAUNCH_OPTIONS, for_device


@triton.jit
def _head_affine_capture_kernel(
    z_ptr,  # [T, H, D] contiguous, mutated
    slot_ptr,  # [T] int32
    a_ptr,  # [S, H] float32
    b_ptr,  # [S, H] float32
    c_ptr,  # [S, H] float32 coefficient of |z[t,h]| * v, 0 = none
    vrow_ptr,  # [S, H] int32, -1 = v is 0
    row_off_ptr,  # [T] int32 added to the token's pool rows
    pool_ptr,  # [P, H, D] z.dtype
    cap_index_ptr,  # [T] int32
    cap_ptr,  # [C, H, D] z.dtype, mutated
    flag_ptr,  # [1] int32, 0 = do nothing
    H,
    D,
    P,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``z[t,h] = a[s,h]*z[t,h] + w*pool[vrow[s,h] + row_off[t], h]``,  ``s = slot[t] >= 0``,
    ``w = b[s,h]`` (``c[s,h] == 0``) or ``b[s,h] + c[s,h]*||z[t,h]||`` (a relative add).

    Program (t, hb) handles heads ``hb*BLOCK_H ...`` of token t. Every program first
    reads ``flag`` and does nothing when it is 0. If ``cap[t] >= 0`` the pre-update
    ``z[t,h]`` goes to ``cap_buf[cap[t], h]`` first. A head whose ``vrow`` is -1 uses
    v = 0 (and so, defensively, does a row outside ``[0, P)``: no read out of bounds). Heads with ``a == 1 and b == 0`` (and ``c == 0``) are stored back bit for bit (also -0.0 /
    NaN), as is z when ``slot[t] == -1``. Math in float32, one rounding to z's dtype.
    """
    flag = tl.load(flag_ptr)
    # No `mask & (slot >= 0)`: the 3.9 interpreter rejects masks built from loaded
    # scalars, so the per-token conditions are branches on device data instead.
    if flag != 0:
        t = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        slot = tl.load(slot_ptr + t)
        cap = tl.load(cap_index_ptr + t)
        if (slot >= 0) | (cap >= 0):
            heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            dims = tl.arange(0, BLOCK_D)
            head_ok = heads < H
            mask = head_ok[:, None] & (dims < D)[None, :]
            row = heads[:, None] * D + dims[None, :]  # offset inside one [H, D] token row
            # Token/slot/capture/pool bases are int64: T*H*D may exceed 2**31.
            z = tl.load(z_ptr + t * H * D + row, mask=mask, other=0.0)
            if cap >= 0:
                tl.store(cap_ptr + cap.to(tl.int64) * H * D + row, z, mask=mask)
            if slot >= 0:
                s = slot.to(tl.int64)
                a = tl.load(a_ptr + s * H + heads, mask=head_ok, other=1.0)
                b = tl.load(b_ptr + s * H + heads, mask=head_ok, other=0.0)
                c = tl.load(c_ptr + s * H + heads, mask=head_ok, other=0.0)
                vr = tl.load(vrow_ptr + s * H + heads, mask=head_ok, other=-1)
                off = tl.load(row_off_ptr + t).to(tl.int64)
                p = vr.to(tl.int64) + off
                has_v = (vr >= 0) & (p >= 0) & (p < P)
                p = tl.where(has_v, p, 0)
                v = tl.load(pool_ptr + p[:, None] * H * D + row, mask=mask & has_v[:, None],
                            other=0.0)
                zf = z.to(tl.float32)
                # masked dims were loaded as 0 (other=): they add nothing to the norm
                # (tl.reduce with the combine function: the 3.9 interpreter cannot call
                # tl.sum inside this branch)
                norm = tl.sqrt_rn(tl.reduce(zf * zf, 1, tl.standard._sum_combine))
                w = tl.where(c != 0.0, b + c * norm, b)
                out = a[:, None] * zf + w[:, None] * v.to(tl.float32)
                keep = (a == 1.0) & (b == 0.0) & (c == 0.0)
                out = tl.where(keep[:, None], z, out.to(z_ptr.dtype.element_ty))
                tl.store(z_ptr + t * H * D + row, out, mask=mask)


def _block_h(H: int, block_d: int) -> int:
    """Heads per program: a tile of at most ~4096 elements, at least one head."""
    return max(1, min(triton.next_power_of_2(H), 4096 // block_d))


def head_affine_capture(
    z: torch.Tensor,  # [T, H, D] attention output before o_proj, mutated
    token_slot: torch.Tensor,  # [T] int32, -1 = no intervention
    a: torch.Tensor,  # [S, H] float32 multiplicative coefficient
    b: torch.Tensor,  # [S, H] float32 coefficient of v
    c: torch.Tensor,  # [S, H] float32 coefficient of |z[t,h]| * v, 0 = none
    vrow: torch.Tensor,  # [S, H] int32 pool row of v, -1 = v is 0
    row_off: torch.Tensor,  # [T] int32 added to the token's pool rows
    pool: torch.Tensor,  # [P, H, D] z.dtype head vectors
    cap_index: torch.Tensor,  # [T] int32, -1 = no capture
    cap_buf: torch.Tensor,  # [C, H, D] z.dtype capture rows, mutated
    flag: torch.Tensor,  # [1] int32, 0 = do nothing
) -> None:
    """Triton launcher with the reference's signature; see ``reference.head_affine_capture``."""
    assert z.dim() == 3 and z.is_contiguous(), "z must be a contiguous [T, H, D] tensor"
    T, H, D = z.shape
    S = a.shape[0]
    assert token_slot.dtype == torch.int32 and token_slot.shape == (T,)
    assert cap_index.dtype == torch.int32 and cap_index.shape == (T,)
    assert row_off.dtype == torch.int32 and row_off.shape == (T,) and row_off.is_contiguous()
    assert a.dtype == torch.float32 and a.shape == (S, H) and a.is_contiguous()
    assert b.dtype == torch.float32 and b.shape == (S, H) and b.is_contiguous()
    assert c.dtype == torch.float32 and c.shape == (S, H) and c.is_contiguous()
    assert vrow.dtype == torch.int32 and vrow.shape == (S, H) and vrow.is_contiguous()
    assert pool.dtype == z.dtype and pool.dim() == 3 and pool.shape[1:] == (H, D)
    assert pool.is_contiguous()
    assert cap_buf.dtype == z.dtype and cap_buf.shape[1:] == (H, D) and cap_buf.is_contiguous()
    assert token_slot.is_contiguous() and cap_index.is_contiguous()
    assert flag.dtype == torch.int32 and flag.shape == (1,)
    if T == 0:
        return
    block_d = triton.next_power_of_2(D)
    block_h = _block_h(H, block_d)
    grid = (T, triton.cdiv(H, block_h))
    for_device(_head_affine_capture_kernel, z.device)[grid](
        z, token_slot, a, b, c, vrow, row_off, pool, cap_index, cap_buf, flag, H, D, pool.shape[0],
        BLOCK_H=block_h, BLOCK_D=block_d, **LAUNCH_OPTIONS,
    )
