"""Layer attribution: where in depth the emotion's steering vector acts, and its three stages.

**Layers.** For each layer l, every neutral prompt runs with ``α·(n̄_l/‖S_l‖)·S_l`` added
at layer l (n̄_l = mean residual norm there, so the injected norm is α·n̄_l): one row per
(layer, prompt), all layers in one batch. C_l = relative hit-rate change (absolute when
the baseline hit rate is 0) and ΔM_l. The stages use C when there are ≥ 16 prompts and
at least a quarter of the sweep's narratives name an emotion (else ΔM; ``profile=``
forces one). Stage rule
(documented, deterministic): smooth the profile (moving average, 3 layers), take the band
of consecutive layers around its peak whose value is at least half-way between the
profile's minimum and its peak ("full width at half maximum"): **aggregate** = that band,
**adapt** = the layers before it, **execute** = the layers after it; ``l_emo`` = the
band's last layer.

**Uncertainty.** The prompts are resampled (:func:`emosteer.report.stats.bootstrap`) and
the profile recomputed on each resample: a 95 % band per layer, the share of resamples
with the same aggregate band, and the share that show all three stages.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from emosteer.analysis.attribution.metrics import _hit_rates, _proxy_rows, _target_ids
from emosteer.analysis.attribution.results import LayerProfile
from emosteer.report.stats import bootstrap

__all__ = ["stage_bands", "layer_attribution"]


def stage_bands(profile: Sequence[float], window: int = 3) -> dict[str, Any]:
    """The three stages by the half-maximum rule (see the module docstring)."""
    p = torch.tensor([float(x) for x in profile], dtype=torch.float64)
    L = len(p)
    if L == 0 or not torch.isfinite(p).all():
        raise ValueError("stage_bands needs a non-empty, finite profile")
    k = max(1, min(window, L))
    pad = torch.cat([p[:1].repeat(k // 2), p, p[-1:].repeat(k - 1 - k // 2)])
    smooth = pad.unfold(0, k, 1).mean(-1)
    peak = int(smooth.argmax())
    lo, hi = float(smooth.min()), float(smooth[peak])
    thr = lo + 0.5 * (hi - lo)
    a = b = peak
    while a > 0 and smooth[a - 1] >= thr:
        a -= 1
    while b < L - 1 and smooth[b + 1] >= thr:
        b += 1
    return {"adapt": list(range(0, a)), "aggregate": list(range(a, b + 1)),
            "execute": list(range(b + 1, L)), "l_emo": b, "peak": peak,
            "smoothed": [float(x) for x in smooth], "threshold": thr}


def layer_attribution(runner, emotion: str, prompts: Sequence[str], vector: str | None = None,
                      alpha: float = 0.1, max_new_tokens: int = 32, narratives: bool = True,
                      proxy: str = "narrative", lexicon=None, tids=None, profile: str = "auto",
                      min_emotional_frac: float = 0.25,
                      min_hit_rate_prompts: int = 16) -> LayerProfile:
    """Inject α-scaled S_l at each layer into neutral runs (one row per layer × prompt).

    ``profile="auto"`` stages by the hit-rate change when there are at least
    ``min_hit_rate_prompts`` prompts and at least ``min_emotional_frac`` of the sweep's
    narratives name an emotion (a hit rate over fewer narratives is too coarse to place
    stage boundaries), else by the proxy ΔM."""
    vector = vector or emotion
    S = runner.bank.get(vector, "residual").float()
    L = runner.info.num_layers
    tids = _target_ids(runner, emotion, lexicon, tids)
    ids = runner.encode(list(prompts))
    n = len(ids)
    base_spec = {"capture": {"residual": "all", "positions": "last"}}
    toks0, texts0, caps0 = runner.generate(ids, [base_spec] * n, max_new_tokens=max_new_tokens,
                                           desc="layers: baseline")
    h0 = torch.stack([torch.stack([c["residual"][l][-1].float().cpu() for l in range(L)]) for c in caps0])
    norms = h0.norm(dim=-1).mean(0)  # [L]
    scales = [float(alpha * norms[l] / S[l].norm().clamp_min(1e-12)) for l in range(L)]
    specs = [{"steer": [{"vector": vector, "layers": [l], "scale": scales[l]}]}
             for l in range(L) for _ in range(n)]
    rows = [r for _ in range(L) for r in ids]
    narr = None if proxy == "next" else toks0
    m0_rows = _proxy_rows(runner, ids, tids, [None] * n, narr, desc="layers: proxy base")  # [n]
    m0 = m0_rows.mean()
    m_rows = _proxy_rows(runner, rows, tids, specs, None if narr is None else narr * L,
                         desc="layers: proxy sweep").view(L, n)
    m = m_rows.mean(1)
    dm = [float(x - m0) for x in m]
    hr0, hr, C, relative = float(sum(_hit_rates(texts0, emotion, lexicon)) / n), None, None, True
    emotional_frac = 0.0
    if narratives:
        from emosteer.analysis.emotion import asserts_emotion

        _, texts, _ = runner.generate(rows, specs, max_new_tokens=max_new_tokens, desc="layers: sweep")
        hr_rows = torch.tensor(_hit_rates(texts, emotion, lexicon)).view(L, n)
        hr0_rows = torch.tensor(_hit_rates(texts0, emotion, lexicon))
        rates = hr_rows.mean(1)
        hr = [float(x) for x in rates]
        relative = hr0 > 0
        C = [(x - hr0) / hr0 if relative else x - hr0 for x in hr]
        emotional_frac = sum(asserts_emotion(t, lexicon) for t in texts) / len(texts)
    if profile not in ("auto", "hit_rate", "proxy"):
        raise ValueError(f"profile must be 'auto', 'hit_rate' or 'proxy', got {profile!r}")
    if profile == "hit_rate" and C is None:
        raise ValueError("profile='hit_rate' needs narratives=True")
    # auto: the hit rate only when the narratives name emotions often enough to resolve it
    use_hr = profile == "hit_rate" or (
        profile == "auto" and C is not None and emotional_frac >= min_emotional_frac
        and n >= min_hit_rate_prompts and max(C) - min(C) > 1e-9)
    chosen = C if use_hr else dm
    if use_hr:
        prof_fn = lambda idx: _hr_profile(hr_rows[:, idx], hr0_rows[idx], relative)  # noqa: E731
    else:
        prof_fn = lambda idx: (m_rows[:, idx].mean(-1) - m0_rows[idx].mean(-1)).T  # noqa: E731
    stages = stage_bands(chosen)
    boot = _bootstrap_profile(prof_fn, n, stages)
    return LayerProfile(alpha=alpha, scales=scales, proxy=proxy, proxy_base=float(m0), proxy_change=dm,
                        hit_rate_base=hr0, hit_rate=hr, hit_rate_change=C, hit_rate_relative=relative,
                        emotional_frac=emotional_frac, profile=chosen,
                        profile_source="hit_rate" if use_hr else "proxy", stages=stages, **boot)


def _hr_profile(hr_rows: torch.Tensor, hr0_rows: torch.Tensor, relative: bool) -> torch.Tensor:
    """The hit-rate profile C of resampled prompts: ``hr_rows`` [L, B, n] and ``hr0_rows``
    [B, n] (B resamples of n prompts) -> [B, L]; relative to the resample's baseline when
    the profile is relative and that baseline is above 0, else absolute."""
    base = hr0_rows.mean(-1)  # [B]
    delta = hr_rows.mean(-1) - base  # [L, B]
    rel = torch.where(base > 0, delta / base, delta) if relative else delta
    return rel.T


def _bootstrap_profile(prof_fn: Callable[[torch.Tensor], torch.Tensor], n: int, stages: dict,
                       n_boot: int = 500, seed: int = 0) -> dict:
    """Band and stage confidence of a layer profile by resampling its ``n`` prompts:
    ``prof_fn`` maps the [n_boot, n] resample indices to the profiles [n_boot, L]."""
    three = all(stages[k] for k in ("adapt", "aggregate", "execute"))
    if n < 2:
        return {"band": None, "stage_confidence": None, "three_stage_frac": None, "three_stages": three,
                "stability_by_n": {}}
    profs, band = bootstrap(prof_fn, n, n_boot, seed=seed)
    same, three_n = _band_agreement(profs, stages)
    return {"band": band.tolist(), "stage_confidence": same / n_boot, "three_stage_frac": three_n / n_boot,
            "three_stages": three, "stability_by_n": stability_by_n(prof_fn, n, stages, seed=seed)}


def stability_by_n(prof_fn: Callable[[torch.Tensor], torch.Tensor], n: int, stages: dict,
                   sizes: Sequence[int] | None = None, n_boot: int = 200, seed: int = 0) -> dict[int, float]:
    """How many prompts a stable profile needs: for each size m (4, 8, 16, … up to 2n),
    the share of ``n_boot`` draws of m of the ``n`` measured prompts (with replacement)
    whose aggregate band equals the one all ``n`` prompts give. Sizes above n extrapolate
    by resampling (the usual bootstrap reading of "a study with m prompts")."""
    if n < 2:
        return {}
    if sizes is None:
        sizes, m = [], 4
        while m <= 2 * n:
            sizes.append(m)
            m *= 2
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for m in sizes:
        idx = torch.randint(0, n, (n_boot, int(m)), generator=g)
        out[int(m)] = _band_agreement(prof_fn(idx), stages)[0] / n_boot
    return out


def _band_agreement(profiles, stages: dict) -> tuple[int, int]:
    """Of the resampled ``profiles`` [B, L]: how many have the aggregate band of
    ``stages``, and how many show all three stages (profiles the stage rule cannot read
    count for neither)."""
    same = three = 0
    for p in torch.as_tensor(profiles).to(torch.float64).tolist():
        try:
            st = stage_bands(p)
        except ValueError:
            continue
        same += st["aggregate"] == stages["aggregate"]
        three += all(st[k] for k in ("adapt", "aggregate", "execute"))
    return same, three
