"""Per-slot operator buffers for a batch of SteerSpecs (one spec per batch row).

Each batch row owns two slots, one per phase, because an item may act on prompt tokens
only, generated tokens only, or both::

    slot = 2 * row + phase        # phase 0: the token is a prompt token
                                  # phase 1: the token was generated (decode steps)

    rows = [spec A (steer layer 1, positions "all"), empty, spec C (heads, "generated")]
    token_slot at layer 1 for a prefill of 3 rows x 2 tokens:
        [0, 0, -1, -1, -1, -1]    # only row 0 steers layer 1 in the prompt phase

The interventions of each (row, phase) come from the one spec compiler
(``emosteer/request/compile.py``) that the vLLM worker uses too; the plan lays its slot programs
out densely. For every layer the plan holds the buffers the hooks read (``a``, ``b``, ``v``
for the head affine, ``alpha``, ``u`` for the residual add, ``gamma`` and the mask for the
neuron gain; the hooks pass them to the ops as a pool whose row s belongs to slot s)
plus an ``on`` flag per slot; a token's slot at a layer is -1 unless that slot acts there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from emosteer.request.bank import ModelInfo, VectorBank
from emosteer.request.compile import PHASES, compile_request, materialize
from emosteer.request.spec import CaptureItem, SteerSpec

PHASE_PROMPT, PHASE_GENERATED = 0, 1
NUM_PHASES = 2

__all__ = ["LayerPlan", "Plan", "PHASE_PROMPT", "PHASE_GENERATED"]


@dataclass
class LayerPlan:
    """Buffers of one decoder layer; a field is None when no slot acts there."""

    head_a: torch.Tensor | None = None  # [S, H] float32
    head_b: torch.Tensor | None = None  # [S, H] float32
    head_v: torch.Tensor | None = None  # [S, H, D] model dtype
    head_on: torch.Tensor | None = None  # [S] bool
    res_alpha: torch.Tensor | None = None  # [S] float32
    res_u: torch.Tensor | None = None  # [S, d] model dtype
    res_on: torch.Tensor | None = None  # [S] bool
    gain_gamma: torch.Tensor | None = None  # [S] float32
    gain_mask: torch.Tensor | None = None  # [S, I] float32 neuron masks
    gain_on: torch.Tensor | None = None  # [S] bool
    boost_beta: torch.Tensor | None = None  # [S, H] float32 VEE boost (1 = none)
    boost_mode: torch.Tensor | None = None  # [S] int64: 0 = weights, 1 = logits
    boost_on: torch.Tensor | None = None  # [S] bool
    cap_heads: torch.Tensor | None = None  # [B] bool: rows capturing head outputs here
    cap_res: torch.Tensor | None = None  # [B] bool: rows capturing the residual here
    cap_attn: torch.Tensor | None = None  # [B] bool: rows capturing attention to image here


@dataclass
class Plan:
    """Everything the hooks need for one batch of specs."""

    info: ModelInfo
    specs: list[SteerSpec]
    layers: list[LayerPlan]
    row_on: torch.Tensor  # [B] bool: the row intervenes somewhere
    captures: list[CaptureItem | None] = field(default_factory=list)
    pos_slot: list[dict[int, int]] = field(default_factory=list)  # row -> prompt position -> slot

    def position_map(self, device) -> torch.Tensor | None:
        """[B, P] int64: the slot of (row, prompt position) for position groups, -1 else."""
        if not any(self.pos_slot):
            return None
        P = max(max(m) for m in self.pos_slot if m) + 1
        out = torch.full((len(self.pos_slot), P), -1, dtype=torch.long)
        for r, m in enumerate(self.pos_slot):
            for p, sl in m.items():
                out[r, p] = sl
        return out.to(device)

    @property
    def num_rows(self) -> int:
        return len(self.specs)

    @property
    def vee(self) -> bool:
        """Some row boosts attention or captures attention to image keys (the attention
        of the decoder then runs emosteer's own eager implementation)."""
        return any(lp.boost_on is not None or lp.cap_attn is not None for lp in self.layers)

    @classmethod
    def build(
        cls,
        specs: list[SteerSpec],
        bank: VectorBank | None,
        info: ModelInfo,
        dtype: torch.dtype,
        device: torch.device,
        prompt_lens: Sequence[int] | None = None,
    ) -> "Plan":
        """``prompt_lens`` (per row) resolves "last" and checks listed positions; specs
        with such positions need it."""
        B, L, H, D = len(specs), info.num_layers, info.num_heads, info.head_dim
        d, I = info.hidden_size, info.intermediate_size
        specs = [s.resolve(info) for s in specs]
        for i, s in enumerate(specs):
            s.validate(bank, info, None if prompt_lens is None else int(prompt_lens[i]))

        layers = [LayerPlan() for _ in range(L)]
        f32 = dict(dtype=torch.float32, device=device)
        rows: dict[str, torch.Tensor] = {}

        def row(key: str) -> torch.Tensor:
            # The same pool rows the vLLM worker writes (emosteer/request/compile.py).
            if key not in rows:
                rows[key] = materialize(key, bank, info)
            return rows[key]

        # Slots: 2*row + phase for every prompt / generated token, then one per position
        # group ("last", listed positions) of each row.
        progs: list[tuple[int, object]] = []
        pos_slot: list[dict[int, int]] = [{} for _ in range(B)]
        S = NUM_PHASES * B
        for r, spec in enumerate(specs):
            n = None if prompt_lens is None else int(prompt_lens[r])
            req = compile_request(spec, bank, info, n)
            for ph, phase in enumerate(PHASES):
                if req.phases[phase] is not None:
                    progs.append((NUM_PHASES * r + ph, req.phases[phase]))
            for pos, name in req.positions().items():
                if pos < 0:
                    raise ValueError(f"row {r}: positions 'last' needs the prompt lengths (prompt_lens)")
                pos_slot[r][pos] = S
                progs.append((S, req.phases[name]))
                S += 1
        for slot, prog in progs:
            for layer, (alpha, key) in prog.res.items():
                lp = layers[layer]
                if lp.res_alpha is None:
                    lp.res_alpha = torch.zeros(S, **f32)
                    lp.res_u = torch.zeros(S, d, dtype=dtype, device=device)
                    lp.res_on = torch.zeros(S, dtype=torch.bool, device=device)
                lp.res_alpha[slot] = alpha
                lp.res_u[slot] = row(key).to(device=device, dtype=dtype)
                lp.res_on[slot] = True
            for (layer, head), (a, b, key) in prog.heads.items():
                lp = layers[layer]
                if lp.head_a is None:
                    lp.head_a = torch.ones(S, H, **f32)
                    lp.head_b = torch.zeros(S, H, **f32)
                    lp.head_v = torch.zeros(S, H, D, dtype=dtype, device=device)
                    lp.head_on = torch.zeros(S, dtype=torch.bool, device=device)
                lp.head_a[slot, head], lp.head_b[slot, head] = a, b
                if key is not None:
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

        captures = [s.capture for s in specs]
        for row, c in enumerate(captures):
            if c is None:
                continue
            for key, sel in (("cap_heads", c.heads), ("cap_res", c.residual), ("cap_attn", c.attn_image)):
                for layer in sel or ():
                    lp = layers[layer]
                    if getattr(lp, key) is None:
                        setattr(lp, key, torch.zeros(B, dtype=torch.bool, device=device))
                    getattr(lp, key)[row] = True

        row_on = torch.tensor([s.intervenes() for s in specs], dtype=torch.bool, device=device)
        return cls(info=info, specs=specs, layers=layers, row_on=row_on, captures=captures,
                   pos_slot=pos_slot)
