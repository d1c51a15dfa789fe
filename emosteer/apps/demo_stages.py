"""The stages of ``emosteer demo`` (:mod:`emosteer.apps.demo` runs them in order on one
engine): the choices and comparisons of the steering stage, the full head maps, and the
hallucination study; plus the small helpers that turn attribution results into the
report's entries."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from emosteer.analysis.emotion import carries

__all__ = ["split_dev_test", "heldout_prompts", "steer_band", "preset_candidates", "steering_stage",
           "head_maps_stage", "study_stage", "carries"]


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
        probe, probe_layer = hal.register_general_probe(bank, BUILTIN_EMOTIONS)
        runner.register(bank)
        st.note = (f"extracted {', '.join(missing)} on {cfg['study_pairs']} pairs each; " if missing else "") + \
            f"{hal.GENERAL_VECTOR} = mean of the {len(BUILTIN_EMOTIONS)} unit directions; " \
            f"{probe} = mean of their probes (gate at layer {probe_layer})"
    hm = results.get("head_maps") or {}
    general = [tuple(c) for c in ((hm.get("types") or {}).get("general") or [])]
    if general:
        heads, source = general, "emotion-general (in every head map's top set)"
    elif (hm.get("top") or {}).get(first):
        heads, source = [tuple(c) for c in hm["top"][first]], f"{first}'s patching-map (CI > 0)"
    else:
        heads = [tuple(c) for c in results["emotions"][first]["heads"]["selection"]["intention"]]
        source = f"{first}'s intention"
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
            st.note = (f"{len(conds) - 1} candidates; none lowered hallucination on dev within the guards "
                       "and the margin")
        else:
            t0, t1 = res["conditions"][0]["test"], res["conditions"][ch]["test"]
            pct = lambda v: "n/a" if v is None else f"{v:.0%}"  # noqa: E731
            st.note = (f"{len(conds) - 1} candidates; chosen on dev: {res['chosen']}; on test "
                       f"hallucination {pct(t0['hallucination']['rate'])} → {pct(t1['hallucination']['rate'])}, "
                       f"specificity {pct(t0['specificity']['rate'])} → {pct(t1['specificity']['rate'])}"
                       f"{' (counts)' if res['chosen_counts_on_test'] else ' (does not count)'}")
    return res
