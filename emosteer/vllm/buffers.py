"""Device buffers the patched modules read, allocated once per model before compile.

Layout (L decoder layers, S = max_slots, Hl heads on this TP rank, D head dim, d hidden,
Il intermediate neurons on this rank, Tm = max tokens per step, C = capture rows)::

    token_slot  [Tm]        int32  slot of each token this step, -1 = none
    a, b        [L, S, Hl]  fp32   head affine z <- a*z + b*v   (identity: a=1, b=0)
    v           [L, S, Hl, D]      model dtype
    alpha       [L, S]      fp32   residual add r <- r + alpha*u at layer l's output
    u           [L, S, d]          model dtype
    g           [L, S, Il]  fp32   neuron gain m <- g*m          (identity: g=1)
    head_cap    [L, Tm]     int32  capture row of (layer, token) head outputs, -1 = none
    res_cap     [L, Tm]     int32  capture row of (layer, token) residual, -1 = none
    head_buf    [C, Hl, D]         captured head outputs (rows shared by all layers)
    res_buf     [C, 1, d]          captured residual rows

Running example, 4 tokens of 3 requests, slots 0 and 2 in use::

    token_slot = [-1, 0, 2, 2]       # token 0 unsteered
    head_cap[5] = [-1, -1, -1, 0]    # layer 5 captures token 3 into head_buf row 0

Each patched module holds a *site* with views of these tensors for its layer; per step
only the contents change, so addresses stay fixed for CUDA graphs and compiled graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class AttnSite:
    """What a patched ``Attention`` reads: its layer's views of the head buffers."""

    def __init__(self, bufs: "SteerBuffers", layer: int, impl: str):
        self.layer = layer
        self.token_slot = bufs.token_slot
        self.a, self.b, self.v = bufs.a[layer], bufs.b[layer], bufs.v[layer]
        self.cap_index = bufs.head_cap[layer]
        self.cap_buf = bufs.head_buf
        self.impl = impl


class NormSite:
    """What a patched ``RMSNorm`` reads: steering and capture of the residual entering
    it, i.e. the output of decoder layer ``layer`` (the next layer's input norm, or the
    final norm for the last layer)."""

    def __init__(self, bufs: "SteerBuffers", layer: int, impl: str):
        self.layer = layer
        self.token_slot = bufs.token_slot
        self.alpha, self.u = bufs.alpha[layer], bufs.u[layer]
        self.cap_index = bufs.res_cap[layer]
        self.cap_buf = bufs.res_buf
        # Capture-only use of head_affine_capture: slot -1 everywhere, identity table.
        self.no_slot = bufs.no_slot
        self.one_a, self.zero_b, self.zero_v = bufs.one_a, bufs.zero_b, bufs.zero_v
        self.impl = impl


class ActSite:
    """What a patched ``SiluAndMul`` reads: its layer's neuron gains."""

    def __init__(self, bufs: "SteerBuffers", layer: int, impl: str):
        self.layer = layer
        self.token_slot = bufs.token_slot
        self.g = bufs.g[layer]
        self.impl = impl


@dataclass
class Shape:
    num_layers: int
    max_slots: int
    heads: int  # on this TP rank
    head_dim: int
    hidden: int
    neurons: int  # on this TP rank
    max_tokens: int
    capture_rows: int


class SteerBuffers:
    """All device tensors of one model; ``reset_slot`` writes the identity config."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device):
        s = shape
        self.shape, self.dtype, self.device = s, dtype, device
        i32 = dict(dtype=torch.int32, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        act = dict(dtype=dtype, device=device)
        L, S = s.num_layers, s.max_slots
        self.token_slot = torch.full((s.max_tokens,), -1, **i32)
        self.no_slot = torch.full((s.max_tokens,), -1, **i32)
        self.a = torch.ones((L, S, s.heads), **f32)
        self.b = torch.zeros((L, S, s.heads), **f32)
        self.v = torch.zeros((L, S, s.heads, s.head_dim), **act)
        self.alpha = torch.zeros((L, S), **f32)
        self.u = torch.zeros((L, S, s.hidden), **act)
        self.g = torch.ones((L, S, s.neurons), **f32)
        self.head_cap = torch.full((L, s.max_tokens), -1, **i32)
        self.res_cap = torch.full((L, s.max_tokens), -1, **i32)
        self.head_buf = torch.zeros((s.capture_rows, s.heads, s.head_dim), **act)
        self.res_buf = torch.zeros((s.capture_rows, 1, s.hidden), **act)
        self.one_a = torch.ones((1, 1), **f32)
        self.zero_b = torch.zeros((1, 1), **f32)
        self.zero_v = torch.zeros((1, 1, s.hidden), **act)

    def reset_slot(self, slot: int) -> None:
        self.a[:, slot] = 1.0
        self.b[:, slot] = 0.0
        self.v[:, slot] = 0.0
        self.alpha[:, slot] = 0.0
        self.u[:, slot] = 0.0
        self.g[:, slot] = 1.0

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in vars(self).values()
            if isinstance(t, torch.Tensor)
        )
