"""Device buffers the patched modules read, allocated once per model before compile.

Layout (L decoder layers, S = max_slots, Hl heads on this TP rank, D head dim, d hidden,
Il intermediate neurons on this rank, Tm = max tokens per step, C = capture rows,
P = pool rows per kind)::

    token_slot  [Tm]        int32  slot of each token this step, -1 = none
    a, b, c     [L, S, Hl]  fp32   head affine z <- a*z + (b + c*|z|)*head_pool[vrow][h]
                                   (a=1, b=0, c=0: identity; c = scale/|v|: a relative add)
    vrow        [L, S, Hl]  int32  head-pool row, -1 = none
    row_off     [Tm]        int32  added to a token's head-pool rows: k at the k-th
                                   position of a position-aligned patch (its slot reads
                                   a run of rows, one per position), else 0
    coef, rmode [L, S, K]   fp32 / int32  residual terms (add / clamp / project-out,
                                   absolute or relative; ops.residual_steer)
    urow        [L, S, K]   int32  residual-pool row of each term, -1 = none
    gamma       [L, S]      fp32   neuron gain m <- (1 + (gamma-1)*neu_pool[nrow]) * m
    nrow        [L, S]      int32  neuron-pool row, -1 = none
    head_pool   [P, Hl, D]  model dtype   one row = one head vector at one layer
    res_pool    [P, d]      model dtype   one row = one residual vector at one layer
    neu_pool    [P, Il]     fp32          one row = one neuron mask at one layer
    probe_pool  [P, d]      fp32          one row = one probe direction at one layer
    prow        [L, S]      int32  probe-pool row of the slot's gate at this layer, -1 = none
    pbias, thresh, gmode [S]       the gate's bias, threshold and mode (ops.probe_gate)
    gate_row    [Tm]        int32  latch-state row of each token's request, -1 = none
    gate_state  [R]         int32  per request: the latched gate has held (1)
    score_cap   [Tm]        int32  row of score_buf for each token's probe score, -1 = none
    score_buf   [C]         fp32   captured probe scores
    beta        [L, S, Hl]  fp32   VEE boost of image keys per head (1 = none)
    bmode       [S]         int32  0 = boost softmax weights, 1 = boost logits
    flags       [6, L, 1]   int32  per op kind (heads, residual, neurons, residual
                                   capture, attention, gate) and layer: 1 = some token of this
                                   step needs the op here; 0 = the kernel returns at once
    token_row   [Tm]        int32  batch row of each token (-1 = none; written only in
                                   steps where the attention op has work)
    token_pos   [Tm]        int32  position of each token in its sequence
    spans       [R, NS, 2]  int32  image key spans [start, end) per batch row
    head_cap    [L, Tm]     int32  capture row of (layer, token) head outputs, -1 = none
    res_cap     [L, Tm]     int32  capture row of (layer, token) residual, -1 = none
    head_buf    [C, Hl, D]         captured head outputs (rows shared by all layers)
    res_buf     [C, 1, d]          captured residual rows
    mass_cap    [L, Tm]     int32  capture row of (layer, token) attention-to-image mass
    mass_buf    [C, Hl, NS] fp32   attention mass per head and image span

A slot is the tables' column s: scalars and row ids, a few bytes per layer; the vectors
live once in the pools. Running example, 4 tokens of 3 requests, slots 0 and 2 in use::

    token_slot = [-1, 0, 2, 2]       # token 0 unsteered
    vrow[5, 2] = [-1, 7, -1, ...]    # slot 2 reads head_pool row 7 at layer 5, head 1
    head_cap[5] = [-1, -1, -1, 0]    # layer 5 captures token 3 into head_buf row 0
    flags[0, 5] = 1                  # the head op at layer 5 has work this step

Each patched module holds a *site* with views of these tensors for its layer; per step
only the contents change, so addresses stay fixed for CUDA graphs and compiled graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from emosteer.ops._dispatch import hot_op

FLAG_HEADS, FLAG_RESIDUAL, FLAG_NEURONS, FLAG_RESIDUAL_CAPTURE, FLAG_ATTENTION, FLAG_GATE = 0, 1, 2, 3, 4, 5
NUM_FLAGS = 6
MAX_RES_TERMS = 8  # K: residual terms per slot and layer (request.compile.MAX_RES_TERMS)


class AttentionSite:
    """What a patched ``Attention`` reads: its layer's views of the buffers of two sites,
    the heads (head affine + head capture) and the attention to image keys (VEE boost +
    attention-to-image capture)."""

    def __init__(self, bufs: "SteerBuffers", layer: int, impl: str):
        self.layer = layer
        self.token_slot = bufs.token_slot
        self.a, self.b, self.c, self.vrow = bufs.a[layer], bufs.b[layer], bufs.c[layer], bufs.vrow[layer]
        self.row_off = bufs.row_off
        self.pool = bufs.head_pool
        self.cap_index = bufs.head_cap[layer]
        self.cap_buf = bufs.head_buf
        self.flag = bufs.flags[FLAG_HEADS, layer]
        self.impl = impl
        self.head_affine_capture = hot_op("head_affine_capture", impl)
        # VEE / attention-to-image capture (emosteer/vllm/patches/attention.py); set by
        # the worker only where the engine's attention can be read (``vee`` True).
        self.vee = False
        self.beta, self.bmode = bufs.beta[layer], bufs.bmode
        self.token_row, self.token_pos, self.spans = bufs.token_row, bufs.token_pos, bufs.spans
        self.mass_cap, self.mass_buf = bufs.mass_cap[layer], bufs.mass_buf
        self.attn_flag = bufs.flags[FLAG_ATTENTION, layer]
        self.attn_impl = impl
        self.sm_scale: torch.Tensor | None = None
        # host_on: this step has VEE work on this layer (a host-side copy of attn_flag,
        # so that a CPU step without it skips the op's Python at once). graph_safe: the
        # op launches on every step whatever host_on says, and its kernel returns on the
        # device flag attn_flag: a launch captured in a CUDA graph then follows the
        # boosted pairs of every replay (set on CUDA devices).
        self.host_on = False
        self.graph_safe = False


class ResidualSite:
    """What a patched ``RMSNorm`` reads: steering and capture of the residual entering
    it, i.e. the output of decoder layer ``layer`` (the next layer's input norm, or the
    final norm for the last layer)."""

    def __init__(self, bufs: "SteerBuffers", layer: int, impl: str):
        self.layer = layer
        self.token_slot = bufs.token_slot
        self.coef, self.rmode, self.urow = bufs.coef[layer], bufs.rmode[layer], bufs.urow[layer]
        self.pool = bufs.res_pool
        self.flag = bufs.flags[FLAG_RESIDUAL, layer]
        # The probe gate read from this residual (ops.probe_gate).
        self.prow, self.probe_pool = bufs.prow[layer], bufs.probe_pool
        self.pbias, self.thresh, self.gmode = bufs.pbias, bufs.thresh, bufs.gmode
        self.gate_row, self.gate_state = bufs.gate_row, bufs.gate_state
        self.score_cap, self.score_buf = bufs.score_cap, bufs.score_buf
        self.gate_flag = bufs.flags[FLAG_GATE, layer]
        self.cap_index = bufs.res_cap[layer]
        self.cap_buf = bufs.res_buf
        self.cap_flag = bufs.flags[FLAG_RESIDUAL_CAPTURE, layer]
        # Capture-only use of head_affine_capture: slot -1 everywhere, identity table.
        self.no_slot = bufs.no_slot
        self.one_a, self.zero_b, self.no_row = bufs.one_a, bufs.zero_b, bufs.no_row
        self.row_off = bufs.row_off  # (not read: no token has a slot)
        self.zero_pool = bufs.zero_pool
        self.impl = impl
        self.residual_steer = hot_op("residual_steer", impl)
        self.head_affine_capture = hot_op("head_affine_capture", impl)
        self.probe_gate = hot_op("probe_gate", impl)


class NeuronSite:
    """What a patched ``SiluAndMul`` reads: its layer's neuron gains."""

    def __init__(self, bufs: "SteerBuffers", layer: int, impl: str):
        self.layer = layer
        self.token_slot = bufs.token_slot
        self.gamma, self.nrow = bufs.gamma[layer], bufs.nrow[layer]
        self.pool = bufs.neu_pool
        self.flag = bufs.flags[FLAG_NEURONS, layer]
        self.impl = impl
        self.neuron_gain = hot_op("neuron_gain", impl)


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
    pool_rows: dict  # kind ("res", "head", "neu", "probe") -> rows
    max_reqs: int = 1  # batch rows per step
    max_images: int = 8  # image spans per request (NS)


class SteerBuffers:
    """All device tensors of one model (slot tables start as the identity config)."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device):
        s = shape
        self.shape, self.dtype, self.device = s, dtype, device
        i32 = dict(dtype=torch.int32, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        act = dict(dtype=dtype, device=device)
        L, S, P = s.num_layers, s.max_slots, s.pool_rows
        self.token_slot = torch.full((s.max_tokens,), -1, **i32)
        self.no_slot = torch.full((s.max_tokens,), -1, **i32)
        self.a = torch.ones((L, S, s.heads), **f32)
        self.b = torch.zeros((L, S, s.heads), **f32)
        self.c = torch.zeros((L, S, s.heads), **f32)  # relative head adds (scale / |v|)
        self.vrow = torch.full((L, S, s.heads), -1, **i32)
        self.row_off = torch.zeros((s.max_tokens,), **i32)
        K = MAX_RES_TERMS
        self.coef = torch.zeros((L, S, K), **f32)
        self.rmode = torch.zeros((L, S, K), **i32)
        self.urow = torch.full((L, S, K), -1, **i32)
        self.prow = torch.full((L, S), -1, **i32)
        self.pbias = torch.zeros((S,), **f32)
        self.thresh = torch.zeros((S,), **f32)
        self.gmode = torch.zeros((S,), **i32)
        self.gate_row = torch.full((s.max_tokens,), -1, **i32)
        self.gate_state = torch.zeros((max(1, s.max_reqs),), **i32)
        self.score_cap = torch.full((s.max_tokens,), -1, **i32)
        self.score_buf = torch.zeros((s.capture_rows,), **f32)
        self.gamma = torch.ones((L, S), **f32)
        self.nrow = torch.full((L, S), -1, **i32)
        self.head_pool = torch.zeros((P["head"], s.heads, s.head_dim), **act)
        self.res_pool = torch.zeros((P["res"], s.hidden), **act)
        self.neu_pool = torch.zeros((P["neu"], s.neurons), **f32)
        self.probe_pool = torch.zeros((P["probe"], s.hidden), **f32)
        self.beta = torch.ones((L, S, s.heads), **f32)
        self.bmode = torch.zeros((S,), **i32)
        self.flags = torch.zeros((NUM_FLAGS, L, 1), **i32)
        self.token_row = torch.full((s.max_tokens,), -1, **i32)
        self.token_pos = torch.zeros((s.max_tokens,), **i32)
        self.spans = torch.zeros((s.max_reqs, s.max_images, 2), **i32)
        self.mass_cap = torch.full((L, s.max_tokens), -1, **i32)
        self.mass_buf = torch.zeros((s.capture_rows, s.heads, s.max_images), **f32)
        self.head_cap = torch.full((L, s.max_tokens), -1, **i32)
        self.res_cap = torch.full((L, s.max_tokens), -1, **i32)
        self.head_buf = torch.zeros((s.capture_rows, s.heads, s.head_dim), **act)
        self.res_buf = torch.zeros((s.capture_rows, 1, s.hidden), **act)
        self.one_a = torch.ones((1, 1), **f32)
        self.zero_b = torch.zeros((1, 1), **f32)
        self.no_row = torch.full((1, 1), -1, **i32)
        self.zero_pool = torch.zeros((1, 1, s.hidden), **act)
        self.pools = {"head": self.head_pool, "res": self.res_pool, "neu": self.neu_pool,
                      "probe": self.probe_pool}

    def nbytes(self, which: str = "all") -> int:
        """Bytes of every buffer, or of ``"slots"`` (the per-slot tables) or ``"pool"``."""
        slots = (self.a, self.b, self.c, self.vrow, self.coef, self.rmode, self.urow, self.gamma, self.nrow,
                 self.beta, self.bmode, self.prow, self.pbias, self.thresh, self.gmode)
        pools = (self.head_pool, self.res_pool, self.neu_pool, self.probe_pool)
        if which == "slots":
            ts = slots
        elif which == "pool":
            ts = pools
        else:
            ts = [t for t in vars(self).values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in ts)
