"""``emosteer demo``: the VEENA method end to end on one model, with a measured report.

Stages (one engine, started once and reused by every stage):

1. model      ensure the default model (SmolLM2-135M-Instruct) or resolve a folder
2. extract    steering vectors S_l on a subset of the built-in counterfactual pairs,
              hit-rate filtered (emosteer.analysis.extract.extract_vectors)
3. layers     layer attribution: α·S_l injected at one layer at a time on neutral
              prompts, every layer in one batched sweep (attribution.layer_attribution)
4. heads      head map (emotional intention = cosine of the head's o_proj contribution
              with S_l), top candidates confirmed by activation patching
              (attribution.head_attribution)
5. neurons    MLP neurons whose down_proj column aligns with S_l, refined by attribution
              patching on the HF backend (attribution.neuron_attribution); γ check
6. steering   steered vs unsteered narratives on neutral prompts never used above, at
              the best layer, a few strengths, with fluency guards (perplexity under the
              unsteered model, repeated 3-grams, distinct-2); the strength is chosen on a
              dev half of those prompts, every number is reported on the other half;
              paired bootstrap CIs
7. report     report.md, layer_profile.png, head_map.png, results.json,
              narratives.jsonl, bank.safetensors

Three sizes (``SIZES``): "short", the default, one pass through every stage on few
prompts (a few minutes on 2 CPU cores, so that a first run shows the whole pipeline
quickly); "full", the study (every steering condition on 48 held-out prompts, head maps
of four emotions); "quick", smoke-test sizes. The console gets one line per stage and
one progress bar while a stage runs; vLLM's logging and the engine process's output go
to ``<out>/engine.log`` (``emosteer.apps.console``).

Every number in the report is measured in the run; nothing is hard-coded.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from emosteer.analysis.emotion import carries

__all__ = ["run_demo", "demo_settings", "SIZES", "steering_stage", "split_dev_test", "heldout_prompts", "preset_candidates",
           "steer_band", "carries"]

# Sized for SmolLM2-135M on 2 CPU cores. alpha and strengths are ‖added vector‖ / ‖residual‖
# at the layer (DESIGN: α ≈ 0.1); SmolLM2's own emotional shift ‖S_l‖/‖h_l‖ is ≈ 0.06, and
# 0.25+ degrades the text. map_emotions None: the head maps of the run's own emotions.
# eager: vLLM without torch.compile. On this CPU it decodes within a few percent of the
# compiled engine (README, plugin overhead table) and starts in about 70 s rather than the
# compiled engine's 150 s on a first run.
#
# full: joy alone about 18 min (engine start 3, the 11 steering candidates on 48 prompts
# 5.5, the four full head maps 7).
FULL = dict(n_pairs=32, tau=0.5, extract_tokens=32, n_layer_prompts=64, layer_tokens=24,
            alpha=0.1, proxy="next", top_heads=4, n_patch_prompts=8, neurons_k=64,
            ena_gamma=2.0, n_heldout=48, heldout_tokens=48, strengths=(0.05, 0.1, 0.2),
            n_samples=4, batch_size=16, band_k=4, band_strengths=(0.1, 0.2, 0.3),
            gen_strengths=(0.2, 0.3), head_scales=(2.0, 4.0),
            map_emotions=("joy", "sadness", "anger", "fear"), n_map_pairs=8, map_top=5, eager=False,
            ena_atp=True, study=True, study_neutral=8, study_emotional=12, study_tokens=40,
            study_pairs=32, study_neg=(0.1, 0.2), study_ena=(0.5, 0.25))
# short (the default): every stage once on few prompts; five steering candidates (the peak
# layer at two strengths, generated tokens only, the top heads, ENA) on 16 held-out
# prompts (8 dev, 8 test); the head map of the run's emotions only.
SHORT = dict(n_pairs=16, tau=0.5, extract_tokens=24, n_layer_prompts=4, layer_tokens=24,
             alpha=0.1, proxy="next", top_heads=3, n_patch_prompts=4, neurons_k=32,
             ena_gamma=2.0, n_heldout=16, heldout_tokens=32, strengths=(0.1, 0.2), n_samples=3,
             batch_size=16, band_k=4, band_strengths=(), gen_strengths=(0.2,), head_scales=(4.0,),
             map_emotions=None, n_map_pairs=4, map_top=5, eager=True, ena_atp=True, study=True,
             study_neutral=2, study_emotional=3, study_tokens=32, study_pairs=16,
             study_neg=(0.1,), study_ena=(0.5,))
# quick: smoke-test sizes (the tests); its numbers mean nothing.
QUICK = dict(n_pairs=6, tau=0.5, extract_tokens=12, n_layer_prompts=2, layer_tokens=12,
             alpha=0.1, proxy="next", top_heads=2, n_patch_prompts=2, neurons_k=8,
             ena_gamma=2.0, n_heldout=4, heldout_tokens=16, strengths=(0.1, 0.2), n_samples=2,
             batch_size=8, band_k=3, band_strengths=(0.2,), gen_strengths=(0.2,), head_scales=(4.0,),
             map_emotions=("joy", "sadness"), n_map_pairs=2, map_top=2, eager=True, ena_atp=True,
             study=True, study_neutral=1, study_emotional=2, study_tokens=12, study_pairs=6,
             study_neg=(0.1,), study_ena=(0.5,))
SIZES = {"short": SHORT, "full": FULL, "quick": QUICK}


def demo_settings(size: str = "short", **overrides) -> dict:
    """The stage sizes of ``size`` (a key of ``SIZES``) with ``overrides`` applied."""
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; known: {sorted(SIZES)}")
    s = dict(SIZES[size])
    unknown = sorted(set(overrides) - set(s))
    if unknown:
        raise ValueError(f"unknown demo setting(s) {unknown}; known: {sorted(s)}")
    s.update(overrides)
    for k in ("strengths", "band_strengths", "gen_strengths", "head_scales", "study_neg", "study_ena"):
        s[k] = tuple(s[k])
    if s["map_emotions"] is not None:
        s["map_emotions"] = tuple(s["map_emotions"])
    from emosteer.data import TEMPLATED_PER_TEMPLATE, TEMPLATES

    if s["study_neutral"] + math.ceil(s["n_heldout"] / len(TEMPLATES)) > TEMPLATED_PER_TEMPLATE:
        raise ValueError(f"study_neutral + n_heldout/{len(TEMPLATES)} exceed the {TEMPLATED_PER_TEMPLATE} "
                         "shipped scenes per template (the study and the steering stage use disjoint ones)")
    bad = [g for g in s["study_ena"] if not 0.0 < g < 1.0]
    if bad:
        raise ValueError(f"study_ena: every gain must lie in (0, 1) (the study lowers the neurons), got {bad}")
    return s


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001
        try:
            from importlib.metadata import version

            return version(pkg + "-cpu")
        except Exception:  # noqa: BLE001
            return "not installed"


# ------------------------------------------------------------------------------ helpers
def _mean(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _rel_scale(bank, emotion: str, layer: int, rel: float) -> float:
    """Scale so that ‖scale·S_l‖ = rel·‖h_l‖ (mean residual norm at the last token)."""
    S = bank.get(emotion, "residual")[layer]
    norms = bank.meta(emotion).get("residual_norm")
    h = float(norms[layer]) if norms else 1.0
    n = float(S.norm())
    return 0.0 if n == 0 else rel * h / n


def _layer_dict(lp, n_prompts: int, max_tokens: int) -> dict:
    """A LayerProfile (emosteer.analysis.attribution) as the report's layer_profile entry."""
    d = dict(lp.__dict__)
    d.update(layers=list(range(len(lp.profile))), change=lp.profile, n_prompts=n_prompts,
             max_tokens=max_tokens)
    return d


def _best_layer(lp) -> int:
    """Peak of the smoothed layer profile (3-layer moving average, as the stage rule uses:
    one noisy layer does not decide); ties: the earliest layer."""
    peak = (lp.stages or {}).get("peak")
    if peak is not None:
        return int(peak)
    return max(range(len(lp.profile)), key=lambda l: (lp.profile[l], -l))


def _head_dict(hs, info) -> dict:
    H = info.num_heads
    flat = hs.intention.flatten()
    return {"intention": hs.intention.tolist(), "source": hs.source, "confirmed": hs.confirmed,
            "top": [{"layer": l, "head": h, "score": float(hs.intention[l, h]),
                     "recovery": hs.recovery.get((l, h))} for l, h in hs.top],
            "patching": [{"layer": l, "head": h, "score": float(hs.intention[l, h]),
                          "recovery": r} for (l, h), r in hs.recovery.items()],
            "intention_top10": [{"layer": int(i) // H, "head": int(i) % H, "score": float(flat[i])}
                                for i in flat.argsort(descending=True)[:10]]}


def _neuron_dict(ns) -> dict:
    return {"k": len(ns.top), "bank_name": None, "method": ns.method,
            "top": [{"layer": l, "index": i, "score": float(ns.align[l, i]),
                     "atp": None if ns.atp is None else float(ns.atp[l, i])} for l, i in ns.top],
            "per_layer": {int(l): sum(1 for x, _ in ns.top if x == l) for l in {x for x, _ in ns.top}}}


def split_dev_test(prompts) -> tuple[list[int], list[int]]:
    """Indices of the development and held-out test parts of ``prompts`` (or of ``n``
    prompts): by template where the prompts carry one (``meta["template"]``: the dev
    templates ``emosteer.data.DEV_TEMPLATES``, the rest test, so a choice made on dev is
    reported on wording it never saw), else even positions dev, odd positions test."""
    from emosteer.data import DEV_TEMPLATES

    if isinstance(prompts, int):
        prompts = [None] * prompts
    tpl = [getattr(p, "meta", None) and p.meta.get("template") for p in prompts]
    if all(tpl):
        return ([i for i, t in enumerate(tpl) if t in DEV_TEMPLATES],
                [i for i, t in enumerate(tpl) if t not in DEV_TEMPLATES])
    idx = list(range(len(prompts)))
    return idx[0::2], idx[1::2]


def heldout_prompts(n: int) -> list:
    """The steering stage's held-out neutral prompts: ``ceil(n / 6)`` of each of the six
    templates (``emosteer.data.load_templated``), taken from the END of each template's
    list (the hallucination study takes its neutral scenes from the front)."""
    from emosteer.data import TEMPLATES, load_templated

    k = max(1, math.ceil(n / len(TEMPLATES)))
    out = []
    for t in TEMPLATES:
        rows = load_templated((t,))
        out += rows[len(rows) - k:]
    return out


def steer_band(lp, k: int = 4) -> list[int]:
    """The layers of the aggregate and execute bands where the profile is highest (at
    most ``k``, in layer order): where multi-layer steering spreads its strength."""
    st = lp.stages or {}
    cand = list(st.get("aggregate") or []) + list(st.get("execute") or [])
    if not cand:
        return []
    prof = st.get("smoothed") or lp.profile
    return sorted(sorted(cand, key=lambda l: -prof[l])[:k])


def preset_candidates(bank, emotion: str, best_layer: int, strengths, band: Sequence[int] = (),
                      band_strengths=(), gen_strengths=(), top_heads=(), head_scales=(),
                      ena_gamma: float | None = None, map_heads=()) -> list[dict]:
    """Every steering condition the demo compares (the first is unsteered): the peak
    layer at each strength; the band's layers sharing a total strength; the peak layer
    on generated tokens only; heads' outputs plus a multiple of their emotional shift
    (``<emotion>.h``), once for the top heads by intention (``top_heads``, condition
    "heads") and once for the patching map's significant top heads (``map_heads``,
    condition "heads_map"), so the two selections meet on the same prompts; ENA on the
    neuron set. Strength = ‖added vector‖ / ‖h_l‖."""
    conds = [{"condition": "unsteered", "strength": 0.0, "label": "unsteered", "spec": None}]

    def steer(layers, total, positions="all"):
        per = total / len(layers)
        return {"steer": [{"vector": emotion, "layers": [l], "scale": _rel_scale(bank, emotion, l, per),
                           **({"positions": positions} if positions != "all" else {})} for l in layers]}

    for r in strengths:
        conds.append({"condition": "steer", "strength": r, "label": f"layer {best_layer}, {r:g}",
                      "spec": steer([best_layer], r)})
    if len(band) > 1:
        for r in band_strengths:
            conds.append({"condition": "band", "strength": r,
                          "label": f"layers {','.join(map(str, band))}, {r:g} in all",
                          "spec": steer(list(band), r)})
    for r in gen_strengths:
        conds.append({"condition": "generated", "strength": r,
                      "label": f"layer {best_layer}, {r:g}, generated tokens only",
                      "spec": steer([best_layer], r, "generated")})
    for kind, heads, what in (("heads", top_heads, "top heads by intention"),
                              ("heads_map", map_heads, "heads of the patching map")):
        if not heads or f"{emotion}.h" not in bank.names():
            continue
        by_layer: dict[int, list[int]] = {}
        for l, h in heads:
            by_layer.setdefault(int(l), []).append(int(h))
        for s in head_scales:
            conds.append({"condition": kind, "strength": s, "heads": [list(map(int, c)) for c in heads],
                          "label": f"{len(heads)} {what} + {s:g}×ΔH",
                          "spec": {"heads": [{"layer": l, "head": sorted(hs), "mode": "add",
                                              "vector": f"{emotion}.h", "scale": s}
                                             for l, hs in sorted(by_layer.items())]}})
    if ena_gamma:
        conds.append({"condition": "ena", "strength": ena_gamma, "label": f"ENA γ={ena_gamma:g}",
                      "spec": {"neurons": {"set": f"{emotion}.ena", "gamma": ena_gamma}}})
    return conds


def steering_stage(runner, bank, emotion: str, prompts, conds: list[dict], max_tokens: int,
                   narr_path: Path, n_samples: int) -> tuple[dict, list[dict]]:
    """Every condition of ``conds`` (``preset_candidates``) on neutral prompts the
    extraction never saw, split in two (``split_dev_test``: by template where the prompts
    carry one): the operating point is chosen on the dev half —
    the largest uplift in the share of narratives carrying the emotion (ties: hit rate)
    among conditions whose fluency guards pass there — and every condition is reported on
    the held-out test half."""
    from emosteer.analysis.emotion import asserts_emotion, hallucination_rate, hit_rate, valence
    from emosteer.analysis.extract import pair_text
    from emosteer.analysis.fluency import distinct_n, guards, perplexities, repeated_ngram_share
    from emosteer.report import summarize

    texts = [pair_text(p.neutral, p.query) for p in prompts]
    all_texts = [t for _ in conds for t in texts]
    all_specs = [c["spec"] for c in conds for _ in texts]
    ids = runner.encode(list(all_texts))
    toks, outs, _ = runner.generate(ids, list(all_specs), max_new_tokens=max_tokens,
                                    desc=f"{emotion}: held-out")
    # Fluency guards: every narrative scored by the UNSTEERED model (one batch).
    ppls = perplexities(runner, ids, toks, desc=f"{emotion}: fluency")
    n = len(texts)
    dev, test = split_dev_test(prompts)
    split_of = {i: "dev" for i in dev} | {i: "test" for i in test}
    per: list[dict] = []  # per condition: per-prompt arrays
    with open(narr_path, "a", encoding="utf-8") as f:
        for ci, c in enumerate(conds):
            narr = outs[ci * n:(ci + 1) * n]
            ppl = ppls[ci * n:(ci + 1) * n]
            hits = [hit_rate(t, emotion) for t in narr]
            reps = [repeated_ngram_share(t, 3) for t in narr]
            for i, (p, t, h, nt, r3, pp) in enumerate(zip(prompts, texts, hits, narr, reps, ppl)):
                f.write(json.dumps({"emotion": emotion, "id": p.id, "split": split_of[i],
                                    "condition": c["condition"], "strength": c["strength"],
                                    "label": c["label"], "steer": c["spec"], "prompt": t,
                                    "narrative": nt, "hit_rate": h, "carries": carries(h),
                                    "asserts_emotion": asserts_emotion(nt),
                                    "valence": valence(nt), "repeated_3gram": r3,
                                    "perplexity": pp}, ensure_ascii=False) + "\n")
            per.append({**c, "texts": narr, "hits": hits, "reps": reps, "ppl": ppl})

    def table(rows_idx: list[int]) -> list[dict]:
        out = []
        for c in per:
            narr = [c["texts"][i] for i in rows_idx]
            hits = [c["hits"][i] for i in rows_idx]
            k = max(1, len(rows_idx))
            out.append({"condition": c["condition"], "strength": c["strength"], "label": c["label"],
                        "spec": c["spec"], "scores": [0.0 if h is None else h for h in hits],
                        "carries": [carries(h) for h in hits],
                        "hit_rate_mean": sum(0.0 if h is None else h for h in hits) / k,
                        "share_mean": sum(carries(h) for h in hits) / k,
                        "hit_rate_scored_mean": _mean(hits),
                        "n_scored": sum(h is not None for h in hits),
                        "hallucination_rate": hallucination_rate(narr) if narr else None,
                        "valence_mean": sum(valence(t) for t in narr) / k,
                        "rep3_mean": sum(c["reps"][i] for i in rows_idx) / k,
                        "distinct2": distinct_n(narr, 2), "ppl_mean": _mean([c["ppl"][i] for i in rows_idx]),
                        "texts": narr})
        base = out[0]
        for row in out[1:]:
            row["delta"] = summarize([a - b for a, b in zip(row["scores"], base["scores"])])
            row["share_delta"] = summarize([a - b for a, b in zip(row["carries"], base["carries"])])
            row["fluency"] = guards(row, base)
        return out

    dev_t, test_t = table(dev), table(test)
    b0 = dev_t[0]
    uplift = lambda r: (r["share_mean"] - b0["share_mean"], r["hit_rate_mean"] - b0["hit_rate_mean"])  # noqa: E731
    ok = [i for i, r in enumerate(dev_t) if i > 0 and r["fluency"]["ok"]]
    ci = max(ok, key=lambda i: uplift(dev_t[i])) if ok else None
    base = test_t[0]
    best = test_t[ci] if ci is not None else None
    samples = []
    if best is not None:
        m = len(test)
        order = sorted(range(m), key=lambda i: best["scores"][i] - base["scores"][i], reverse=True)
        pick = order[:max(1, n_samples - 1)] + order[-1:] if m > 1 else order
        for i in dict.fromkeys(pick):
            samples.append({"id": prompts[test[i]].id, "prompt": texts[test[i]],
                            "unsteered": base["texts"][i], "steered": best["texts"][i],
                            "scale": best["strength"], "label": best["label"]})
    strip = lambda r: {k: v for k, v in r.items() if k not in ("texts", "carries")}  # noqa: E731
    steer_layers = sorted({l for c in conds if c["spec"] for s in c["spec"].get("steer", [])
                           for l in s["layers"]})
    res = {"layers": steer_layers, "n_prompts": len(test), "max_tokens": max_tokens,
           "split": {"dev": len(dev), "test": len(test),
                     "templates": {"dev": sorted({(prompts[i].meta or {}).get("template") or "" for i in dev}),
                                   "test": sorted({(prompts[i].meta or {}).get("template") or "" for i in test})},
                     "rule": (
               "the operating point is chosen on the dev prompts (dev templates: the test prompts are "
               "asked in other templates): the largest uplift in the share "
               "of narratives carrying the emotion (ties: hit rate) among conditions whose "
               "perplexity is <= 1.25x and repeated 3-grams <= 2x the unsteered text's; every "
               "number reported on the held-out test prompts")},
           "selection": {"chosen": best["label"] if best else None,
                         "chosen_index": ci,
                         "dev": [{"condition": r["condition"], "label": r["label"], "strength": r["strength"],
                                  "uplift": r["hit_rate_mean"] - b0["hit_rate_mean"],
                                  "share_uplift": r["share_mean"] - b0["share_mean"],
                                  "fluency": r["fluency"]} for r in dev_t[1:]]},
           "baseline": strip(base),
           "conditions": [strip(r) for r in test_t[1:]],
           "strengths": [{**strip(r), "scale": r["strength"]} for r in test_t if r["condition"] == "steer"],
           "best": ({**strip(best), "scale": best["strength"]} if best else None),
           "strength_unit": "‖scale·S_l‖ / ‖h_l‖ (relative to the residual norm), summed over layers"}
    ena = [r for r in test_t if r["condition"] == "ena"]
    if ena:
        res["ena"] = strip(ena[0])
    return res, samples


def head_maps_stage(runner, emotions: Sequence[str], n_pairs: int, top: int) -> dict:
    """Full [layers x heads] patching maps of several emotions (every head its own
    request per pair, one batch per emotion), their significant top heads, and which of
    those are sentiment-specific (one emotion) or emotion-general (all)."""
    from emosteer.analysis import attribution as attr
    from emosteer.data import load_builtin

    maps = {}
    for emo in emotions:
        pairs = load_builtin(emo)[:n_pairs]
        maps[emo] = attr.head_map(runner, emo, pairs)
    tops = {e: m.top(top) for e, m in maps.items()}
    types = attr.head_types(tops) if len(tops) >= 2 else None
    # power: how far the top heads' intervals clear 0 (the smallest lower bound among them)
    margin = {e: (min(float(maps[e].ci[l, h, 0]) for l, h in t) if t else None) for e, t in tops.items()}
    out: dict[str, Any] = {"emotions": list(emotions), "n_pairs": n_pairs, "top_k": top,
                           "maps": {e: m.to_dict() for e, m in maps.items()},
                           "top": {e: [list(c) for c in t] for e, t in tops.items()},
                           "top_ci_low": margin}
    if types is not None:
        spec = [c for v in types["specific"].values() for c in v]
        gen = types["general"]
        mean_layer = lambda cs: (sum(l for l, _ in cs) / len(cs)) if cs else None  # noqa: E731
        out["types"] = {"general": [list(c) for c in gen],
                        "specific": {e: [list(c) for c in v] for e, v in types["specific"].items()},
                        "by_layer": types["by_layer"],
                        "mean_layer_specific": mean_layer(spec), "mean_layer_general": mean_layer(gen)}
    return out


def study_stage(runner, con, cfg: dict, emotions: Sequence[str], profiles: dict, results: dict,
                narr_path: Path) -> dict:
    """The hallucination study (``emosteer.analysis.hallucination``): the vectors of every
    built-in emotion (extracted here for those the run did not steer), their mean
    direction, then every reduction candidate on neutral and emotional scenes of six
    templates, chosen on the dev templates and reported on the test ones."""
    from emosteer.analysis import hallucination as hal
    from emosteer.analysis.extract import extract_vectors
    from emosteer.data import BUILTIN_EMOTIONS, load_builtin

    bank, info, first = runner.bank, runner.info, emotions[0]
    missing = [e for e in BUILTIN_EMOTIONS if e not in bank.names()]
    with con.stage("study: vectors") as st:
        for e in missing:
            extract_vectors(runner, load_builtin(e)[:cfg["study_pairs"]], [e], backend=runner.backend,
                            tau=cfg["tau"], max_new_tokens=cfg["extract_tokens"], progress=False)
        bank = runner.bank
        hal.register_general_direction(bank, BUILTIN_EMOTIONS)
        runner.register(bank)
        st.note = (f"extracted {', '.join(missing)} on {cfg['study_pairs']} pairs each; " if missing else "") + \
            f"{hal.GENERAL_VECTOR} = mean of the {len(BUILTIN_EMOTIONS)} unit directions"
    hm = results.get("head_maps") or {}
    general = [tuple(c) for c in ((hm.get("types") or {}).get("general") or [])]
    if general:
        heads, source = general, "emotion-general (in every head map's top set)"
    elif (hm.get("top") or {}).get(first):
        heads, source = [tuple(c) for c in hm["top"][first]], f"{first}'s patching-map (CI > 0)"
    else:
        heads = [tuple(c) for c in results["emotions"][first]["heads"]["top"]]
        heads, source = [(h["layer"], h["head"]) for h in heads], f"{first}'s intention"
    probe = f"{first}.probe" if f"{first}.probe" in bank.names() else None
    probe_layer = None
    if probe is not None:
        probe_layer = min(int(bank.meta(probe).get("best_layer") or 0), info.num_layers - 2)
    lp = profiles.get(first)
    band = steer_band(lp, cfg["band_k"]) if lp is not None else []
    if not band and lp is not None:
        band = [_best_layer(lp)]
    reserved = max(cfg["n_pairs"], cfg["study_pairs"], cfg["n_map_pairs"], cfg["n_layer_prompts"])
    scenes = hal.study_scenes(BUILTIN_EMOTIONS, cfg["study_neutral"], cfg["study_emotional"], reserved)
    conds = hal.reduction_candidates(BUILTIN_EMOTIONS, info.num_layers, band, cfg["study_neg"],
                                     heads=heads, heads_source="emotion-general" if general else "",
                                     probe=probe, probe_layer=probe_layer,
                                     ena_set=f"{first}.ena" if f"{first}.ena" in bank.names() else None,
                                     ena_gammas=cfg["study_ena"])
    with con.stage("study: hallucination") as st:
        res = hal.hallucination_study(runner, scenes, conds, cfg["study_tokens"], narr_path=narr_path,
                                      desc="hallucination study")
        res.update(heads=[list(c) for c in heads], heads_source=source, band=band,
                   probe=probe, probe_layer=probe_layer, extracted=missing)
        ch = res["chosen_index"]
        if ch is None:
            st.note = f"{len(conds) - 1} candidates; none passed the guards and the margin on dev"
        else:
            t0, t1 = res["conditions"][0]["test"], res["conditions"][ch]["test"]
            pct = lambda v: "n/a" if v is None else f"{v:.0%}"  # noqa: E731
            st.note = (f"{len(conds) - 1} candidates; chosen on dev: {res['chosen']}; on test "
                       f"hallucination {pct(t0['hallucination']['rate'])} → {pct(t1['hallucination']['rate'])}, "
                       f"specificity {pct(t0['specificity']['rate'])} → {pct(t1['specificity']['rate'])}"
                       f"{' (counts)' if res['chosen_counts_on_test'] else ' (does not count)'}")
    return res


# ------------------------------------------------------------------------------ demo
def _provenance(path) -> dict:
    """Where the weights come from, disclosed in every report: the default model is a
    quantized GGUF dequantized to float32 (emosteer/models/__init__.py writes the source)."""
    src = Path(path) / "emosteer_source.json"
    if not src.is_file():
        return {}
    source = json.loads(src.read_text()).get("source", "")
    out = {"source": source}
    if ".gguf" in source.lower():
        quant = next((q for q in ("Q4_1", "Q4_0", "Q5_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K") if q in source), "quantized")
        out["quantization"] = (f"a {quant} GGUF dequantized to float32: its weights carry the "
                               "quantization error, and every number here is of that model")
    return out


def _machine() -> dict:
    import transformers

    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "vllm": _version("vllm"),
            "env": {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE",
                                                    "VLLM_CPU_NUM_OF_RESERVED_CPU")}}


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def run_demo(model: str = "default", out: str | os.PathLike = "emosteer-report",
             emotions: Sequence[str] = ("joy",), backend: str = "auto", size: str = "short",
             progress: bool = True, verbose: bool = False, **overrides) -> Path:
    """Run every stage and write the report folder; returns the path of report.md.

    ``size``: "short", "full" or "quick" (``SIZES``); ``overrides`` change stage sizes (see
    ``demo_settings``), e.g. ``n_heldout=8``. ``progress``: the stage lines and the bar on
    the console (stderr); ``verbose``: vLLM's logging and the engine's output there too,
    instead of in ``<out>/engine.log``."""
    from emosteer.analysis import attribution as attr
    from emosteer.analysis.extract import extract_vectors, pair_text
    from emosteer.analysis.runners import make_runner
    from emosteer.apps.console import StageConsole
    from emosteer.data import load_builtin
    from emosteer.models import resolve_model
    from emosteer.report import write_report

    cfg = demo_settings(size, **overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(emotions, str):
        emotions = (emotions,)
    map_emotions = cfg["map_emotions"] or tuple(emotions)
    log = out / "engine.log"
    if not verbose:
        log.write_text("")  # this run's output only
    t0 = time.perf_counter()
    with StageConsole(log, verbose=verbose, show=progress) as con:
        what = {"short": "short run; --full: the whole study", "full": "the whole study",
                "quick": "smoke-test sizes"}[size]
        where = "" if verbose else f"; engine output: {log}"
        con.print(f"[bold]emosteer demo[/]: {', '.join(emotions)} on {model} ({what}){where}")
        with con.stage("model") as st:
            path = resolve_model(model)
            st.note = str(path)
        with con.stage("engine start") as st:
            runner = make_runner(path, backend, batch_size=cfg["batch_size"], progress=con.feed,
                                 enforce_eager=cfg["eager"])
            st.note = runner.note
        info = runner.info
        results: dict[str, Any] = {
            "model": {"name": model, "path": str(path), "info": info.to_dict(), **_provenance(path)},
            "machine": _machine(), "backend": runner.backend, "backend_note": runner.note,
            "size": size, "quick": size == "quick", "settings": {**cfg, "emotions": list(emotions)},
            "engine_log": None if verbose else str(log), "emotions": {}}
        narr_path = out / "narratives.jsonl"
        narr_path.write_text("")
        heldout = heldout_prompts(cfg["n_heldout"])
        hf_side = None  # a transformers runner for attribution patching (gradients)
        try:
            # The head maps first: the steering heads, the VEE sets and the study's
            # emotion-general heads are chosen from them (by causal effect), not by
            # intention, wherever a map was run.
            with con.stage("head maps") as st:
                results["head_maps"] = head_maps_stage(runner, map_emotions, cfg["n_map_pairs"],
                                                       cfg["map_top"])
                st.note = (f"{', '.join(map_emotions)}: every head patched on {cfg['n_map_pairs']} "
                           "pairs")
            map_tops = {e: [tuple(c) for c in t] for e, t in results["head_maps"]["top"].items()}
            profiles: dict[str, Any] = {}
            for emo in emotions:
                res: dict[str, Any] = {}
                pairs = load_builtin(emo)[:cfg["n_pairs"]]
                with con.stage(f"{emo}: extract") as st:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        ex = extract_vectors(runner, pairs, [emo], backend=runner.backend,
                                             tau=cfg["tau"], max_new_tokens=cfg["extract_tokens"],
                                             progress=False)
                    meta, bank = ex.meta[emo], runner.bank
                    ratio = bank.get(emo).norm(dim=-1) / torch.tensor(meta["residual_norm"]).clamp_min(1e-6)
                    res["extraction"] = {
                        "n_pairs": meta["n_pairs"], "n_kept": meta["n_kept"], "tau": cfg["tau"],
                        "filter": meta["filter"], "hit_rate_mean": _mean(ex.hit_rates[emo]),
                        "hit_rates": ex.hit_rates[emo], "norm_ratio": ratio.tolist(),
                        "mean_norm_ratio": float(ratio.mean()),
                        "note": "; ".join(str(w.message) for w in caught
                                          if "extract" in str(w.message)) or None}
                    st.note = f"{meta['n_kept']}/{meta['n_pairs']} pairs kept (hit rate ≥ {cfg['tau']})"
                kept = [p for p, k in zip(pairs, ex.kept[emo]) if k] or pairs
                tids = attr.target_token_ids(runner.tokenizer, emo)
                prompts = [pair_text(p.neutral, p.query) for p in load_builtin(emo)[:cfg["n_layer_prompts"]]]
                with con.stage(f"{emo}: layer attribution") as st:
                    lp = attr.layer_attribution(runner, emo, prompts, alpha=cfg["alpha"],
                                                max_new_tokens=cfg["layer_tokens"],
                                                proxy=cfg["proxy"], tids=tids)
                    res["layer_profile"] = _layer_dict(lp, len(prompts), cfg["layer_tokens"])
                    profiles[emo] = lp
                    best = _best_layer(lp)
                    st.note = f"peak layer {best} of {info.num_layers} (profile from {lp.profile_source})"
                patch_pairs = kept[:cfg["n_patch_prompts"]]
                with con.stage(f"{emo}: heads") as st:
                    hs = attr.head_attribution(runner, emo, patch_pairs, top_k=cfg["top_heads"],
                                               tids=tids)
                    res["heads"] = _head_dict(hs, info)
                    # The candidate set: the patching map's significant top heads where the
                    # map was run (causal effect); intention + patching only where it was not.
                    causal = map_tops.get(emo, [])[:cfg["top_heads"]]
                    chosen = causal or list(hs.top)
                    method = ("patching map (CI > 0)" if causal else
                              "intention + patching (no head map of this emotion was run)")
                    res["heads"]["selection"] = {"method": method, "heads": [list(c) for c in chosen],
                                                 "intention": [list(c) for c in hs.top],
                                                 "causal": [list(c) for c in causal]}
                    mask = torch.zeros(info.num_layers, info.num_heads)
                    for l, h in chosen:
                        mask[l, h] = 1
                    bank.add(f"{emo}.vee", "head_mask", mask, emotion=emo, method=method,
                             confirmed=hs.confirmed, top=[list(c) for c in chosen])
                    st.note = ("top " + ", ".join(f"L{l}H{h}" for l, h in chosen)
                               + (" (patching map)" if causal else " (intention)"))
                with con.stage(f"{emo}: neurons") as st:
                    nrunner = runner
                    if cfg["ena_atp"] and not hasattr(runner, "forward_grad"):
                        # vLLM has no gradients: attribution patching runs on a transformers
                        # copy of the same weights, reading the same bank
                        if hf_side is None:
                            hf_side = make_runner(path, "hf", batch_size=cfg["batch_size"], progress=False)
                        hf_side.register(bank)
                        nrunner = hf_side
                    ns = attr.neuron_attribution(nrunner, emo, patch_pairs, top_k=cfg["neurons_k"],
                                                 tids=tids)
                    res["neurons"] = _neuron_dict(ns)
                    mask = torch.zeros(info.num_layers, info.intermediate_size)
                    for l, i in ns.top:
                        mask[l, i] = 1
                    bank.add(f"{emo}.ena", "neurons", mask, emotion=emo, method=ns.method,
                             top_k=cfg["neurons_k"])
                    res["neurons"]["bank_name"] = f"{emo}.ena"
                    st.note = f"{len(ns.top)} neurons ({ns.method})"
                for name in [n for n in bank.names() if n.startswith("_attr.")]:
                    bank.remove(name)
                runner.register(bank)
                with con.stage(f"{emo}: steered narratives") as st:
                    conds = preset_candidates(bank, emo, best, cfg["strengths"],
                                              band=steer_band(lp, cfg["band_k"]),
                                              band_strengths=cfg["band_strengths"],
                                              gen_strengths=cfg["gen_strengths"], top_heads=hs.top,
                                              head_scales=cfg["head_scales"], ena_gamma=cfg["ena_gamma"],
                                              map_heads=map_tops.get(emo, [])[:cfg["top_heads"]])
                    steer, samples = steering_stage(runner, bank, emo, heldout, conds,
                                                    cfg["heldout_tokens"], narr_path, cfg["n_samples"])
                    res["steering"], res["samples"] = steer, samples
                    if steer.get("best"):
                        # The operating point chosen on dev, with its held-out numbers: what
                        # `emosteer generate --preset <emotion>.preset` steers with.
                        b = steer["best"]
                        bank.set_preset(f"{emo}.preset", b["spec"], chosen_on="dev", condition=b["label"],
                                        strength=b["scale"],
                                        test_uplift=(b.get("delta") or {}).get("mean"),
                                        test_share_uplift=(b.get("share_delta") or {}).get("mean"),
                                        fluency=b.get("fluency"))
                        res["preset"] = {"name": f"{emo}.preset", "config": bank.preset(f"{emo}.preset")}
                    if "ena" in steer:
                        e = steer["ena"]
                        res["neurons"]["gain_check"] = {
                            "gamma": cfg["ena_gamma"], "base": steer["baseline"]["hit_rate_mean"],
                            "gain": e["hit_rate_mean"], "delta": e["delta"],
                            "hallucination_rate": e["hallucination_rate"]}
                    st.note = _steering_note(steer, emo, len(conds) - 1)
                results["emotions"][emo] = res
            if cfg["study"]:
                results["hallucination"] = study_stage(runner, con, cfg, emotions, profiles,
                                                       results, narr_path)
            runner.bank.save(out / "bank.safetensors")
            (out / "bank.safetensors").chmod(0o644)
        finally:
            runner.close()
            if hf_side is not None:
                hf_side.close()
        with con.stage("report") as st:
            results["timings"] = con.timings  # the report stage's own time lands here too
            results["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            report = write_report(results, out)
            st.note = str(report)
        results["total_seconds"] = time.perf_counter() - t0
        report = write_report(results, out)  # again, with the report stage's time and the total
        con.print(f"[bold green]done[/] in {_duration(results['total_seconds'])}")
    return report


def _steering_note(steer: dict, emotion: str, n_candidates: int) -> str:
    """The steering stage's line: the operating point chosen on dev and its effect on test."""
    best, base = steer.get("best"), steer["baseline"]
    if best is None:
        return f"{n_candidates} candidates; none passed the fluency guards on dev"
    return (f"{n_candidates} candidates; chosen on dev: {best['label']}; carrying {emotion} on "
            f"test {base['share_mean']:.0%} → {best['share_mean']:.0%}")
