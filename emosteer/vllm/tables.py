"""From a request's spec to the per-slot tensors the fused ops read (pure torch, no vLLM).

A request's interventions can differ between its prompt and its generated positions
(``positions: "prompt" | "generated" | "all"``), so each request holds up to two slots:
one for the config in effect at prompt positions, one at generated positions.
``phase_spec`` cuts that config out of a spec; ``slot_tables`` turns it into the rows of
the device buffers for one tensor-parallel rank (heads and neurons sharded like vLLM
shards attention heads and the MLP, head ids global in the spec).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from emosteer.bank import ModelInfo, VectorBank, head_shard, neuron_shard, shard_entry
from emosteer.spec import SpecError, SteerSpec

PHASES = ("prompt", "generated")


def phase_spec(spec: SteerSpec, phase: str) -> SteerSpec:
    """The interventions of ``spec`` in effect at ``phase`` positions (no capture)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    keep = lambda item: item.positions in ("all", phase)  # noqa: E731
    neurons = spec.neurons if spec.neurons is not None and keep(spec.neurons) else None
    return SteerSpec(
        steer=tuple(s for s in spec.steer if keep(s)),
        heads=tuple(h for h in spec.heads if keep(h)),
        neurons=neurons,
    )


def phase_fingerprints(spec: SteerSpec, bank: VectorBank | None) -> dict[str, str | None]:
    """phase -> fingerprint of its config (bank contents mixed in), None = nothing."""
    out: dict[str, str | None] = {}
    for phase in PHASES:
        ps = phase_spec(spec, phase)
        out[phase] = ps.fingerprint(bank) if ps.intervenes() else None
    return out


@dataclass
class SlotRows:
    """One slot's rows of every buffer, on the CPU (see ``buffers.SteerBuffers``)."""

    a: torch.Tensor  # [L, Hl] fp32
    b: torch.Tensor  # [L, Hl] fp32
    v: torch.Tensor  # [L, Hl, D] fp32
    alpha: torch.Tensor  # [L] fp32
    u: torch.Tensor  # [L, d] fp32
    g: torch.Tensor  # [L, Il] fp32


def slot_tables(
    spec: SteerSpec, bank: VectorBank, info: ModelInfo, tp_size: int = 1, tp_rank: int = 0
) -> SlotRows:
    """The buffer rows for one (already phase-cut, resolved) config on one TP rank.

    Heads: ``z <- a*z + b*v`` per (layer, head) held by this rank (others are skipped:
    their rank applies them). Residual: items on the same layer add up; a single item
    keeps ``alpha = scale, u = vec[l]`` (the same product the reference computes),
    several are folded into ``alpha = 1, u = sum(scale_i * vec_i[l])``. Neurons:
    ``g = 1 + (gamma - 1) * mask`` on this rank's neurons.
    """
    L, D, d = info.num_layers, info.head_dim, info.hidden_size
    heads = head_shard(info.num_heads, tp_size, tp_rank)
    neurons = neuron_shard(info.intermediate_size, tp_size, tp_rank)
    rows = SlotRows(
        a=torch.ones(L, len(heads)),
        b=torch.zeros(L, len(heads)),
        v=torch.zeros(L, len(heads), D),
        alpha=torch.zeros(L),
        u=torch.zeros(L, d),
        g=torch.ones(L, len(neurons)),
    )
    for i, h in enumerate(spec.heads):
        if h.head not in heads:
            continue
        local = h.head - heads.start
        a, b = h.affine()
        rows.a[h.layer, local], rows.b[h.layer, local] = a, b
        if h.vector is not None and b != 0.0:
            vec = shard_entry(bank.get(h.vector, "head"), "head", tp_size, tp_rank)
            rows.v[h.layer, local] = vec[h.layer, local].float()
    per_layer: dict[int, list[tuple[float, torch.Tensor]]] = {}
    for s in spec.steer:
        if s.layers is None:
            raise SpecError("steer.layers", "resolve the spec (SteerSpec.resolve) before slot_tables")
        vec = bank.get(s.vector, "residual")
        for layer in s.layers:
            per_layer.setdefault(layer, []).append((s.scale, vec[layer].float()))
    for layer, items in per_layer.items():
        if len(items) == 1:
            rows.alpha[layer], rows.u[layer] = items[0]
        else:
            rows.alpha[layer] = 1.0
            rows.u[layer] = sum(scale * vec for scale, vec in items)
    if spec.neurons is not None:
        mask = shard_entry(bank.get(spec.neurons.set, "neurons"), "neurons", tp_size, tp_rank)
        rows.g = 1.0 + (spec.neurons.gamma - 1.0) * mask.float()
    return rows


__all__ = ["PHASES", "SlotRows", "phase_spec", "phase_fingerprints", "slot_tables"]
