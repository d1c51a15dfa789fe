"""What the attribution stages return: one result class per stage, and the run's
``AttributionResult`` with its JSON form (attribution.json) and plots.

The plots are drawn by :mod:`emosteer.report.plots`, the same functions as the demo
report's, from the JSON-like form of each result.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from emosteer.report.plots import plot_head_panels, plot_layer_profile
from emosteer.request.bank import VectorBank

__all__ = ["LayerProfile", "HeadScores", "AttnScores", "NeuronScores", "HeadMap", "AttributionResult"]


@dataclass
class LayerProfile:
    alpha: float
    scales: list[float]  # steering scale per layer (alpha * mean norm / |S_l|)
    proxy: str
    proxy_base: float
    proxy_change: list[float]  # ΔM per layer
    hit_rate_base: float
    hit_rate: list[float] | None  # per layer, None without narratives
    hit_rate_change: list[float] | None  # C_l
    hit_rate_relative: bool
    emotional_frac: float  # share of sweep narratives naming any emotion
    profile: list[float]  # the one the stages use
    profile_source: str  # "hit_rate" | "proxy"
    stages: dict[str, Any] = field(default_factory=dict)
    # Bootstrap over prompts (resampled, the profile recomputed): 95 % band per layer, the
    # share of resamples whose aggregate band equals the point estimate's, and the share
    # whose profile shows all three stages (non-empty adapt, aggregate and execute).
    band: list[list[float]] | None = None  # [L][2]
    stage_confidence: float | None = None
    three_stage_frac: float | None = None
    three_stages: bool | None = None
    # prompts -> share of draws of that many prompts giving the same aggregate band
    # (attribution.layers.stability_by_n): how many prompts a stable profile needs
    stability_by_n: dict[int, float] = field(default_factory=dict)


@dataclass
class HeadScores:
    intention: torch.Tensor  # [L, H]
    source: str
    candidates: list[tuple[int, int]]
    recovery: dict[tuple[int, int], float]
    top: list[tuple[int, int]]
    confirmed: bool  # every top head has positive recovery
    patching: str = "last-token"  # how X+ outputs were patched in: "position-aligned" / "last-token"


@dataclass
class AttnScores:
    """Attention-to-image attribution (VEE heads) of one emotion."""

    mass_pos: torch.Tensor  # [L, H] mean image mass on emotional images (last prompt token)
    mass_neg: torch.Tensor  # [L, H] ... on their neutral counterparts
    diff: torch.Tensor  # [L, H] mean over pairs of (A+ - A-)
    stderr: torch.Tensor  # [L, H] standard error of that mean
    beta: float
    candidates: list[tuple[int, int]]
    effect: dict[tuple[int, int], float]  # mean ΔM of X+ with the head alone boosted
    top: list[tuple[int, int]]
    confirmed: bool  # every top head has a positive effect


@dataclass
class NeuronScores:
    align: torch.Tensor  # [L, I]
    atp: torch.Tensor | None  # [L, I], None without gradients
    top: list[tuple[int, int]]
    method: str


@dataclass
class HeadMap:
    """Every (layer, head) scored by activation patching: ``recovery[l, h]`` = mean ΔM of
    X⁻ with that head patched from X⁺, over mean (M⁺ − M⁻); ``ci`` its 95 % bootstrap
    interval over pairs (pairs resampled, the ratio of means recomputed)."""

    emotion: str
    recovery: torch.Tensor  # [L, H]
    ci: torch.Tensor  # [L, H, 2]
    n_pairs: int
    patching: str
    gap: float  # mean (M⁺ − M⁻): what a full recovery would restore

    def top(self, k: int) -> list[tuple[int, int]]:
        """The k heads with the highest recovery among those whose interval lies above 0
        (fewer when fewer are significant)."""
        L, H = self.recovery.shape
        sig = [(l, h) for l in range(L) for h in range(H) if float(self.ci[l, h, 0]) > 0]
        return sorted(sig, key=lambda c: float(self.recovery[c]), reverse=True)[:k]

    def to_dict(self) -> dict:
        return {"emotion": self.emotion, "recovery": self.recovery.tolist(), "ci95": self.ci.tolist(),
                "n_pairs": self.n_pairs, "patching": self.patching, "gap": self.gap}


@dataclass
class AttributionResult:
    emotion: str
    model: str
    backend: str
    layers: LayerProfile | None = None
    heads: HeadScores | None = None
    neurons: NeuronScores | None = None
    attn: AttnScores | None = None
    bank: VectorBank | None = None

    def to_json(self, indent: int | None = 2) -> str:
        d: dict[str, Any] = {"emotion": self.emotion, "model": self.model, "backend": self.backend}
        if self.layers is not None:
            d["layers"] = self.layers.__dict__
        if self.heads is not None:
            h = self.heads
            d["heads"] = {"source": h.source, "intention": h.intention.tolist(),
                          "candidates": [list(c) for c in h.candidates],
                          "recovery": [[l, hh, r] for (l, hh), r in h.recovery.items()],
                          "top": [list(c) for c in h.top], "confirmed": h.confirmed, "patching": h.patching}
        if self.attn is not None:
            a = self.attn
            d["attn_image"] = {"beta": a.beta, "diff": a.diff.tolist(), "stderr": a.stderr.tolist(),
                               "mass_pos": a.mass_pos.tolist(), "mass_neg": a.mass_neg.tolist(),
                               "candidates": [list(c) for c in a.candidates],
                               "effect": [[l, h, e] for (l, h), e in a.effect.items()],
                               "top": [list(c) for c in a.top], "confirmed": a.confirmed}
        if self.neurons is not None:
            n = self.neurons
            d["neurons"] = {"method": n.method, "top": [list(c) for c in n.top],
                            "top_align": [float(n.align[l, i]) for l, i in n.top],
                            "top_atp": None if n.atp is None else [float(n.atp[l, i]) for l, i in n.top]}
        return json.dumps(d, indent=indent, default=float)

    def plot_layers(self, path: str | os.PathLike) -> None:
        """The layer profile with its stages (the report's layer-profile panel)."""
        lp = self.layers
        entry = {**lp.__dict__, "layers": list(range(len(lp.profile))), "change": lp.profile}
        plot_layer_profile({self.emotion: {"layer_profile": entry}}, path)

    def plot_heads(self, path: str | os.PathLike) -> None:
        """Emotional intention of every head, the top heads boxed."""
        plot_head_panels([{"map": self.heads.intention.tolist(), "top": self.heads.top,
                           "title": f"{self.emotion}: emotional intention (boxes: top heads)"}], path)

    def plot_attn(self, path: str | os.PathLike) -> None:
        """Δ attention to the image of every head, the VEE heads boxed."""
        plot_head_panels([{"map": self.attn.diff.tolist(), "top": self.attn.top,
                           "title": f"{self.emotion}: Δ attention to the image, emotional − neutral "
                                    "(boxes: VEE heads)"}], path)
