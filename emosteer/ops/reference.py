"""Torch reference implementations of the fused steering operators.

Every op here has exactly the signature of its fused twins (Triton, CUDA, C++ CPU),
mutates its outputs in place and returns ``None``. Math is done in float32 and cast
back once, which is what the kernels do. Tests compare every kernel against these.

Index layout, a running example with 4 tokens from 3 requests::

    token_slot = [-1, 0, 2, 1]   # token 0 untouched, tokens 1..3 use slots 0, 2, 1
    cap_index  = [ 5, -1, -1, 0]  # token 0 captured into row 5, token 3 into row 0
"""

from __future__ import annotations

import torch

__all__ = [
    "head_affine_capture",
    "residual_add",
    "fused_add_rms_norm_steer",
    "neuron_gain",
    "silu_and_mul_gain",
]


def head_affine_capture(
    z: torch.Tensor,  # [T, H, D] attention output before o_proj, mutated
    token_slot: torch.Tensor,  # [T] int32, -1 = no intervention
    a: torch.Tensor,  # [S, H] float32 multiplicative coefficient
    b: torch.Tensor,  # [S, H] float32 coefficient of v
    v: torch.Tensor,  # [S, H, D] z.dtype head vectors
    cap_index: torch.Tensor,  # [T] int32, -1 = no capture
    cap_buf: torch.Tensor,  # [C, H, D] z.dtype capture rows, mutated
) -> None:
    """``z[t,h] = a[s,h]*z[t,h] + b[s,h]*v[s,h]`` with ``s = token_slot[t] >= 0``.

    Before the update, ``z[t]`` is copied to ``cap_buf[cap_index[t]]`` where
    ``cap_index[t] >= 0``.
    """
    cap = cap_index >= 0
    if bool(cap.any()):
        cap_buf[cap_index[cap].long()] = z[cap]
    sel = token_slot >= 0
    if not bool(sel.any()):
        return
    s = token_slot[sel].long()
    zz = z[sel].float()
    out = a[s].float().unsqueeze(-1) * zz + b[s].float().unsqueeze(-1) * v[s].float()
    # A head with a == 1 and b == 0 is left bit-identical (also for -0.0 and NaN).
    keep = ((a[s] == 1) & (b[s] == 0)).unsqueeze(-1)
    z[sel] = torch.where(keep, z[sel], out.to(z.dtype))


def residual_add(
    r: torch.Tensor,  # [T, d] residual stream, mutated
    token_slot: torch.Tensor,  # [T] int32, -1 = no intervention
    alpha: torch.Tensor,  # [S] float32 scale
    u: torch.Tensor,  # [S, d] r.dtype steering vectors
) -> None:
    """``r[t] = r[t] + alpha[s]*u[s]`` with ``s = token_slot[t] >= 0``."""
    sel = token_slot >= 0
    if not bool(sel.any()):
        return
    s = token_slot[sel].long()
    out = r[sel].float() + alpha[s].float().unsqueeze(-1) * u[s].float()
    r[sel] = out.to(r.dtype)


def fused_add_rms_norm_steer(
    x: torch.Tensor,  # [T, d] layer output (in) / normed hidden (out), mutated
    residual: torch.Tensor,  # [T, d] residual stream, mutated
    weight: torch.Tensor,  # [d] RMSNorm weight
    eps: float,
    token_slot: torch.Tensor,  # [T] int32
    alpha: torch.Tensor,  # [S] float32
    u: torch.Tensor,  # [S, d] x.dtype
) -> None:
    """vLLM's fused add + RMSNorm with a per-token steering add folded in.

    ``residual = x + residual (+ alpha[s]*u[s])``, then
    ``x = rms_norm(residual) * weight``; the sum is rounded to the residual dtype
    before the norm, exactly as vLLM does, so slot -1 reproduces vLLM's op.
    """
    summed = x.float() + residual.float()
    sel = token_slot >= 0
    if bool(sel.any()):
        s = token_slot[sel].long()
        summed[sel] = summed[sel] + alpha[s].float().unsqueeze(-1) * u[s].float()
    residual.copy_(summed.to(residual.dtype))
    h = residual.float()
    var = h.pow(2).mean(dim=-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    x.copy_(h.to(x.dtype) * weight.to(x.dtype))


def neuron_gain(
    m: torch.Tensor,  # [T, I] MLP activations, mutated
    token_slot: torch.Tensor,  # [T] int32
    g: torch.Tensor,  # [S, I] float32 gains
) -> None:
    """``m[t,i] = g[s,i]*m[t,i]`` with ``s = token_slot[t] >= 0``."""
    sel = token_slot >= 0
    if not bool(sel.any()):
        return
    s = token_slot[sel].long()
    out = m[sel].float() * g[s].float()
    keep = g[s] == 1
    m[sel] = torch.where(keep, m[sel], out.to(m.dtype))


def silu_and_mul_gain(
    out: torch.Tensor,  # [T, I] result, mutated
    x: torch.Tensor,  # [T, 2I] gate | up
    token_slot: torch.Tensor,  # [T] int32
    g: torch.Tensor,  # [S, I] float32 gains
) -> None:
    """vLLM's SiluAndMul with neuron gain: ``out = silu(x[:, :I]) * x[:, I:] * g[s]``.

    Tokens with slot -1 get exactly ``silu(gate) * up`` as vLLM computes it.
    """
    d = x.shape[-1] // 2
    gate, up = x[..., :d].float(), x[..., d:].float()
    act = gate / (1.0 + torch.exp(-gate)) * up
    res = act.to(out.dtype)
    sel = token_slot >= 0
    if bool(sel.any()):
        s = token_slot[sel].long()
        gained = (act[sel] * g[s].float()).to(out.dtype)
        res[sel] = torch.where(g[s] == 1, res[sel], gained)
    out.copy_(res)
