"""Per-slot operator buffers for a batch of SteerSpecs (one spec per batch row).

Each batch row owns two slots, one per phase, because an item may act on prompt tokens
only, generated tokens only, or both::

    slot = 2 * row + phase        # phase 0: the token is a prompt token
                                  # phase 1: the token was generated (decode steps)

    rows = [spec A (steer layer 1, positions "all"), empty, spec C (heads, "generated")]
    token_slot at layer 1 for a prefill of 3 rows x 2 tokens:
        [0, 0, -1, -1, -1, -1]    # only row 0 steers layer 1 in the prompt phase

For every layer the plan holds the same buffers the fused ops read (``a``, ``b``, ``v``
for the head affine, ``alpha``, ``u`` for the residual add, ``g`` for the neuron gain)
plus an ``on`` flag per slot; a token's slot at a layer is -1 unless that slot acts there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from emosteer.bank import ModelInfo, VectorBank
from emosteer.spec import CaptureItem, SteerSpec

PHASE_PROMPT, PHASE_GENERATED = 0, 1
NUM_PHASES = 2

__all__ = ["LayerPlan", "Plan", "PHASE_PROMPT", "PHASE_GENERATED", "applies"]


def applies(positions: str, phase: int) -> bool:
    """Whether an item with ``positions`` acts on a token of ``phase``."""
    return positions == "all" or (positions == "prompt") == (phase == PHASE_PROMPT)


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
    gain_g: torch.Tensor | None = None  # [S, I] float32
    gain_on: torch.Tensor | None = None  # [S] bool
    cap_heads: torch.Tensor | None = None  # [B] bool: rows capturing head outputs here
    cap_res: torch.Tensor | None = None  # [B] bool: rows capturing the residual here


@dataclass
class Plan:
    """Everything the hooks need for one batch of specs."""

    info: ModelInfo
    specs: list[SteerSpec]
    layers: list[LayerPlan]
    row_on: torch.Tensor  # [B] bool: the row intervenes somewhere
    captures: list[CaptureItem | None] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.specs)

    @classmethod
    def build(
        cls,
        specs: list[SteerSpec],
        bank: VectorBank | None,
        info: ModelInfo,
        dtype: torch.dtype,
        device: torch.device,
    ) -> "Plan":
        B, L, H, D = len(specs), info.num_layers, info.num_heads, info.head_dim
        d, I, S = info.hidden_size, info.intermediate_size, NUM_PHASES * len(specs)
        specs = [s.resolve(info) for s in specs]
        for i, s in enumerate(specs):
            if s.boost is not None:
                raise NotImplementedError(
                    f"row {i}: 'boost' (VEE attention key bias) is not executed by the HF "
                    "backend; drop it or use the vLLM backend once it supports it"
                )
            s.validate(bank, info)

        layers = [LayerPlan() for _ in range(L)]
        f32 = dict(dtype=torch.float32, device=device)

        def vec(name: str) -> torch.Tensor:
            assert bank is not None  # validate() has checked the names
            return bank.get(name)

        # residual add: sum of every steer item on the layer (one item -> alpha=scale, u=vec
        # exactly as the vLLM path does; several -> alpha=1, u=sum(scale*vec) in fp32)
        acc: dict[tuple[int, int], list[tuple[float, torch.Tensor]]] = {}
        for row, s in enumerate(specs):
            for item in s.steer:
                for ph in range(NUM_PHASES):
                    if not applies(item.positions, ph):
                        continue
                    for layer in item.layers or ():
                        acc.setdefault((layer, NUM_PHASES * row + ph), []).append(
                            (item.scale, vec(item.vector)[layer])
                        )
        for (layer, slot), terms in acc.items():
            lp = layers[layer]
            if lp.res_alpha is None:
                lp.res_alpha = torch.zeros(S, **f32)
                lp.res_u = torch.zeros(S, d, dtype=dtype, device=device)
                lp.res_on = torch.zeros(S, dtype=torch.bool, device=device)
            if len(terms) == 1:
                alpha, u = terms[0][0], terms[0][1].float()
            else:
                alpha, u = 1.0, sum(sc * t.float() for sc, t in terms)
            lp.res_alpha[slot] = alpha
            lp.res_u[slot] = u.to(device=device, dtype=dtype)
            lp.res_on[slot] = True

        # head affine: z <- a*z + b*v per (slot, head)
        for row, s in enumerate(specs):
            for item in s.heads:
                lp = layers[item.layer]
                if lp.head_a is None:
                    lp.head_a = torch.ones(S, H, **f32)
                    lp.head_b = torch.zeros(S, H, **f32)
                    lp.head_v = torch.zeros(S, H, D, dtype=dtype, device=device)
                    lp.head_on = torch.zeros(S, dtype=torch.bool, device=device)
                a, b = item.affine()
                for ph in range(NUM_PHASES):
                    if not applies(item.positions, ph):
                        continue
                    slot = NUM_PHASES * row + ph
                    lp.head_a[slot, item.head] = a
                    lp.head_b[slot, item.head] = b
                    if item.vector is not None:
                        lp.head_v[slot, item.head] = vec(item.vector)[item.layer, item.head].to(
                            device=device, dtype=dtype
                        )
                    lp.head_on[slot] = True

        # neuron gain: g = 1 + (gamma - 1) * mask
        for row, s in enumerate(specs):
            if s.neurons is None:
                continue
            mask = vec(s.neurons.set).to(device=device, dtype=torch.float32)  # [L, I]
            for layer in range(L):
                if not bool(mask[layer].any()):
                    continue
                lp = layers[layer]
                if lp.gain_g is None:
                    lp.gain_g = torch.ones(S, I, **f32)
                    lp.gain_on = torch.zeros(S, dtype=torch.bool, device=device)
                for ph in range(NUM_PHASES):
                    if applies(s.neurons.positions, ph):
                        slot = NUM_PHASES * row + ph
                        lp.gain_g[slot] = 1.0 + (s.neurons.gamma - 1.0) * mask[layer]
                        lp.gain_on[slot] = True

        captures = [s.capture for s in specs]
        for row, c in enumerate(captures):
            if c is None:
                continue
            for key, sel in (("cap_heads", c.heads), ("cap_res", c.residual)):
                for layer in sel or ():
                    lp = layers[layer]
                    if getattr(lp, key) is None:
                        setattr(lp, key, torch.zeros(B, dtype=torch.bool, device=device))
                    getattr(lp, key)[row] = True

        row_on = torch.tensor([s.intervenes() for s in specs], dtype=torch.bool, device=device)
        return cls(info=info, specs=specs, layers=layers, row_on=row_on, captures=captures)
