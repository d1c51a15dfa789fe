"""report.md as text: ``render_markdown(results)`` writes every section from the results dict.

It never computes a result: every number it prints is one the pipeline stored in the
results dict (see :mod:`emosteer.report` for its keys); the plots it links are drawn by
:mod:`emosteer.report.plots`.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["render_markdown"]


# ------------------------------------------------------------------------------ sections
def _stage_confidence(prof: dict) -> str:
    """How far the bootstrap over prompts supports the stages."""
    if prof.get("stage_confidence") is None:
        return "(Too few prompts for a bootstrap.)"
    txt = (f"Bootstrap over prompts (the band in the plot is 95 %): {100 * prof['stage_confidence']:.0f} % "
           f"of resamples give the same aggregate band; {100 * prof['three_stage_frac']:.0f} % show all "
           "three stages.")
    if not prof.get("three_stages"):
        txt += " **This profile does not show three stages** (one of them is empty)."
    elif prof["three_stage_frac"] < 0.5:
        txt += " The three stages are not robust: most resamples lose one."
    by_n = {int(k): v for k, v in (prof.get("stability_by_n") or {}).items()}
    if by_n:
        enough = min((m for m, v in by_n.items() if v >= 0.8), default=None)
        txt += (" Same aggregate band in draws of m prompts: "
                + ", ".join(f"{m}: {100 * v:.0f} %" for m, v in sorted(by_n.items()))
                + (f"; {enough} prompts give it in ≥ 80 % of draws" if enough is not None else
                   f"; no size up to {max(by_n)} gives it in 80 % of draws")
                + f" (measured on {prof.get('n_prompts')} prompts; sizes above that are resampled).")
    return txt


def _head_maps_section(hm: dict, lines: list[str]) -> None:
    maps = hm.get("maps") or {}
    if not maps:
        return
    first = next(iter(maps.values()))
    L, H = len(first["recovery"]), len(first["recovery"][0])
    lines += ["## Full head maps (every head patched)", "",
              f"For {', '.join(maps)}: each of the {L} × {H} heads patched from the emotional into "
              f"the neutral prompt of each of {hm.get('n_pairs')} pairs, every (head, pair) its "
              f"own request, all in one batch per emotion ({first.get('patching')} patching). "
              "Recovery = share of the emotional − neutral gap in target-word log-mass the patch "
              "closes; 95 % bootstrap intervals over pairs. Top heads: the highest recovery among "
              "heads whose interval lies above 0.", "",
              "| emotion | gap (M⁺ − M⁻) | heads with CI > 0 | top heads (layer, head) | smallest lower CI bound of the top heads |",
              "| --- | --- | --- | --- | --- |"]
    for emo, m in maps.items():
        sig = sum(1 for row in m["ci95"] for lo, _ in row if lo == lo and lo > 0)
        lines.append(f"| {emo} | {_f(m.get('gap'))} | {sig} of {L * H} | {(hm.get('top') or {}).get(emo)} "
                     f"| {_f((hm.get('top_ci_low') or {}).get(emo))} |")
    t = hm.get("types")
    if t:
        spec = {e: v for e, v in t["specific"].items() if v}
        lines += ["", f"**Sentiment-specific vs emotion-general** (from the top {hm.get('top_k')} "
                  f"of each emotion): emotion-general heads (in every emotion's set): "
                  f"{t['general'] or 'none'}; sentiment-specific heads (one emotion only): "
                  f"{spec or 'none'}; per layer: {t['by_layer'] or 'none'}."]
        ms, mg = t.get("mean_layer_specific"), t.get("mean_layer_general")
        if ms is not None and mg is not None:
            verdict = ("deeper than" if mg > ms else "not deeper than")
            lines.append(f"The paper finds sentiment-specific heads in the middle layers and "
                         f"emotion-general ones deeper. Here the general heads sit at mean layer "
                         f"{mg:.1f}, {verdict} the specific ones (mean layer {ms:.1f}).")
        else:
            lines.append("The paper's split (specific heads in the middle layers, general ones "
                         "deeper) cannot be tested here: one of the two groups is empty.")
    lines += ["", "![head maps](head_maps.png)", ""]


def _hallucination_section(h: dict, lines: list[str]) -> None:
    conds = h.get("conditions") or []
    if not conds:
        return
    n = h.get("n", {})
    tpl = h.get("templates", {})
    lines += ["## Removing emotion where there is none (hallucination study)", "",
              f"Neutral scenes (no emotional cue) and emotional scenes (the emotional halves of "
              f"built-in pairs this run used nowhere else, {', '.join(h.get('emotions', []))}), each "
              f"asked in one of six prompt templates. Chosen on the dev templates "
              f"({', '.join(tpl.get('dev', []))}: {n.get('dev', {}).get('neutral')} neutral, "
              f"{n.get('dev', {}).get('emotional')} emotional scenes), reported on the test templates "
              f"({', '.join(tpl.get('test', []))}: {n.get('test', {}).get('neutral')} neutral, "
              f"{n.get('test', {}).get('emotional')} emotional). Rule: {h.get('rule')}.", "",
              f"Heads acted on: {h.get('heads')} ({h.get('heads_source')}); steered band: "
              f"layers {h.get('band')}; gate: {h.get('probe') or 'none'}"
              f"{'' if h.get('probe_layer') is None else ' at layer ' + str(h.get('probe_layer'))}.", "",
              "| # | condition | hallucination (test) | Δ (95 % CI) | emotion words per neutral "
              "narrative (test), Δ | specificity (test) | Δ (95 % CI) "
              "| fluency (test) | counts on test | on dev: Δ hallucination, Δ emotion words, Δ specificity, guards |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, c in enumerate(conds):
        t, d = c["test"], c["dev"]
        if i == 0:
            lines.append(f"| 0 | unsteered | {_f(t['hallucination']['rate'])} | — | "
                         f"{_words(t)} | {_f(t['specificity']['rate'])} | — | — | — | — |")
            continue
        star = " **(chosen on dev)**" if i == h.get("chosen_index") else ""
        lines.append(
            f"| {i} | {c['label']}{star} | {_f(t['hallucination']['rate'])} | "
            f"{_ci(t['delta_hallucination'], compact=True)} | {_words(t)} | {_f(t['specificity']['rate'])} | "
            f"{_ci(t['delta_specificity'], compact=True)} | {_guard(t)} | {'**yes**' if t['counts'] else 'no'} | "
            f"{_ci(d['delta_hallucination'], compact=True)}, {_delta_words(d)}, "
            f"{_ci(d['delta_specificity'], compact=True)}, "
            f"{'pass' if d['fluency']['ok'] else 'fail'} |")
    count = h.get("counting_on_test") or []
    if h.get("chosen") is None:
        verdict = ("No condition lowered hallucination on dev while passing the guards and the "
                   "specificity margin there.")
    else:
        verdict = (f"Chosen on dev: {h['chosen']}; on the test templates it "
                   f"{'**counts**' if h.get('chosen_counts_on_test') else '**does not count**'}.")
    lines += ["", verdict + (f" Conditions that count on test: {', '.join(count)}." if count else
                             " No condition counts on test."), "",
              "![hallucination vs specificity](hallucination.png)", ""]


# ------------------------------------------------------------------------------ text
def _f(v: Any, digits: int = 3, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if pct:
        return f"{100 * v:.1f} %"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(s: dict | None, pct: bool = False, compact: bool = False) -> str:
    """A summarized mean with its 95 % interval; ``compact``: "+16.7 pp [+0, +50]" (pp,
    whole-point bounds, no n) for dense tables."""
    if not s or s.get("mean") is None:
        return "n/a"
    lo, hi = (s.get("ci95") or [None, None])[:2]
    if compact:
        return f"{100 * s['mean']:+.1f} pp" + ("" if lo is None else f" [{100 * lo:+.0f}, {100 * hi:+.0f}]")
    if pct:
        body = f"{100 * s['mean']:+.1f} pp"
        ci = f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" if lo is not None else "n/a"
    else:
        body = f"{s['mean']:+.3f}"
        ci = f"[{lo:+.3f}, {hi:+.3f}]" if lo is not None else "n/a"
    return f"{body} (95 % CI {ci}, n={s['n']})"


def _delta_words(row: dict) -> str:
    """The paired change in emotion words per neutral narrative with its interval."""
    d = row.get("delta_emotion_words")
    if not d or d.get("mean") is None:
        return "n/a"
    lo, hi = (d.get("ci95") or [None, None])[:2]
    return f"{d['mean']:+.2f}" + ("" if lo is None else f" [{lo:+.2f}, {hi:+.2f}]")


def _words(row: dict) -> str:
    """Mean emotion words per neutral narrative, and its paired change with the 95 %
    interval where the row has one ("n/a" for studies run before it was measured)."""
    w = row.get("emotion_words")
    if not w or w.get("mean") is None:
        return "n/a"
    d = _delta_words(row)
    return f"{w['mean']:.2f}" + ("" if d == "n/a" else f", {d}")


def _span(ls) -> str:
    if not ls:
        return "none"
    return f"L{ls[0]}" if len(ls) == 1 else f"L{ls[0]}–L{ls[-1]}"


def _quote(text: str, limit: int = 400) -> str:
    t = " ".join((text or "").split())
    if len(t) > limit:
        t = t[:limit].rstrip() + " …"
    return t.replace("|", "\\|") or "(empty)"


def _guard(row: dict) -> str:
    """'pass' / 'FAIL' with the perplexity and repetition ratios to the unsteered text."""
    g = row.get("fluency")
    if not g:
        return "—"
    ppl = "—" if g.get("ppl_ratio") is None else f"{g['ppl_ratio']:.2f}x"
    return f"{'pass' if g.get('ok') else 'FAIL'} (ppl {ppl}, rep {g.get('rep3_ratio', 0):.2f}x)"


def _steering_section(emo: str, st: dict, lines: list[str]) -> None:
    base = st.get("baseline", {})
    sp = st.get("split") or {}
    rows = st.get("conditions") or st.get("strengths", [])
    lines += [
        f"Neutral prompts the extraction never saw, split in two: dev n = {sp.get('dev')}"
        f"{' (templates ' + ', '.join((sp.get('templates') or {}).get('dev') or []) + ')' if (sp.get('templates') or {}).get('dev') else ''}, "
        f"held-out test n = {sp.get('test')}"
        f"{' (templates ' + ', '.join((sp.get('templates') or {}).get('test') or []) + ')' if (sp.get('templates') or {}).get('test') else ''}. "
        f"Rule: {sp.get('rule', 'n/a')}. "
        f"**The table below is the test half.** Conditions: the residual steering vector S_l "
        f"added at the peak layer of the smoothed layer profile on every position; spread over "
        f"several layers of the aggregate/execute bands (the total strength split evenly); at "
        f"the peak layer on generated tokens only; the heads' outputs plus a multiple of "
        f"their emotional shift ΔH (the top heads by intention, and the patching map's "
        f"significant top heads); ENA (neuron gain). Strength = ‖added vector‖ / mean ‖h_l‖ "
        f"at the last prompt token; greedy decoding, {st.get('max_tokens')} new tokens, same "
        f"prompts in every condition.",
        "",
        "Carrying = share of narratives whose emotion words are at least half of the target "
        "emotion. Hit rate = share of emotion words in the narrative that map to the target "
        "category (0 when it has none). "
        "Hallucination = share of narratives on neutral inputs that assert any emotion. "
        "Fluency guards: perplexity of each narrative under the UNSTEERED model (given its "
        "prompt), share of word 3-grams repeating an earlier one, distinct-2 over the "
        "condition's narratives; a condition passes when its perplexity is at most 1.25x and "
        "its repeated 3-grams at most 2x the unsteered text's.",
        "",
        "| condition | carrying | Δ carrying, paired (95 % CI) | hit rate | Δ hit rate, paired | "
        "hallucination | valence | perplexity (unsteered model) | repeated 3-grams | distinct-2 "
        "| fluency guards |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| unsteered | {_f(base.get('share_mean'))} | — | {_f(base.get('hit_rate_mean'))} | — | "
        f"{_f(base.get('hallucination_rate'), pct=True)} | {_f(base.get('valence_mean'))} | "
        f"{_f(base.get('ppl_mean'), 2)} | {_f(base.get('rep3_mean'), pct=True)} | "
        f"{_f(base.get('distinct2'))} | — |",
    ]
    best = st.get("best")
    for s in rows:
        name = s.get("label") or f"steered {_f(s.get('scale'), 2)}"
        if best and name == best.get("label"):
            name = f"**{name}** (chosen)"
        lines.append(
            f"| {name} | {_f(s.get('share_mean'))} | {_ci(s.get('share_delta'), pct=True)} | "
            f"{_f(s.get('hit_rate_mean'))} | {_ci(s.get('delta'), pct=True)} | "
            f"{_f(s.get('hallucination_rate'), pct=True)} | "
            f"{_f(s.get('valence_mean'))} | {_f(s.get('ppl_mean'), 2)} | "
            f"{_f(s.get('rep3_mean'), pct=True)} | {_f(s.get('distinct2'))} | {_guard(s)} |")
    lines.append("")
    sel = st.get("selection") or {}
    if sel.get("dev"):
        lines.append("Selection on the dev half (every condition tried): " + "; ".join(
            f"{d.get('label') or _f(d.get('strength'), 2)}: Δ carrying {_f(d.get('share_uplift'))}, "
            f"Δ hit rate {_f(d.get('uplift'))}, {_guard(d)}" for d in sel["dev"]) + ".")
        lines.append("")
    if not best and sel.get("dev"):
        lines.append("**No condition passed the fluency guards on the dev half**, so no operating "
                     "point is reported; the table still lists every condition on the test half.")
        lines.append("")
    if best:
        d, ds = best.get("delta") or {}, best.get("share_delta") or {}
        lines.append(
            f"**Measured (held-out test half):** with {best.get('label')}, chosen on the dev half, "
            f"the share of narratives carrying {emo} changes by {_ci(ds, pct=True)} "
            f"({_f(base.get('share_mean'))} → {_f(best.get('share_mean'))}) and the hit rate by "
            f"{_ci(d, pct=True)}; fluency on the test half {_guard(best)}. "
            f"Hallucination rate {_f(base.get('hallucination_rate'), pct=True)} unsteered → "
            f"{_f(best.get('hallucination_rate'), pct=True)} steered. "
            "Adding an emotion direction to neutral inputs is expected to make "
            "narratives name emotions more often; the hallucination column measures that cost. "
            "The built-in query asks how the person feels, so even unsteered narratives of "
            "neutral scenes often name an emotion.")
        lines.append("")


def render_markdown(results: dict) -> str:
    """report.md as a string."""
    r = results
    model, machine, settings = r.get("model", {}), r.get("machine", {}), r.get("settings", {})
    lines = [
        "# emosteer demo report",
        "",
        f"Generated {r.get('finished_at', '')} by `emosteer demo`"
        f"{' --quick (smoke-test size: numbers are not meaningful)' if r.get('quick') else ''}. "
        "Every number below was measured in this run (see results.json); nothing is "
        "copied from the paper.",
        "",
        "## Setup",
        "",
        f"- **Model:** {model.get('name')} (`{model.get('path')}`)",
    ]
    if model.get("quantization"):
        lines.append(f"  - **Weights:** {model['quantization']} (source `{model.get('source')}`).")
    info = model.get("info") or {}
    if info:
        lines.append(f"  - {info.get('architecture')}: {info.get('num_layers')} layers, "
                     f"{info.get('num_heads')} heads × {info.get('head_dim')} dims, hidden "
                     f"{info.get('hidden_size')}, MLP {info.get('intermediate_size')}")
    lines += [
        f"- **Backend:** {r.get('backend')} — {r.get('backend_note', '')}",
        f"- **Machine:** {machine.get('platform')}, {machine.get('cpus')} CPU cores; "
        f"python {machine.get('python')}, torch {machine.get('torch')}, "
        f"transformers {machine.get('transformers')}, vllm {machine.get('vllm')}",
        f"- **Settings:** `{json.dumps(settings, sort_keys=True)}`",
        "",
        "Method (VEENA, text version): counterfactual pairs (emotional vs neutral scene, "
        "same query) → per-layer steering vector S_l = mean(h⁺ − h⁻) at the last prompt "
        "token over pairs whose emotional narrative has hit rate ≥ τ → layer attribution "
        "(inject α·S_l at one layer on neutral prompts) → head intention (cosine of each "
        "head's o_proj contribution with S_l) confirmed by activation patching → neurons "
        "(down_proj columns aligned with S_l) → steered narratives on held-out prompts.",
        "",
    ]
    summary = []
    for emo, res in (r.get("emotions") or {}).items():
        st = res.get("steering") or {}
        b, base = st.get("best"), st.get("baseline") or {}
        if not st:
            continue
        if b:
            summary.append(
                f"| {emo} | {b.get('label')} | {_f(base.get('share_mean'))} → {_f(b.get('share_mean'))} "
                f"| {_ci(b.get('share_delta'), pct=True)} | {_ci(b.get('delta'), pct=True)} | {_guard(b)} |")
        else:
            summary.append(f"| {emo} | none passed the guards on dev | — | — | — | — |")
    if summary:
        lines += ["## Summary: the presets on the held-out prompts", "",
                  "Chosen on the dev half among every condition tried (see each emotion's table), "
                  "measured on the held-out test half.", "",
                  "| emotion | preset (chosen on dev) | carrying, unsteered → steered | Δ carrying "
                  "(95 % CI) | Δ hit rate | fluency guards (test) |",
                  "| --- | --- | --- | --- | --- | --- |", *summary, ""]
    for emo, res in (r.get("emotions") or {}).items():
        lines += [f"## Emotion: {emo}", ""]
        ex = res.get("extraction") or {}
        if ex:
            lines += [
                "### Steering vectors",
                "",
                f"{ex.get('n_pairs')} built-in pairs used; {ex.get('n_kept')} kept by the "
                f"hit-rate filter (τ = {ex.get('tau')}; mean hit rate of the emotional "
                f"narratives {_f(ex.get('hit_rate_mean'))}). ‖S_l‖ / ‖h_l‖ averages "
                f"{_f(ex.get('mean_norm_ratio'))}.",
                "",
            ]
            if ex.get("note"):
                lines += [ex["note"], ""]
        prof = res.get("layer_profile") or {}
        if prof.get("layers"):
            ch = prof.get("change") or []
            ranked = sorted((c, l) for l, c in zip(prof["layers"], ch) if c is not None)[::-1]
            top = ", ".join(f"L{l} ({c:+.3f})" for c, l in ranked[:5])
            stg = prof.get("stages") or {}
            src = prof.get("profile_source")
            where = ("at the first generated token" if prof.get("proxy") == "next" else
                     "averaged over the unsteered narrative, teacher-forced")
            what = (f"Δ log-probability mass of the target's emotion words {where} (the hit "
                    "rate did not vary across layers)" if src == "proxy" else
                    ("relative" if prof.get("hit_rate_relative") else "absolute")
                    + " change C of the hit rate")
            lines += [
                "### Layer profile",
                "",
                f"α = {prof.get('alpha')} (injected norm = α × mean residual norm at that "
                f"layer), {prof.get('n_prompts')} "
                f"neutral prompts per layer, {prof.get('max_tokens', '?')} new tokens. "
                f"Profile = {what}. Unsteered hit rate {_f(prof.get('hit_rate_base'))}; "
                f"largest increases: {top or 'none'}.",
                "",
                f"Stages (half-maximum rule): adapt {_span(stg.get('adapt'))}, aggregate "
                f"{_span(stg.get('aggregate'))}, execute {_span(stg.get('execute'))}; "
                f"l_emo = {stg.get('l_emo')}. " + _stage_confidence(prof),
                "",
                "![layer profile](layer_profile.png)",
                "",
            ]
        heads = res.get("heads") or {}
        if heads.get("top"):
            lines += ["### Heads", "",
                      f"Emotional intention = cosine of W_O^(h)·z̄ ({heads.get('source')} runs) "
                      "with S_l. The top candidates were patched one at a time: on each "
                      "neutral prompt the head's output was replaced by its output on the "
                      "paired emotional prompt (all positions); recovery = share of the "
                      "emotional − neutral gap in target-word log-mass that the patch "
                      "closes (1 = the whole gap).", "",
                      "| layer | head | intention | recovery |", "| --- | --- | --- | --- |"]
            for t in heads["top"]:
                lines.append(f"| {t['layer']} | {t['head']} | {_f(t['score'])} | "
                             f"{_f(t.get('recovery'))} |")
            lines += ["", f"All top heads have positive recovery: {heads.get('confirmed')}. "
                      f"Candidates tested: {len(heads.get('patching', []))}.",
                      "", "![head map](head_map.png)", ""]
        neu = res.get("neurons") or {}
        if neu.get("top"):
            top = ", ".join(f"L{n['layer']}:{n['index']} (cos {n['score']:+.2f})"
                            for n in neu["top"][:8])
            lines += ["### Neurons", "",
                      f"{neu.get('k')} neurons kept (bank entry `{neu.get('bank_name')}`, "
                      f"ranking: {neu.get('method')}); first: {top}."]
            gc = neu.get("gain_check")
            if gc:
                lines.append(f"ENA check (γ = {gc.get('gamma')} on the set, held-out "
                             f"prompts): hit rate {_f(gc.get('base'))} → {_f(gc.get('gain'))} "
                             f"(paired Δ {_ci(gc.get('delta'), pct=True)}).")
            lines.append("")
        st = res.get("steering") or {}
        if st:
            lines += ["### Steered vs unsteered narratives (held-out neutral prompts)", ""]
            _steering_section(emo, st, lines)
            pr = res.get("preset")
            if pr:
                lines += [f"Saved as the bank preset `{pr['name']}` "
                          f"(`emosteer generate IN OUT -b bank.safetensors --preset {pr['name']}`): "
                          f"`{json.dumps(pr['config'])}`.", ""]
        samples = res.get("samples") or []
        if samples:
            lines += ["### Sample narratives", "", "| prompt | unsteered | steered |",
                      "| --- | --- | --- |"]
            for s in samples:
                lines.append(f"| {_quote(s.get('prompt'), 160)} | {_quote(s.get('unsteered'))} "
                             f"| {_quote(s.get('steered'))} ({s.get('label') or 'strength ' + _f(s.get('scale'), 2)}) |")
            lines.append("")
    _head_maps_section(r.get("head_maps") or {}, lines)
    _hallucination_section(r.get("hallucination") or {}, lines)
    t = r.get("timings") or {}
    if t:
        lines += ["## Timings", "", "| stage | seconds |", "| --- | --- |"]
        lines += [f"| {k} | {v:.1f} |" for k, v in t.items()]
        lines += [f"| **total** | {r.get('total_seconds', sum(t.values())):.1f} |", ""]
    lines += ["## Files", "",
              "- `results.json`: every measured number, per-prompt values included",
              "- `narratives.jsonl`: every held-out narrative (condition, scale, hit rate)",
              "- `bank.safetensors`: the vectors, head patches and neuron sets "
              "(`emosteer bank show bank.safetensors`)",
              "- `layer_profile.png`, `head_map.png`, `head_maps.png`, `hallucination.png`", ""]
    return "\n".join(lines)
