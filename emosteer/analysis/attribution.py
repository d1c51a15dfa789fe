"""Layer, head and neuron attribution for one emotion (DESIGN §1.4–1.6), batched as requests.

**Metrics.** The method's metric is the hit rate of generated narratives
(``emosteer.analysis.emotion.hit_rate``). Tiny or random models name no emotion at all, and
the hit rate of short narratives is coarse, so every step ALSO reports a continuous
proxy: the log-probability mass the model puts on the target emotion's words,

    M = log Σ_{t ∈ T} p(t | context),   T = single-token spellings (" joyful", "Happy", ...)
                                            of lexicon words whose labels all lie in the
                                            target's Mikels categories,

at the next token after the prompt (``proxy="next"``) or averaged over the positions of
the model's own unsteered neutral narrative, teacher-forced (``proxy="narrative"``).
Changes of M are log ratios of that mass.

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

**Heads.** Emotional intention ``I[l,h] = cos(W_O[l][:, h] · z̄⁺_{l,h}, S_l)`` (mean head
output on the emotional inputs through its o_proj slice; ``source="diff"`` uses the
mean X⁺−X⁻ difference instead). The top candidates are confirmed by activation patching:
each (head, pair) is one row running X⁻ with that head's output replaced by its X⁺ value,
position-aligned when the two prompts have the same token layout (every prompt position
gets the X⁺ output at the same position: image pairs of an LVLM), else at the last prompt
token only; recovery = mean ΔM / mean (M⁺ − M⁻).

**Attention to the image (VEE heads).** On image pairs, every (layer, head)'s softmax
mass on the image keys at the last prompt token is captured in the fused attention pass
(``capture.attn_image``) for X⁺ and X⁻: ``ΔA[l,h] = mean_i (A⁺ − A⁻)`` (with a
standard error over pairs) ranks the heads that gather more from emotional images. The
top candidates are confirmed causally by VEE itself: each candidate head alone boosted
by β on X⁺ (one request per (head, pair)), effect = mean ΔM over the unboosted X⁺. The
confirmed top heads become ``"<emotion>.vee"``, the mask ``boost`` reads (the intention
heads are then kept as ``"<emotion>.heads"``). ``head_types`` compares the top sets of
several emotions: a head in every emotion's set is *emotion-general*, a head in one
emotion's set only is *sentiment-specific*.

**Neurons.** ``A[l,i] = cos(W_down[l][:, i], S_l)`` preselects candidates per layer; attribution
patching (HF backend: ``(m⁺ − m⁻)·∂M/∂m`` at the last prompt token, averaged over pairs)
ranks them. The top heads become the ``"<emotion>.vee"`` head mask and the top-K neurons
the ``"<emotion>.ena"`` neuron mask in the bank.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from emosteer.request.bank import VectorBank
from emosteer.analysis.extract import CAPTURE_LAST, _encode_side, pair_text, stack_captures
from emosteer.analysis.runners import make_runner

__all__ = ["AttributionResult", "LayerProfile", "HeadScores", "NeuronScores", "AttnScores",
           "HeadMap", "attribute", "layer_attribution", "head_attribution", "head_map", "neuron_attribution",
           "attention_attribution", "head_types", "target_token_ids", "stage_bands", "target_logmass"]


# ------------------------------------------------------------------------- metrics
def target_token_ids(tokenizer, emotion: str, lexicon=None, max_words: int | None = None) -> list[int]:
    """Token ids of single-token spellings of the target's explicit emotion words: the
    word with a leading space (" joyful", " Joyful") or capitalised at the start of a text
    ("Joyful"); bare lower-case forms are skipped (they are mostly word pieces). First
    tokens of multi-token words only when no word is a single token. Default lexicon: the
    curated ``core`` list (NRC's associations such as "government" -> fear would swamp a
    next-token measure)."""
    from emosteer.analysis.emotion import MIKELS, POSITIVE, load_lexicon, target_set

    lex = lexicon if lexicon is not None else load_lexicon(("core",))
    cats = target_set(emotion)
    to_cats = {**{c: {c} for c in MIKELS}, "joy": set(POSITIVE)}
    words = sorted({w for tier in lex.tiers for w, labels in tier.items()
                    if labels and all(lab in to_cats and to_cats[lab] <= cats for lab in labels)})
    words = words[:max_words] if max_words else words
    single, first = set(), set()
    for w in words:
        for form in (" " + w, w.capitalize(), " " + w.capitalize()):
            ids = tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                single.add(ids[0])
            elif ids and form.startswith(" "):
                first.add(ids[0])
    out = sorted(single or first)
    if not out:
        raise ValueError(f"no token of the tokenizer spells a {emotion!r} lexicon word")
    return out


def target_logmass(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log Σ_{t∈ids} softmax(logits)[t]`` over the last dimension."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return torch.logsumexp(lp[..., ids], dim=-1)


def _hit_rates(texts: Sequence[str], emotion: str, lexicon=None) -> list[float]:
    from emosteer.analysis.emotion import hit_rate

    return [hit_rate(t, emotion, lexicon) or 0.0 for t in texts]


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


# ------------------------------------------------------------------------- results
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
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        lp = self.layers
        fig, ax = plt.subplots(figsize=(7, 3.2))
        xs = list(range(len(lp.profile)))
        colors = {"adapt": "#dbe9f6", "aggregate": "#fde2c4", "execute": "#dff0d8"}
        for name, col in colors.items():
            ls = lp.stages.get(name) or []
            if ls:
                ax.axvspan(ls[0] - 0.5, ls[-1] + 0.5, color=col, label=name, zorder=0)
        ax.plot(xs, lp.profile, "o-", color="#333", label=f"profile ({lp.profile_source})")
        ax.plot(xs, lp.stages["smoothed"], "--", color="#c44", lw=1, label="smoothed")
        ax.axhline(lp.stages["threshold"], color="#c44", lw=0.6, ls=":")
        ax.set_xlabel("layer")
        ax.set_ylabel("Δ log target mass" if lp.profile_source == "proxy" else "C (hit rate)")
        ax.set_title(f"{self.emotion}: layer attribution (α={lp.alpha})")
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def plot_heads(self, path: str | os.PathLike) -> None:
        _plot_head_map(self.heads.intention, self.heads.top, path,
                       f"{self.emotion}: emotional intention (boxes: top heads)")

    def plot_attn(self, path: str | os.PathLike) -> None:
        _plot_head_map(self.attn.diff, self.attn.top, path,
                       f"{self.emotion}: Δ attention to the image, emotional − neutral (boxes: VEE heads)")


def _plot_head_map(m: torch.Tensor, top, path, title: str) -> None:
    """A [layers x heads] map (diverging colours around 0), top heads boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.35 * m.shape[1] + 2), max(3, 0.18 * m.shape[0] + 1)))
    lim = float(m.abs().max()) or 1.0
    im = ax.imshow(m.numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
    for l, h in top:
        ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, ec="k", lw=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------- helpers
def _weights(runner, name: str) -> list[torch.Tensor]:
    """Per-layer o_proj or down_proj weight [d, H*D] / [d, I] (float32, CPU)."""
    if getattr(runner, "steerer", None) is not None:
        dec = runner.steerer.dec
        mods = dec.o_proj if name == "o_proj" else dec.down_proj
        return [m.weight.detach().float().cpu() for m in mods]
    from safetensors import safe_open

    suffix = "self_attn.o_proj.weight" if name == "o_proj" else "mlp.down_proj.weight"
    found: dict[int, torch.Tensor] = {}
    for f in sorted(runner.path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if k.endswith(suffix) and "vision" not in k:
                    layer = int(k.split("layers.")[1].split(".")[0])
                    found[layer] = st.get_tensor(k).float()
    return [found[l] for l in range(runner.info.num_layers)]


def _proxy_rows(runner, ids, tids, specs, narratives=None, desc="proxy"):
    """M per row: at the next token, or averaged over the teacher-forced narrative."""
    if narratives is None:
        logits, _ = runner.forward(ids, specs, positions="last", desc=desc)
        return torch.stack([target_logmass(lg, tids) for lg in logits])
    full = [list(i) + list(n[:-1]) for i, n in zip(ids, narratives)]
    pos = [list(range(len(i) - 1, len(i) - 1 + max(1, len(n)))) for i, n in zip(ids, narratives)]
    logits, _ = runner.forward(full, specs, positions=pos, desc=desc)
    return torch.stack([target_logmass(lg, tids).mean() for lg in logits])


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b.expand_as(a), dim=-1, eps=1e-12)


# ------------------------------------------------------------------------- layers
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
    tids = torch.as_tensor(tids if tids is not None else target_token_ids(runner.tokenizer, emotion, lexicon))
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
        prof_fn = lambda idx: (m_rows[:, idx].mean(1) - m0_rows[idx].mean()).tolist()  # noqa: E731
    stages = stage_bands(chosen)
    boot = _bootstrap_profile(prof_fn, n, stages)
    return LayerProfile(alpha=alpha, scales=scales, proxy=proxy, proxy_base=float(m0), proxy_change=dm,
                        hit_rate_base=hr0, hit_rate=hr, hit_rate_change=C, hit_rate_relative=relative,
                        emotional_frac=emotional_frac, profile=chosen,
                        profile_source="hit_rate" if use_hr else "proxy", stages=stages, **boot)


def _hr_profile(hr_rows: torch.Tensor, hr0_rows: torch.Tensor, relative: bool) -> list[float]:
    base = float(hr0_rows.mean())
    rates = hr_rows.mean(1)
    return [float((x - base) / base) if relative and base > 0 else float(x - base) for x in rates]


def _bootstrap_profile(prof_fn, n: int, stages: dict, n_boot: int = 500, seed: int = 0) -> dict:
    """Bands and stage confidence of a layer profile by resampling its prompts."""
    three = all(stages[k] for k in ("adapt", "aggregate", "execute"))
    if n < 2:
        return {"band": None, "stage_confidence": None, "three_stage_frac": None, "three_stages": three}
    g = torch.Generator().manual_seed(seed)
    profs, same, three_n = [], 0, 0
    for _ in range(n_boot):
        idx = torch.randint(0, n, (n,), generator=g)
        p = prof_fn(idx)
        profs.append(p)
        try:
            st = stage_bands(p)
        except ValueError:
            continue
        same += st["aggregate"] == stages["aggregate"]
        three_n += all(st[k] for k in ("adapt", "aggregate", "execute"))
    t = torch.tensor(profs, dtype=torch.float64)
    band = torch.stack([t.quantile(0.025, dim=0), t.quantile(0.975, dim=0)], -1).tolist()
    return {"band": band, "stage_confidence": same / n_boot, "three_stage_frac": three_n / n_boot,
            "three_stages": three}


# ------------------------------------------------------------------------- heads
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
    # (fewer slots, and the prompt's blocks before it stay shared in the prefix cache).
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
    tids = torch.as_tensor(tids if tids is not None else target_token_ids(runner.tokenizer, emotion, lexicon))
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


def head_map(runner, emotion: str, pairs, lexicon=None, tids=None, n_boot: int = 1000,
             seed: int = 0, _captures=None) -> HeadMap:
    """The full [layers x heads] recovery map of ``emotion``: every head patched on every
    pair, each (head, pair) its own request, all in one batch (no candidate preselection)."""
    info = runner.info
    L, H = info.num_layers, info.num_heads
    tids = torch.as_tensor(tids if tids is not None else target_token_ids(runner.tokenizer, emotion, lexicon))
    ids_pos, ids_neg, (_, z_pos), _ = _captures or _pair_captures(runner, pairs)
    cands = [(l, h) for l in range(L) for h in range(H)]
    dm, dpair, aligned = _patch_heads(runner, emotion, cands, ids_pos, ids_neg, z_pos, tids)
    N = dm.shape[1]
    rec = (dm.mean(1) / _nonzero(float(dpair.mean()))).view(L, H)
    g = torch.Generator().manual_seed(seed)
    if N > 1:
        idx = torch.randint(0, N, (n_boot, N), generator=g)
        num = dm[:, idx].mean(-1)  # [LH, B]
        den = dpair[idx].mean(-1)  # [B]
        den = torch.where(den.abs() > 1e-12, den, torch.full_like(den, 1e-12))
        boot = num / den
        ci = torch.stack([boot.quantile(0.025, dim=1), boot.quantile(0.975, dim=1)], -1).view(L, H, 2)
    else:
        ci = torch.full((L, H, 2), float("nan"))
    for name in [n for n in runner.bank.names() if n.startswith(f"_attr.{emotion}.zpos")]:
        runner.bank.remove(name)
    return HeadMap(emotion=emotion, recovery=rec, ci=ci, n_pairs=N, patching=_patching_name(aligned),
                   gap=float(dpair.mean()))


# ---------------------------------------------------------------- attention to image
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
    tids = torch.as_tensor(tids if tids is not None else target_token_ids(runner.tokenizer, emotion, lexicon))
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
        masks.add(f"_attr.{emotion}.vee1.{l}.{h}", "heads", m)
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


# ------------------------------------------------------------------------- neurons
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
        tids = torch.as_tensor(tids if tids is not None else target_token_ids(runner.tokenizer, emotion, lexicon))
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


# ------------------------------------------------------------------------- all of it
def attribute(model: Any = "default", emotion: str = "joy", pairs=None, prompts=None, *,
              bank: VectorBank | str | os.PathLike | None = None, backend: str = "hf",
              tokenizer=None, alpha: float = 0.1, top_heads: int = 5, top_neurons: int = 32,
              n_pairs: int = 8, n_prompts: int = 8, max_new_tokens: int = 32,
              narratives: bool = True, proxy: str = "narrative", profile: str = "auto",
              batch_size: int = 16, beta: float = 2.0,
              progress: bool = True, lexicon=None, parts: Sequence[str] = ("layers", "heads", "neurons"),
              out_dir: str | os.PathLike | None = None) -> AttributionResult:
    """Run layer, head and neuron attribution for ``emotion``; adds ``"<emotion>.vee"``
    (heads mask) and ``"<emotion>.ena"`` (neurons mask) to the bank. ``bank`` must hold
    the residual vector ``"<emotion>"`` (``extract_vectors``); it is extracted here when
    missing. ``prompts``: neutral texts for the layer sweep (default: the neutral sides of
    the pairs). Part ``"attn"`` (image pairs) ranks heads by attention to the image and
    confirms them with single-head VEE at ``beta``; its heads become ``"<emotion>.vee"``.
    With ``out_dir``: attribution.json, layers.png, heads.png, attn.png, bank.safetensors."""
    from emosteer.data import load_builtin
    from emosteer.analysis.extract import extract_vectors

    if isinstance(bank, (str, os.PathLike)):
        bank = VectorBank.load(bank)
    runner = make_runner(model, backend, tokenizer=tokenizer, bank=bank, batch_size=batch_size,
                         progress=progress)
    pairs = load_builtin(emotion) if pairs is None else list(pairs)
    pairs = [p for p in pairs if p.emotion == emotion][:n_pairs] or pairs[:n_pairs]
    if emotion not in runner.bank:
        extract_vectors(runner, pairs, emotion, progress=progress, lexicon=lexicon)
    tids = target_token_ids(runner.tokenizer, emotion, lexicon)
    res = AttributionResult(emotion=emotion, model=runner.name, backend=runner.backend, bank=runner.bank)
    from tqdm.auto import tqdm

    steps = tqdm(list(parts), desc=f"attribution ({emotion})", disable=not progress)
    caps = None
    info = runner.info
    for part in steps:
        if part == "layers":
            if prompts is None:
                prompts = [pair_text(p.neutral, p.query) for p in pairs[:n_prompts]]
            res.layers = layer_attribution(runner, emotion, prompts, alpha=alpha,
                                           max_new_tokens=max_new_tokens, narratives=narratives,
                                           proxy=proxy, lexicon=lexicon, tids=tids, profile=profile)
        elif part == "heads":
            caps = caps or _pair_captures(runner, pairs)
            res.heads = head_attribution(runner, emotion, pairs, top_k=top_heads, lexicon=lexicon,
                                         tids=tids, _captures=caps)
            mask = torch.zeros(info.num_layers, info.num_heads)
            for l, h in res.heads.top:
                mask[l, h] = 1
            runner.bank.add(f"{emotion}.vee", "heads", mask, emotion=emotion, method="intention+patching",
                            confirmed=res.heads.confirmed, top=[list(c) for c in res.heads.top])
        elif part == "attn":
            res.attn = attention_attribution(runner, emotion, pairs, top_k=top_heads, beta=beta,
                                             lexicon=lexicon, tids=tids)
            mask = torch.zeros(info.num_layers, info.num_heads)
            for l, h in res.attn.top:
                mask[l, h] = 1
            if f"{emotion}.vee" in runner.bank and res.heads is not None:
                runner.bank.add(f"{emotion}.heads", "heads", runner.bank.get(f"{emotion}.vee", "heads"),
                                emotion=emotion, method="intention+patching")
            runner.bank.add(f"{emotion}.vee", "heads", mask, emotion=emotion, method="attn_image+vee",
                            beta=float(beta), confirmed=res.attn.confirmed, top=[list(c) for c in res.attn.top])
        elif part == "neurons":
            res.neurons = neuron_attribution(runner, emotion, pairs, top_k=top_neurons, lexicon=lexicon,
                                             tids=tids)
            mask = torch.zeros(info.num_layers, info.intermediate_size)
            for l, i in res.neurons.top:
                mask[l, i] = 1
            runner.bank.add(f"{emotion}.ena", "neurons", mask, emotion=emotion, method=res.neurons.method,
                            top_k=top_neurons)
        else:
            raise ValueError(f"unknown attribution part {part!r}; use layers, heads, attn, neurons")
    for name in [n for n in runner.bank.names() if n.startswith("_attr.")]:
        runner.bank.remove(name)
    if out_dir is not None:
        from pathlib import Path

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "attribution.json").write_text(res.to_json())
        if res.layers is not None:
            res.plot_layers(out / "layers.png")
        if res.heads is not None:
            res.plot_heads(out / "heads.png")
        if res.attn is not None:
            res.plot_attn(out / "attn.png")
        runner.bank.save(out / "bank.safetensors")
    return res
