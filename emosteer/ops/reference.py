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
platform, so the plugin runs the un-fused in-place ops (``residual_add``,
``neuron_gain``) right after vLLM's own; dead fused variants are deleted rather than
kept.
"""

from __future__ import annotations

import torch

__all__ = [
    "head_affine_capture",
    "residual_add",
    "neuron_gain",
]


def _off(flag: torch.Tensor) -> bool:
    return int(flag[0]) == 0


def head_affine_capture(
    z: torch.Tensor,  # [T, H, D] attention output before o_proj, mutated
    token_slot: torch.Tensor,  # [T] int32, -1 = no intervention
    a: torch.Tensor,  # [S, H] float32 multiplicative coefficient
    b: torch.Tensor,  # [S, H] float32 coefficient of v
    vrow: torch.Tensor,  # [S, H] int32 pool row of v per slot and head, -1 = v is 0
    pool: torch.Tensor,  # [P, H, D] z.dtype head vectors
    cap_index: torch.Tensor,  # [T] int32, -1 = no capture
    cap_buf: torch.Tensor,  # [C, H, D] z.dtype capture rows, mutated
    flag: torch.Tensor,  # [1] int32, 0 = the op does nothing at all
) -> None:
    """``z[t,h] = a[s,h]*z[t,h] + b[s,h]*v`` with ``s = token_slot[t] >= 0`` and
    ``v = pool[vrow[s,h], h]`` (zeros where ``vrow[s,h] == -1``).

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
        v = pool[rows.clamp(min=0), heads].float()  # [n, H, D]
        v = torch.where((rows >= 0).unsqueeze(-1), v, 0.0)
    else:
        v = torch.zeros_like(zz)
    out = a[s].float().unsqueeze(-1) * zz + b[s].float().unsqueeze(-1) * v
    # A head with a == 1 and b == 0 is left bit-identical (also for -0.0 and NaN).
    keep = ((a[s] == 1) & (b[s] == 0)).unsqueeze(-1)
    z[sel] = torch.where(keep, z[sel], out.to(z.dtype))


def residual_add(
    r: torch.Tensor,  # [T, d] residual stream, mutated
    token_slot: torch.Tensor,  # [T] int32, -1 = no intervention
    alpha: torch.Tensor,  # [S] float32 scale
    urow: torch.Tensor,  # [S] int32 pool row per slot, -1 = no vector
    pool: torch.Tensor,  # [P, d] r.dtype steering vectors
    flag: torch.Tensor,  # [1] int32, 0 = the op does nothing at all
) -> None:
    """``r[t] = r[t] + alpha[s]*pool[urow[s]]`` with ``s = token_slot[t] >= 0`` and
    ``urow[s] >= 0``; every other token is left bit-identical."""
    if _off(flag):
        return
    sel = token_slot >= 0
    if not bool(sel.any()):
        return
    rows = torch.full_like(token_slot, -1)
    rows[sel] = urow[token_slot[sel].long()]
    sel = rows >= 0
    if not bool(sel.any()):
        return
    s = token_slot[sel].long()
    out = r[sel].float() + alpha[s].float().unsqueeze(-1) * pool[rows[sel].long()].float()
    r[sel] = out.to(r.dtype)


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
