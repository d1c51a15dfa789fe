"""Per-slot operator buffers for a batch of SteerSpecs (one spec per batch row).

Each batch row owns two slots, one per phase, because an item may act on prompt tokens
only, generated tokens only, or both, and one more per position group ("last", listed
prompt positions)::

    slot = 2 * row + phase        # phase 0: the token is a prompt token
                                  # phase 1: the token was generated (decode steps)

    rows = [spec A (steer layer 1, positions "all"), empty, spec C (heads, "generated")]
    token_slot at layer 1 for a prefill of 3 rows x 2 tokens:
        [0, 0, -1, -1, -1, -1]    # only row 0 steers layer 1 in the prompt phase

The interventions of each (row, phase) come from the one spec compiler
(``emosteer/request/compile.py``) that the vLLM worker uses too; the plan lays its slot programs
out densely. For every layer the plan holds the buffers the hooks read (``a``, ``b``, ``v``
for the head affine, ``coef``, ``mode``, ``u`` for the residual terms, ``gamma`` and the mask for the
neuron gain; the hooks pass them to the ops as a pool whose row s belongs to slot s)
plus an ``on`` flag per slot; a token's slot at a layer is -1 unless that slot acts there.
Which slot and which capture row a token gets comes from the per-step builder the vLLM
worker uses too (``emosteer/request/step.py``); the plan holds its per-batch tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from emosteer.request import inline as inline_vec
from emosteer.request.bank import ModelInfo, VectorBank
import numpy as np

from emosteer.request.compile import MAX_RES_TERMS, PHASES, compile_request, key_rows, materialize
from emosteer.request.spec import CaptureItem, SteerSpec
from emosteer.request.step import BatchTables, StepRow

NUM_PHASES = 2

__all__ = ["LayerPlan", "Plan"]


@dataclass
class LayerPlan:
    """Buffers of one decoder layer; a field is None when no slot acts there."""

    head_a: torch.Tensor | None = None  # [S, H] float32
    head_b: torch.Tensor | None = None  # [S, H] float32
    head_c: torch.Tensor | None = None  # [S, H] float32 relative adds (scale / |v|)
    head_v: torch.Tensor | None = None  # [S + R, H, D] model dtype: row s is slot s's, then
    # the runs of rows of position-aligned patches (read at the per-token row offset)
    head_row: torch.Tensor | None = None  # [S, H] int32 row of head_v per slot and head
    head_on: torch.Tensor | None = None  # [S] bool
    res_coef: torch.Tensor | None = None  # [S, K] float32 residual terms (ops.residual_steer)
    res_mode: torch.Tensor | None = None  # [S, K] int32
    res_row: torch.Tensor | None = None  # [S, K] int32 row of res_u (s*K + k), -1 = none
    res_u: torch.Tensor | None = None  # [S*K, d] model dtype
    res_on: torch.Tensor | None = None  # [S] bool
    gate_row: torch.Tensor | None = None  # [S] int32 row of Plan.probes, -1 = no gate here
    gain_gamma: torch.Tensor | None = None  # [S] float32
    gain_mask: torch.Tensor | None = None  # [S, I] float32 neuron masks
    gain_on: torch.Tensor | None = None  # [S] bool
    boost_beta: torch.Tensor | None = None  # [S, H] float32 VEE boost (1 = none)
    boost_mode: torch.Tensor | None = None  # [S] int64: 0 = weights, 1 = logits
    boost_on: torch.Tensor | None = None  # [S] bool


@dataclass
class Plan:
    """Everything the hooks need for one batch of specs."""

    info: ModelInfo
    specs: list[SteerSpec]
    layers: list[LayerPlan]
    tables: BatchTables  # per row: slots of its phases and position groups, its capture
    captures: list[CaptureItem | None] = field(default_factory=list)
    # The probe gates (ops.probe_gate): per slot its probe direction, bias, threshold and
    # mode, and per batch row the latch state, carried over the steps of one generation.
    probes: torch.Tensor | None = None  # [S, d] float32
    gate_bias: torch.Tensor | None = None  # [S] float32
    gate_thresh: torch.Tensor | None = None  # [S] float32
    gate_mode: torch.Tensor | None = None  # [S] int32
    gate_state: torch.Tensor | None = None  # [B] int32

    @property
    def vee(self) -> bool:
        """Some row boosts attention or captures attention to image keys (the attention
        of the decoder then runs emosteer's own eager implementation)."""
        return any(lp.boost_on is not None for lp in self.layers) or any(
            c is not None and bool(c.attn_image) for c in self.captures)

    @classmethod
    def build(
        cls,
        specs: list[SteerSpec],
        bank: VectorBank | None,
        info: ModelInfo,
        dtype: torch.dtype,
        device: torch.device,
        prompt_lens: Sequence[int],
    ) -> "Plan":
        """``prompt_lens`` (per row) resolves "last", checks listed positions and tells
        prompt tokens from generated ones."""
        B, L, H, D = len(specs), info.num_layers, info.num_heads, info.head_dim
        d, I = info.hidden_size, info.intermediate_size
        specs = [s.resolve(info) for s in specs]
        for i, s in enumerate(specs):
            s.validate(bank, info, int(prompt_lens[i]))
        # The vectors the specs carry inline join the bank the rows are read from.
        bank = inline_vec.overlay(bank, info, [it for s in specs for it in s.inline_items()])

        layers = [LayerPlan() for _ in range(L)]
        f32 = dict(dtype=torch.float32, device=device)
        rows: dict[str, torch.Tensor] = {}

        def row(key: str) -> torch.Tensor:
            # The same pool rows the vLLM worker writes (emosteer/request/compile.py).
            if key not in rows:
                rows[key] = materialize(key, bank, info)
            return rows[key]

        # Slots: 2*row + phase for every prompt / generated token, then one per distinct
        # position group ("last", listed positions) of each row: the groups of one row
        # with the same program (a position-aligned patch over many positions) share one.
        progs: list[tuple[int, object]] = []
        step_rows: list[StepRow] = []
        S = NUM_PHASES * B
        for r, spec in enumerate(specs):
            n = int(prompt_lens[r])
            req = compile_request(spec, bank, info, n)
            for ph, phase in enumerate(PHASES):
                if req.phases[phase] is not None:
                    progs.append((NUM_PHASES * r + ph, req.phases[phase]))
            groups = sorted(req.positions().items())
            by_fp: dict[str, int] = {}
            gslots = []
            for _, name in groups:
                fp = req.phases[name].fingerprint
                if fp not in by_fp:
                    by_fp[fp] = S
                    progs.append((S, req.phases[name]))
                    S += 1
                gslots.append(by_fp[fp])
            on = spec.intervenes()
            step_rows.append(StepRow(
                n, NUM_PHASES * r if on else -1, NUM_PHASES * r + 1 if on else -1,
                np.array([p for p, _ in groups], dtype=np.int64),
                np.array(gslots, dtype=np.int32), spec.capture,
                spec.when.layer if spec.when is not None else -1,
                np.array([req.row_off.get(p, 0) for p, _ in groups], dtype=np.int32)
                if req.row_off else None))
        K = MAX_RES_TERMS
        gates = {}
        runs: list[dict[str, int]] = [{} for _ in range(L)]  # per layer: run key -> first row
        extra: list[list[torch.Tensor]] = [[] for _ in range(L)]  # per layer: runs past row S
        for slot, prog in progs:
            for layer, terms in prog.res.items():
                lp = layers[layer]
                if lp.res_coef is None:
                    lp.res_coef = torch.zeros(S, K, **f32)
                    lp.res_mode = torch.zeros(S, K, dtype=torch.int32, device=device)
                    lp.res_row = torch.full((S, K), -1, dtype=torch.int32, device=device)
                    lp.res_u = torch.zeros(S * K, d, dtype=dtype, device=device)
                    lp.res_on = torch.zeros(S, dtype=torch.bool, device=device)
                for k, (coef, mode, key) in enumerate(terms):
                    lp.res_coef[slot, k], lp.res_mode[slot, k] = coef, mode
                    lp.res_row[slot, k] = slot * K + k
                    lp.res_u[slot * K + k] = row(key).to(device=device, dtype=dtype)
                lp.res_on[slot] = True
            if prog.gate is not None:
                gates[slot] = prog.gate
            for (layer, head), (a, b, c, key) in prog.heads.items():
                lp = layers[layer]
                if lp.head_a is None:
                    lp.head_a = torch.ones(S, H, **f32)
                    lp.head_b = torch.zeros(S, H, **f32)
                    lp.head_c = torch.zeros(S, H, **f32)
                    lp.head_v = torch.zeros(S, H, D, dtype=dtype, device=device)
                    lp.head_row = torch.arange(S, dtype=torch.int32, device=device).unsqueeze(1).repeat(1, H)
                    lp.head_on = torch.zeros(S, dtype=torch.bool, device=device)
                lp.head_a[slot, head], lp.head_b[slot, head], lp.head_c[slot, head] = a, b, c
                if key is not None and key_rows(key) > 1:  # a run: rows S + ..., once per layer
                    if key not in runs[layer]:
                        runs[layer][key] = S + sum(x.shape[0] for x in extra[layer])
                        extra[layer].append(row(key).to(device=device, dtype=dtype))
                    lp.head_row[slot, head] = runs[layer][key]
                elif key is not None:
                    lp.head_v[slot, head] = row(key)[head].to(device=device, dtype=dtype)
                lp.head_on[slot] = True
            for layer, (gamma, key) in prog.neu.items():
                lp = layers[layer]
                if lp.gain_gamma is None:
                    lp.gain_gamma = torch.ones(S, **f32)
                    lp.gain_mask = torch.zeros(S, I, **f32)
                    lp.gain_on = torch.zeros(S, dtype=torch.bool, device=device)
                lp.gain_gamma[slot] = gamma
                lp.gain_mask[slot] = row(key).to(device)
                lp.gain_on[slot] = True
            for layer, per_head in prog.boost.items():
                lp = layers[layer]
                if lp.boost_beta is None:
                    lp.boost_beta = torch.ones(S, H, **f32)
                    lp.boost_mode = torch.zeros(S, dtype=torch.long, device=device)
                    lp.boost_on = torch.zeros(S, dtype=torch.bool, device=device)
                for head, beta in per_head.items():
                    lp.boost_beta[slot, head] = beta
                lp.boost_mode[slot] = prog.boost_mode
                lp.boost_on[slot] = True

        for layer, parts in enumerate(extra):
            if parts:
                layers[layer].head_v = torch.cat([layers[layer].head_v, *parts])
        plan = cls(info=info, specs=specs, layers=layers, tables=BatchTables.build(step_rows),
                   captures=[s.capture for s in specs])
        if gates:
            plan.probes = torch.zeros(S, d, **f32)
            plan.gate_bias, plan.gate_thresh = torch.zeros(S, **f32), torch.zeros(S, **f32)
            plan.gate_mode = torch.zeros(S, dtype=torch.int32, device=device)
            plan.gate_state = torch.zeros(B, dtype=torch.int32, device=device)
            for slot, (layer, key, bias, thresh, gmode) in gates.items():
                lp = layers[layer]
                if lp.gate_row is None:
                    lp.gate_row = torch.full((S,), -1, dtype=torch.int32, device=device)
                lp.gate_row[slot] = slot
                plan.probes[slot] = row(key).to(device)
                plan.gate_bias[slot], plan.gate_thresh[slot], plan.gate_mode[slot] = bias, thresh, gmode
        return plan
