"""Every plot of the analysis: layer profiles with their stages, and [layers x heads] maps.

Both the demo report (:func:`emosteer.report.write_report`) and one attribution run
(``AttributionResult.plot_layers / plot_heads / plot_attn``) draw through these
functions, so a profile or a head map looks the same wherever it is written. The inputs
are the plain dicts and nested lists of results.json (an attribution result converts
itself); matplotlib runs with its Agg backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

__all__ = ["STAGE_COLORS", "plot_layer_profile", "plot_head_map", "plot_recovery_maps", "plot_head_panels",
           "plot_hallucination"]

# The background of each stage band (emosteer.analysis.attribution.stage_bands).
STAGE_COLORS = {"adapt": "#dbe9f6", "aggregate": "#fde2c4", "execute": "#dff0d8"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_layer_profile(emotions: dict, path: str | Path) -> Path:
    """Layer profile per emotion (one panel each), with the adapt / aggregate / execute
    bands that emosteer.analysis.attribution.stage_bands derived from it, the smoothed
    profile and its half-maximum threshold, the bootstrap band when there is one, and the
    steered layers when the emotion was steered.

    ``emotions``: ``{emotion: {"layer_profile": {"layers", "change", "stages", ...},
    "steering": {"layers"}}}`` (the report's results dict)."""
    plt = _plt()
    items = [(e, r["layer_profile"]) for e, r in emotions.items()
             if (r.get("layer_profile") or {}).get("layers")]
    n = max(1, len(items))
    fig, axes = plt.subplots(n, 1, figsize=(8, 3.4 * n), squeeze=False)
    if not items:
        axes[0][0].text(0.5, 0.5, "no layer profile measured", ha="center")
        axes[0][0].axis("off")
    for ax, (emo, prof) in zip((a[0] for a in axes), items):
        layers, ys = prof["layers"], [math.nan if c is None else c for c in prof["change"]]
        stages = prof.get("stages") or {}
        for name, col in STAGE_COLORS.items():
            ls = stages.get(name) or []
            if ls:
                ax.axvspan(ls[0] - 0.5, ls[-1] + 0.5, color=col, label=name, zorder=0)
        src = prof.get("profile_source", "hit_rate")
        band = prof.get("band")
        if band:
            ax.fill_between(layers, [b[0] for b in band], [b[1] for b in band], color="#888",
                            alpha=0.25, lw=0, label="95 % bootstrap band")
        ax.plot(layers, ys, "o-", ms=3, color="#333", label=f"profile ({src})")
        if stages.get("smoothed"):
            ax.plot(layers, stages["smoothed"], "--", color="#c44", lw=1, label="smoothed")
        if stages.get("threshold") is not None:
            ax.axhline(stages["threshold"], color="#c44", lw=0.6, ls=":")
        for lay in (emotions[emo].get("steering") or {}).get("layers", []):
            ax.axvline(lay, color="#1a6", ls=":", lw=1.2, label=f"steered layer {lay}")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlabel("layer l where α·S_l is injected (0-based)")
        if src == "proxy":
            ax.set_ylabel("Δ log target-word mass")
        else:
            ax.set_ylabel("C: relative Δ hit rate" if prof.get("hit_rate_relative") else "C: Δ hit rate")
        per_layer = f", {prof['n_prompts']} neutral prompts per layer" if prof.get("n_prompts") else ""
        ax.set_title(f"{emo}: layer attribution (α={prof.get('alpha')}{per_layer})", fontsize=10)
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_head_panels(panels: Sequence[dict], path: str | Path, suptitle: str | None = None) -> Path:
    """[layers x heads] maps side by side, diverging colours around 0 (nan cells blank).

    Each panel: ``{"map": [[...] * H] * L, "title": str, "top": [(l, h)...]}`` (boxed) and
    optionally ``"dots": [(l, h)...]`` (marked with a dot)."""
    plt = _plt()
    n = max(1, len(panels))
    L = max((len(p["map"]) for p in panels), default=1)
    H = max((len(p["map"][0]) for p in panels if p["map"]), default=1)
    width = max(4.0, 0.35 * H + 2)
    fig, axes = plt.subplots(1, n, figsize=(min(width * n, 18), max(4.6, 0.18 * L + 1)), squeeze=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no head map measured", ha="center")
        axes[0][0].axis("off")
    for ax, p in zip(axes[0], panels):
        m = p["map"]
        vmax = max((abs(v) for row in m for v in row if v == v), default=1.0) or 1.0
        im = ax.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                       interpolation="nearest", origin="lower")
        for l, h in p.get("dots") or ():
            ax.plot(h, l, ".", color="black", ms=3)
        for l, h in p.get("top") or ():
            ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, ec="black", lw=1.2))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(p["title"], fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return _save(fig, path)


def plot_head_map(emotions: dict, path: str | Path) -> Path:
    """Heatmap of head emotional intention (cosine with S_l), one panel per emotion;
    heads confirmed by patching are outlined."""
    panels = [{"map": r["heads"]["intention"],
               "top": [(t["layer"], t["head"]) for t in r["heads"].get("top", [])],
               "title": f"{e}: emotional intention cos(W_O·z, S_l); boxes: top heads"}
              for e, r in emotions.items() if (r.get("heads") or {}).get("intention")]
    return plot_head_panels(panels, path)


def plot_recovery_maps(head_maps: dict, path: str | Path) -> Path:
    """The full patching maps, one panel per emotion: recovery of every (layer, head);
    heads whose 95 % interval lies above 0 are dotted, the top heads boxed."""
    maps = (head_maps or {}).get("maps") or {}
    tops = (head_maps or {}).get("top") or {}
    panels = [{"map": m["recovery"], "top": tops.get(emo, []),
               "dots": [(l, h) for l, row in enumerate(m["ci95"])
                        for h, (lo, _hi) in enumerate(row) if lo == lo and lo > 0],
               "title": f"{emo}: patching recovery (n={m['n_pairs']} pairs)"}
              for emo, m in maps.items()]
    return plot_head_panels(panels, path, "every head patched from the emotional into the neutral "
                                          "prompt; dots: 95 % CI > 0")


def plot_hallucination(study: dict, path: str | Path, split: str = "test") -> Path:
    """The hallucination study on one split as two axes, one point per condition:
    hallucination on neutral scenes (x, lower is better) against specificity on
    emotional scenes (y, kept is better), each with its 95 % bootstrap interval. The
    unsteered point is black, the condition chosen on dev is a star, conditions that
    count (``emosteer.analysis.hallucination``) are green, the others grey; the dashed
    line is the unsteered specificity minus the margin.

    ``study``: the demo's ``results["hallucination"]``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 6))
    conds = study.get("conditions") or []
    if not conds:
        ax.text(0.5, 0.5, "no hallucination study in this run", ha="center")
        ax.axis("off")
        return _save(fig, path)
    chosen = study.get("chosen_index")
    for i, c in enumerate(conds):
        row = c[split]
        x, y = row["hallucination"]["rate"], row["specificity"]["rate"]
        if x is None or y is None:
            continue
        xl, xh = (v if v is not None else x for v in row["hallucination"]["ci95"])
        yl, yh = (v if v is not None else y for v in row["specificity"]["ci95"])
        color = "black" if i == 0 else ("#2a8f3c" if row.get("counts") else "#8a8a8a")
        ax.errorbar([x], [y], xerr=[[x - xl], [xh - x]], yerr=[[y - yl], [yh - y]], fmt="none",
                    ecolor=color, alpha=0.35, lw=1)
        ax.scatter([x], [y], s=140 if i == chosen else 40, marker="*" if i == chosen else "o",
                   color=color, zorder=4 if i == 0 else 3)
        ax.annotate(f"{i}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    base = conds[0][split]["specificity"]["rate"]
    if base is not None:
        ax.axhline(base - study.get("margin", 0.1), ls="--", lw=0.8, color="#c0392b")
    legend = "\n".join(f"{i}: {c['label']}" for i, c in enumerate(conds))
    ax.text(1.02, 1.0, legend, transform=ax.transAxes, va="top", fontsize=7, family="monospace")
    n = study.get("n", {}).get(split, {})
    ax.set_xlabel(f"hallucination: neutral scenes asserting an emotion (n={n.get('neutral')})")
    ax.set_ylabel(f"specificity: emotional scenes carrying their emotion (n={n.get('emotional')})")
    ax.set_title(f"Removing emotion where there is none ({split} templates: "
                 f"{', '.join(study.get('templates', {}).get(split, []))})", fontsize=10)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    fig.set_size_inches(13, 6)
    return _save(fig, path)
