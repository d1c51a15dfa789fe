"""Head attribution: emotional intention, confirmed by activation patching; the full head map.

**Heads.** Emotional intention ``I[l,h] = cos(W_O[l][:, h] · z̄⁺_{l,h}, S_l)`` (mean head
output on the emotional inputs through its o_proj slice; ``source="diff"`` uses the
mean X⁺−X⁻ difference instead). The top candidates are confirmed by activation patching:
each (head, pair) is one row running X⁻ with that head's output replaced by its X⁺ value,
position-aligned when the two prompts have the same token layout (every prompt position
gets the X⁺ output at the same position: image pairs of an LVLM), else at the last prompt
token only; recovery = mean ΔM / mean (M⁺ − M⁻).

**Head map.** ``head_map`` patches every (layer, head) on every pair, with no candidate
preselection, and gives each head's recovery a 95 % interval by resampling the pairs
(:func:`emosteer.report.stats.bootstrap`). ``head_types`` compares the top sets of
several emotions: a head in every emotion's set is *emotion-general*, a head in one
emotion's set only is *sentiment-specific*.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from emosteer.analysis.attribution.metrics import _cos, _proxy_rows, _target_ids, _weights
from emosteer.analysis.attribution.results import HeadMap, HeadScores
from emosteer.analysis.extract import CAPTURE_LAST, pair_text, stack_captures
from emosteer.report.stats import bootstrap
from emosteer.request.bank import VectorBank

__all__ = ["head_attribution", "head_map", "head_types"]


def _len(row) -> int:
    return len(row)  # token ids (an image prompt, MMPrompt, is its expanded ids)


def _same_layout(a, b) -> bool:
    """Whether two prompts can be patched position by position: the same number of
    tokens (an LVLM's image pairs differ only in pixels; text pairs rarely align)."""
    try:
        return _len(a) == _len(b)
    except TypeError:
        return False


def _first_difference(a, b) -> int:
    """The first position where two token-id lists differ (0 for image prompts, whose
    ids can match while their pixels differ, and for identical lists)."""
    from emosteer.analysis.runners import MMPrompt

    if isinstance(a, MMPrompt) or isinstance(b, MMPrompt):
        return 0
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), 0)


def _pair_captures(runner, pairs):
    ids_pos = runner.encode([pair_text(p.emotional, p.query) for p in pairs])
    ids_neg = runner.encode([pair_text(p.neutral, p.query) for p in pairs])
    _, caps_pos = runner.forward(ids_pos, [CAPTURE_LAST] * len(pairs), desc="pairs: X+")
    _, caps_neg = runner.forward(ids_neg, [CAPTURE_LAST] * len(pairs), desc="pairs: X-")
    L = runner.info.num_layers
    return ids_pos, ids_neg, stack_captures(caps_pos, L), stack_captures(caps_neg, L)


def _patch_heads(runner, emotion: str, cands, ids_pos, ids_neg, z_pos, tids):
    """Activation patching of every head in ``cands`` on every pair, one request per
    (head, pair), all in one batch: X⁻ with that head's output replaced by its X⁺ value,
    position-aligned where the pair's token layouts match (every prompt position gets
    the X⁺ output at the same position), else at the last prompt token.

    Returns ``(ΔM [cands, N] = M(patched) − M⁻ per pair, M⁺ − M⁻ [N], aligned [N])``."""
    info = runner.info
    L, H, D = info.num_layers, info.num_heads, info.head_dim
    N = len(ids_neg)
    aligned = [_same_layout(a, b) for a, b in zip(ids_pos, ids_neg)]
    patch = VectorBank(info)
    for i in range(N):
        patch.add(f"_attr.{emotion}.zpos.{i}", "head", z_pos[i])
    # Before the first token where the two prompts differ, both runs are the same (causal
    # attention): patching there changes nothing, so aligned patches start at that token
    # (fewer pool rows: an aligned patch holds one slot and one row per position; and
    # the prompt's blocks before it stay shared in the prefix cache).
    first = [_first_difference(a, b) if al else 0 for a, b, al in zip(ids_pos, ids_neg, aligned)]
    rows_al = [i for i in range(N) if aligned[i]]
    if rows_al:
        layers = sorted({l for l, _ in cands})
        cap = {"capture": {"heads": layers, "positions": "all"}}
        sub = [ids_pos[i] for i in rows_al]
        _, caps = runner.forward(sub, [cap] * len(sub), positions=[[_len(r) - 1] for r in sub],
                                 desc="heads: X+ at every position")
        for i, c in zip(rows_al, caps):
            P = _len(ids_pos[i])
            z_all = torch.zeros(P, L, H, D)
            where = {p: k for k, p in enumerate(c["positions"])}
            idx = [where[p] for p in range(P)]
            for l in layers:
                z_all[:, l] = c["heads"][l][idx].float()
            patch.add(f"_attr.{emotion}.zpos_at.{i}", "head_positions", z_all[first[i]:])
    runner.register(patch)
    m_pos = _proxy_rows(runner, ids_pos, tids, [None] * N, desc="heads: M+")
    m_neg = _proxy_rows(runner, ids_neg, tids, [None] * N, desc="heads: M-")

    def item(l: int, h: int, i: int) -> dict:
        if aligned[i]:
            return {"layer": l, "head": h, "mode": "patch", "vector": f"_attr.{emotion}.zpos_at.{i}",
                    "positions": list(range(first[i], _len(ids_neg[i])))}
        return {"layer": l, "head": h, "mode": "patch", "vector": f"_attr.{emotion}.zpos.{i}",
                "positions": "last"}

    specs = [{"heads": [item(l, h, i)]} for (l, h) in cands for i in range(N)]
    m = _proxy_rows(runner, list(ids_neg) * len(cands), tids, specs, desc="heads: patching")
    return m.view(len(cands), N) - m_neg, m_pos - m_neg, aligned


def _nonzero(x: float) -> float:
    return x if abs(x) > 1e-12 else math.copysign(1e-12, x or 1.0)


def _patching_name(aligned) -> str:
    N = len(aligned)
    return ("position-aligned" if all(aligned) else
            ("last-token" if not any(aligned) else f"position-aligned for {sum(aligned)}/{N} pairs, else last-token"))


def head_attribution(runner, emotion: str, pairs, vector: str | None = None, top_k: int = 5,
                     n_candidates: int | None = None, source: str = "emotional", lexicon=None,
                     tids=None, _captures=None) -> HeadScores:
    """Emotional intention [L, H], confirmed by per-pair activation patching."""
    vector = vector or emotion
    S = runner.bank.get(vector, "residual").float()
    info = runner.info
    L, H, D = info.num_layers, info.num_heads, info.head_dim
    tids = _target_ids(runner, emotion, lexicon, tids)
    ids_pos, ids_neg, (h_pos, z_pos), (h_neg, z_neg) = _captures or _pair_captures(runner, pairs)
    zbar = z_pos.mean(0) if source == "emotional" else (z_pos - z_neg).mean(0)  # [L, H, D]
    W = _weights(runner, "o_proj")
    intention = torch.zeros(L, H)
    for l in range(L):
        contrib = torch.einsum("dhk,hk->hd", W[l].view(-1, H, D), zbar[l])  # [H, d]
        intention[l] = _cos(contrib, S[l])
    n_cand = n_candidates or min(L * H, 2 * top_k)
    order = intention.flatten().argsort(descending=True)[:n_cand].tolist()
    cands = [(i // H, i % H) for i in order]

    dm, dpair, aligned = _patch_heads(runner, emotion, cands, ids_pos, ids_neg, z_pos, tids)
    recovery = {c: float(r) for c, r in zip(cands, dm.mean(1) / _nonzero(float(dpair.mean())))}
    ranked = sorted(cands, key=lambda c: (recovery[c] > 0, intention[c].item() * (recovery[c] > 0),
                                          recovery[c]), reverse=True)
    top = ranked[:top_k]
    return HeadScores(intention=intention, source=source, candidates=cands, recovery=recovery,
                      top=top, confirmed=all(recovery[c] > 0 for c in top), patching=_patching_name(aligned))


def head_map(runner, emotion: str, pairs, lexicon=None, tids=None, n_boot: int = 1000,
             seed: int = 0, _captures=None) -> HeadMap:
    """The full [layers x heads] recovery map of ``emotion``: every head patched on every
    pair, each (head, pair) its own request, all in one batch (no candidate preselection)."""
    info = runner.info
    L, H = info.num_layers, info.num_heads
    tids = _target_ids(runner, emotion, lexicon, tids)
    ids_pos, ids_neg, (_, z_pos), _ = _captures or _pair_captures(runner, pairs)
    cands = [(l, h) for l in range(L) for h in range(H)]
    dm, dpair, aligned = _patch_heads(runner, emotion, cands, ids_pos, ids_neg, z_pos, tids)
    N = dm.shape[1]
    rec = (dm.mean(1) / _nonzero(float(dpair.mean()))).view(L, H)
    if N > 1:
        def ratio(idx: torch.Tensor) -> torch.Tensor:  # [B, N] resampled pairs -> [B, LH]
            den = dpair[idx].mean(-1)
            den = torch.where(den.abs() > 1e-12, den, torch.full_like(den, 1e-12))
            return (dm[:, idx].mean(-1) / den).T

        ci = bootstrap(ratio, N, n_boot, seed=seed)[1].float().view(L, H, 2)
    else:
        ci = torch.full((L, H, 2), float("nan"))
    for name in [n for n in runner.bank.names() if n.startswith(f"_attr.{emotion}.zpos")]:
        runner.bank.remove(name)
    return HeadMap(emotion=emotion, recovery=rec, ci=ci, n_pairs=N, patching=_patching_name(aligned),
                   gap=float(dpair.mean()))


def head_types(tops: dict[str, Sequence[tuple[int, int]]]) -> dict[str, Any]:
    """Sentiment-specific vs emotion-general heads from several emotions' top sets:
    ``{"general": [(l, h)...], "specific": {emotion: [(l, h)...]}, "by_layer": {l: {"general": n,
    "specific": n}}}``; needs at least two emotions."""
    if len(tops) < 2:
        raise ValueError("head_types needs the top heads of at least two emotions")
    sets = {e: set(map(tuple, t)) for e, t in tops.items()}
    general = sorted(set.intersection(*sets.values()))
    specific = {e: sorted(s - set.union(*(o for f, o in sets.items() if f != e))) for e, s in sets.items()}
    by_layer: dict[int, dict[str, int]] = {}
    for l, _ in general:
        by_layer.setdefault(l, {"general": 0, "specific": 0})["general"] += 1
    for hs in specific.values():
        for l, _ in hs:
            by_layer.setdefault(l, {"general": 0, "specific": 0})["specific"] += 1
    return {"general": general, "specific": specific, "by_layer": dict(sorted(by_layer.items()))}


