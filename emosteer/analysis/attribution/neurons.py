"""Neuron attribution: the MLP neurons that write the emotion, for ENA.

**Neurons.** ``A[l,i] = cos(W_down[l][:, i], S_l)`` preselects candidates per layer; attribution
patching (HF backend: ``(m⁺ − m⁻)·∂M/∂m`` at the last prompt token, averaged over pairs)
ranks them. The top-K neurons become the ``"<emotion>.ena"`` neuron mask in the bank.
"""

from __future__ import annotations

import math

import torch

from emosteer.analysis.attribution.metrics import _cos, _target_ids, _weights, target_logmass
from emosteer.analysis.attribution.results import NeuronScores
from emosteer.analysis.extract import pair_text

__all__ = ["neuron_attribution"]


def neuron_attribution(runner, emotion: str, pairs, vector: str | None = None, top_k: int = 32,
                       n_candidates: int | None = None, lexicon=None, tids=None,
                       _captures=None) -> NeuronScores:
    """Alignment of down_proj columns with S_l (``n_candidates`` best per layer, default
    ⌈10·top_k/L⌉), refined by attribution patching (HF backend; without gradients the
    candidates are ranked by alignment)."""
    vector = vector or emotion
    S = runner.bank.get(vector, "residual").float()
    L = runner.info.num_layers
    W = _weights(runner, "down_proj")
    align = torch.stack([_cos(W[l].T, S[l]) for l in range(L)])  # [L, I]
    I = align.shape[1]
    # candidates per layer: cosines are not comparable across layers (S_l of a shallow
    # layer can be small and noisy), the attribution-patching scores are
    per_layer = min(I, n_candidates or max(1, math.ceil(10 * top_k / L)))
    top_l = align.topk(per_layer, dim=1).indices  # [L, per_layer]
    cand = (top_l + I * torch.arange(L).unsqueeze(1)).flatten()
    cand = cand[align.flatten()[cand].argsort(descending=True)]
    atp = None
    if hasattr(runner, "forward_grad"):
        tids = _target_ids(runner, emotion, lexicon, tids)
        ids_pos = runner.encode([pair_text(p.emotional, p.query) for p in pairs])
        ids_neg = runner.encode([pair_text(p.neutral, p.query) for p in pairs])
        keep = {"mlp": list(range(L))}
        atp = torch.zeros(L, I)
        bs = getattr(runner, "batch_size", 8)
        for s in range(0, len(pairs), bs):
            pos, neg = ids_pos[s:s + bs], ids_neg[s:s + bs]
            with torch.no_grad():
                _, acts_p, offs_p = runner.forward_grad(pos, [None] * len(pos), keep)
                m_pos = torch.stack([torch.stack([acts_p["mlp"][l][i, -1].detach() for l in range(L)])
                                     for i in range(len(pos))])  # [B, L, I]
            lg, acts_n, _ = runner.forward_grad(neg, [None] * len(neg), keep)
            target_logmass(lg[:, -1], tids).sum().backward()
            m_neg = torch.stack([torch.stack([acts_n["mlp"][l][i, -1].detach() for l in range(L)])
                                 for i in range(len(neg))])
            g = torch.stack([torch.stack([acts_n["mlp"][l].grad[i, -1] for l in range(L)])
                             for i in range(len(neg))])
            atp += ((m_pos - m_neg) * g).sum(0).float().cpu()
            runner.model.zero_grad(set_to_none=True)
        atp /= len(pairs)
        order = cand[atp.flatten()[cand].argsort(descending=True)]
        method = "align+atp"
    else:
        order, method = cand, "align"
    top = [(int(i) // I, int(i) % I) for i in order[:top_k]]
    return NeuronScores(align=align, atp=atp, top=top, method=method)


