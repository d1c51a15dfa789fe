"""Attention to the image: the VEE heads of an emotion, from image pairs.

**Attention to the image (VEE heads).** On image pairs, every (layer, head)'s softmax
mass on the image keys at the last prompt token is captured in the fused attention pass
(``capture.attn_image``) for X⁺ and X⁻: ``ΔA[l,h] = mean_i (A⁺ − A⁻)`` (with a
standard error over pairs) ranks the heads that gather more from emotional images. The
top candidates are confirmed causally by VEE itself: each candidate head alone boosted
by β on X⁺ (one request per (head, pair)), effect = mean ΔM over the unboosted X⁺. The
confirmed top heads become ``"<emotion>.vee"``, the mask ``boost`` reads (the intention
heads are then kept as ``"<emotion>.heads"``).
"""

from __future__ import annotations

import math

import torch

from emosteer.analysis.attribution.metrics import _proxy_rows, _target_ids, target_logmass
from emosteer.analysis.attribution.results import AttnScores
from emosteer.analysis.extract import _encode_side
from emosteer.request.bank import VectorBank

__all__ = ["attention_attribution"]

ATTN_LAST = {"capture": {"attn_image": "all", "positions": "last"}}


def _image_mass(caps, L: int) -> torch.Tensor:
    """[N, L, H]: each row's attention mass on all of its images at its captured token."""
    return torch.stack([torch.stack([c["attn_image"][l][-1].float().sum(-1) for l in range(L)])
                        for c in caps])


def attention_attribution(runner, emotion: str, pairs, top_k: int = 5, beta: float = 2.0,
                          n_candidates: int | None = None, lexicon=None, tids=None,
                          chat: bool = True) -> AttnScores:
    """VEE heads of ``emotion`` from image pairs: ΔA ranks, single-head VEE confirms."""
    kinds = {getattr(p.emotional, "kind", "text") for p in pairs}
    if kinds != {"image"}:
        raise ValueError("attention-to-image attribution needs image pairs (the emotional and "
                         "neutral sides are images); got text pairs")
    info = runner.info
    L, H = info.num_layers, info.num_heads
    tids = _target_ids(runner, emotion, lexicon, tids)
    queries = [p.query for p in pairs]
    ids_pos = _encode_side(runner, [p.emotional for p in pairs], queries, chat)
    ids_neg = _encode_side(runner, [p.neutral for p in pairs], queries, chat)
    N = len(pairs)
    lg_pos, caps_pos = runner.forward(ids_pos, [ATTN_LAST] * N, desc="attn: X+")
    _, caps_neg = runner.forward(ids_neg, [ATTN_LAST] * N, desc="attn: X-")
    a_pos, a_neg = _image_mass(caps_pos, L), _image_mass(caps_neg, L)  # [N, L, H]
    delta = a_pos - a_neg
    diff = delta.mean(0)
    stderr = delta.std(0, unbiased=True) / math.sqrt(N) if N > 1 else torch.zeros_like(diff)
    n_cand = n_candidates or min(L * H, 2 * top_k)
    order = diff.flatten().argsort(descending=True)[:n_cand].tolist()
    cands = [(i // H, i % H) for i in order]
    masks = VectorBank(info)
    for l, h in cands:
        m = torch.zeros(L, H)
        m[l, h] = 1
        masks.add(f"_attr.{emotion}.vee1.{l}.{h}", "head_mask", m)
    runner.register(masks)
    m_pos = torch.stack([target_logmass(lg, tids) for lg in lg_pos])
    specs = [{"boost": {"heads": f"_attr.{emotion}.vee1.{l}.{h}", "beta": float(beta)}}
             for (l, h) in cands for _ in range(N)]
    m = _proxy_rows(runner, list(ids_pos) * len(cands), tids, specs, desc="attn: VEE per head")
    eff = (m.view(len(cands), N) - m_pos).mean(1)
    effect = {c: float(e) for c, e in zip(cands, eff)}
    ranked = sorted(cands, key=lambda c: (effect[c] > 0, float(diff[c]) * (effect[c] > 0), effect[c]),
                    reverse=True)
    top = ranked[:top_k]
    return AttnScores(mass_pos=a_pos.mean(0), mass_neg=a_neg.mean(0), diff=diff, stderr=stderr,
                      beta=float(beta), candidates=cands, effect=effect, top=top,
                      confirmed=all(effect[c] > 0 for c in top))


