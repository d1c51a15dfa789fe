"""Emotional hallucination: can an intervention make the model stop inventing emotions
where the input carries none, and keep the right one where it does?

The study asks every candidate intervention two things, on scenes it was not chosen on:

* **hallucination** — on NEUTRAL scenes (no emotional cue), the share of narratives that
  assert an emotion (``emosteer.analysis.emotion.asserts_emotion``). Lower is better.
  Beside it, the mean number of emotion words per neutral narrative (a finer measure of
  the same thing, with its paired change).
* **specificity** — on EMOTIONAL scenes (the emotional halves of built-in pairs that no
  extraction or attribution used), the share of narratives that carry the scene's own
  emotion (``carries``: at least half of their emotion words are of it). Kept is better.

plus the fluency guards of the steering stage (perplexity under the unsteered model and
repeated 3-grams, relative to the unsteered text of the same scenes).

Scenes are asked in six prompt templates (``emosteer.data.TEMPLATES``); the choice is
made on the DEV templates and every reported number is on the TEST templates, whose
wording the choice never saw. Every (condition, scene) is its own request, all in one
batch. A condition **counts** on a split when its paired change in hallucination has a
95 % interval below 0, its specificity falls by less than ``margin`` (mean paired change
> −margin), and both fluency guards pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["Scene", "study_scenes", "reduction_candidates", "gate_conditions", "hallucination_study",
           "register_general_direction", "register_general_probe", "GENERAL_VECTOR",
           "GENERAL_PROBE", "MARGIN"]

GENERAL_VECTOR = "emotions.mean"  # the bank entry of the mean unit emotion direction
GENERAL_PROBE = "emotions.probe"  # the bank entry of the mean of the emotions' probes
MARGIN = 0.10  # the most a counting condition may lower specificity (share of scenes)


@dataclass(frozen=True)
class Scene:
    """One prompt of the study: the user turn, its template, and the emotion its scene
    carries (None: a neutral scene)."""

    id: str
    text: str
    template: str
    emotion: str | None

    @property
    def split(self) -> str:
        from emosteer.data import DEV_TEMPLATES

        return "dev" if self.template in DEV_TEMPLATES else "test"


def study_scenes(emotions: Sequence[str], n_neutral: int, n_emotional: int,
                 reserved_pairs: int) -> list[Scene]:
    """``n_neutral`` neutral scenes per template (``load_templated``) and ``n_emotional``
    emotional scenes per emotion: the emotional sides of the LAST ``n_emotional`` built-in
    pairs of each emotion, asked in a dev template and a test template in turn. ``reserved_pairs``: how many
    pairs from the front of each emotion's list the run used elsewhere (extraction,
    attribution, head maps); the two ranges must not meet."""
    from emosteer.analysis.extract import pair_text
    from emosteer.data import DEV_TEMPLATES, TEMPLATES, TEST_TEMPLATES, load_builtin, load_templated

    names = list(TEMPLATES)
    # emotional scenes take dev and test templates in turn, so both splits get them
    turns = [t for pair in zip(DEV_TEMPLATES, TEST_TEMPLATES) for t in pair]
    scenes = []
    for t in names:
        rows = load_templated((t,))
        if n_neutral > len(rows):
            raise ValueError(f"n_neutral={n_neutral} exceeds the {len(rows)} shipped scenes of template {t!r}")
        scenes += [Scene(p.id, pair_text(p.neutral, p.query), t, None) for p in rows[:n_neutral]]
    for e_i, emo in enumerate(emotions):
        pairs = load_builtin(emo)
        if n_emotional + reserved_pairs > len(pairs):
            raise ValueError(f"{emo}: {n_emotional} emotional scenes after the {reserved_pairs} pairs the "
                             f"run uses exceed the {len(pairs)} built-in pairs")
        for k, p in enumerate(pairs[len(pairs) - n_emotional:]):
            t = turns[(k + e_i) % len(turns)]  # odd counts: the emotions alternate which split gets more
            scenes.append(Scene(f"{p.id}:{t}", pair_text(p.emotional, TEMPLATES[t]), t, emo))
    return scenes


def register_general_direction(bank, emotions: Sequence[str], name: str = GENERAL_VECTOR) -> str:
    """Add ``name``: per layer the mean of the emotions' unit residual directions (each
    emotion counts the same whatever its norm), scaled to their mean norm."""
    import torch

    vs = torch.stack([bank.get(e, "residual").float() for e in emotions])  # [E, L, d]
    n = vs.norm(dim=-1, keepdim=True)
    unit = torch.where(n > 0, vs / n.clamp_min(1e-12), torch.zeros_like(vs))
    mean = unit.mean(0)
    m = mean.norm(dim=-1, keepdim=True)
    vec = torch.where(m > 0, mean / m.clamp_min(1e-12), mean) * n.mean(0)
    bank.add(name, "residual", vec, emotion="any", method="mean of unit directions",
             emotions=list(emotions))
    return name


def register_general_probe(bank, emotions: Sequence[str], name: str = GENERAL_PROBE) -> tuple[str, int]:
    """Add ``name``, a probe of "some emotion is present": per layer the mean of the
    emotions' probes (``<e>.probe``, [L, d+1] = unit difference-of-means direction and
    the bias that puts the pair means' midpoint at 0), so its score is the mean of their
    scores. Returns (name, gate layer): the layer of best mean held-out accuracy over the
    emotions (train accuracy where a probe held nothing out), at most L - 2 so that
    layers remain after it to act on."""
    import torch

    probes = [f"{e}.probe" for e in emotions]
    vs = torch.stack([bank.get(p, "probe").float() for p in probes])  # [E, L, d+1]
    accs = []
    for p in probes:
        m = bank.meta(p)
        accs.append(m.get("heldout_accuracy") or m.get("train_accuracy"))
    L = vs.shape[1]
    mean_acc = [sum(a[l] for a in accs) / len(accs) for l in range(L)] if all(accs) else [0.0] * L
    layer = max(range(max(1, L - 1)), key=lambda l: (mean_acc[l], l))
    bank.add(name, "probe", vs.mean(0), emotion="any", component="probe",
             method="mean of the emotions' probes", emotions=list(emotions),
             mean_accuracy=[round(a, 6) for a in mean_acc], best_layer=layer)
    return name, layer


def gate_conditions(names: Sequence[str], probe: str, probe_layer: int, layers: Sequence[int],
                    latches: Sequence[bool] = (False, True)) -> list[dict]:
    """Project-out of ``names``' span at ``layers`` (after the gate layer), first ungated
    (``after_gate``), then gated by ``probe`` at ``probe_layer`` (score above 0), once per
    ``latches`` entry."""
    layers = list(layers)
    span = f"layers {layers[0]}–{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
    out = {"vector": list(names), "layers": layers, "mode": "project_out"}
    what = f"project out {len(names)} emotions, {span}"
    conds = [{"condition": "after_gate", "label": f"{what}, ungated", "spec": {"steer": [dict(out)]}}]
    for latch in latches:
        conds.append({"condition": "gated", "label": f"{what}, where {probe} > 0{' (latched)' if latch else ''}",
                      "spec": {"steer": [dict(out)], "when": {"probe": probe, "layer": probe_layer,
                                                               "above": 0.0, "latch": latch}}})
    return conds


def reduction_candidates(emotions: Sequence[str], num_layers: int, band: Sequence[int],
                         neg_strengths: Sequence[float] = (0.1, 0.2), heads: Sequence = (),
                         heads_source: str = "", head_scale: float = 0.5,
                         probe: str | None = None, probe_layer: int | None = None,
                         ena_set: str | None = None, ena_gammas: Sequence[float] = (0.5,),
                         general: str = GENERAL_VECTOR) -> list[dict]:
    """The interventions that remove or gate emotion (the first is unsteered):
    project-out of the emotion directions' span (the band; every layer), clamp of the mean
    emotion direction to 0 (the band), negative steering along it (relative strength,
    spread over the band), down-scaling and ablation of ``heads`` (the emotion-general
    heads), project-out gated by a probe (``probe`` at ``probe_layer``, latched and
    not; it acts on the layers after the gate, only at tokens where the probe's score is
    above 0), and ENA with gain below 1 on ``ena_set``."""
    band = sorted(int(l) for l in band) or [num_layers // 2]
    span = ",".join(map(str, band))
    names = list(emotions)
    conds: list[dict] = [{"condition": "unsteered", "label": "unsteered", "spec": None}]
    conds.append({"condition": "project_out", "label": f"project out {len(names)} emotions, layers {span}",
                  "spec": {"steer": [{"vector": names, "layers": band, "mode": "project_out"}]}})
    conds.append({"condition": "project_out", "label": f"project out {len(names)} emotions, every layer",
                  "spec": {"steer": [{"vector": names, "layers": "all", "mode": "project_out"}]}})
    conds.append({"condition": "clamp", "label": f"clamp the mean emotion direction to 0, layers {span}",
                  "spec": {"steer": [{"vector": general, "layers": band, "mode": "clamp", "value": 0.0}]}})
    for a in neg_strengths:
        conds.append({"condition": "negative", "label": f"steer −{a:g} along the mean emotion direction, layers {span}",
                      "spec": {"steer": [{"vector": general, "layers": band, "scale": -a / len(band),
                                          "scale_mode": "relative"}]}})
    if heads:
        by_layer: dict[int, list[int]] = {}
        for l, h in heads:
            by_layer.setdefault(int(l), []).append(int(h))
        what = f"{len(heads)} {heads_source + ' ' if heads_source else ''}heads"
        conds.append({"condition": "heads_scale", "label": f"scale {what} ×{head_scale:g}",
                      "spec": {"heads": [{"layer": l, "head": sorted(hs), "mode": "scale", "scale": head_scale}
                                         for l, hs in sorted(by_layer.items())]}})
        conds.append({"condition": "heads_ablate", "label": f"ablate {what}",
                      "spec": {"heads": [{"layer": l, "head": sorted(hs), "mode": "ablate"}
                                         for l, hs in sorted(by_layer.items())]}})
    if probe is not None and probe_layer is not None and probe_layer < num_layers - 1:
        conds += gate_conditions(names, probe, int(probe_layer), list(range(probe_layer + 1, num_layers)))
    if ena_set:
        for g in ena_gammas:
            conds.append({"condition": "ena_down", "label": f"ENA γ={g:g} on {ena_set}",
                          "spec": {"neurons": {"set": ena_set, "gamma": g}}})
    return conds


def _rate(values: Sequence[float]) -> dict:
    from emosteer.report import summarize

    s = summarize(values)
    return {"rate": s["mean"], "ci95": s["ci95"], "n": s["n"]}


def hallucination_study(runner, scenes: Sequence[Scene], conds: list[dict], max_tokens: int,
                        margin: float = MARGIN, narr_path: str | Path | None = None,
                        desc: str = "hallucination") -> dict:
    """Every condition of ``conds`` (``reduction_candidates``; the first unsteered) on
    every scene, one batch; scored per split (dev / test templates). The operating point
    is chosen on dev: among the conditions that lower hallucination there, pass the guards
    and lower specificity by less than ``margin``, the largest fall in hallucination
    (ties: the higher specificity); none when no condition qualifies. Every condition is reported on both splits with its verdict."""
    from emosteer.analysis.emotion import carries, emotion_word_count, hit_rate
    from emosteer.analysis.fluency import guards, perplexities, repeated_ngram_share
    from emosteer.report import summarize

    if not conds or conds[0]["spec"] is not None:
        raise ValueError("the first condition must be the unsteered one (spec None)")
    texts = [s.text for s in scenes]
    ids = runner.encode(texts)
    all_ids = [x for _ in conds for x in ids]
    specs = [c["spec"] for c in conds for _ in scenes]
    toks, outs, _ = runner.generate(all_ids, specs, max_new_tokens=max_tokens, desc=desc)
    ppls = perplexities(runner, all_ids, toks, desc=f"{desc}: fluency")
    n = len(scenes)
    per = []
    for ci, c in enumerate(conds):
        narr = outs[ci * n:(ci + 1) * n]
        words = [float(emotion_word_count(t)) for t in narr]
        per.append({"texts": narr, "ppl": ppls[ci * n:(ci + 1) * n],
                    "rep": [repeated_ngram_share(t, 3) for t in narr],
                    "words": words,
                    "asserts": [1.0 if w >= 1 else 0.0 for w in words],  # asserts_emotion
                    "carries": [carries(hit_rate(t, s.emotion)) if s.emotion else None
                                for t, s in zip(narr, scenes)]})
    if narr_path is not None:
        with open(narr_path, "a", encoding="utf-8") as f:
            for c, p in zip(conds, per):
                for s, t, a, w, k, pp, r in zip(scenes, p["texts"], p["asserts"], p["words"], p["carries"],
                                                p["ppl"], p["rep"]):
                    f.write(json.dumps({"study": "hallucination", "id": s.id, "split": s.split,
                                        "template": s.template, "scene_emotion": s.emotion,
                                        "condition": c["condition"], "label": c["label"],
                                        "steer": c["spec"], "prompt": s.text, "narrative": t,
                                        "asserts_emotion": bool(a), "emotion_words": int(w), "carries": k,
                                        "perplexity": pp, "repeated_3gram": r}, ensure_ascii=False) + "\n")

    def table(split: str) -> list[dict]:
        neu = [i for i, s in enumerate(scenes) if s.split == split and s.emotion is None]
        emo = [i for i, s in enumerate(scenes) if s.split == split and s.emotion is not None]
        both = neu + emo
        rows = []
        for p in per:
            ppl = [p["ppl"][i] for i in both if p["ppl"][i] is not None]
            rows.append({"hallucination": _rate([p["asserts"][i] for i in neu]),
                         "emotion_words": summarize([p["words"][i] for i in neu]),
                         "specificity": _rate([p["carries"][i] for i in emo]),
                         "ppl_mean": sum(ppl) / len(ppl) if ppl else None,
                         "rep3_mean": sum(p["rep"][i] for i in both) / max(1, len(both)),
                         "n_neutral": len(neu), "n_emotional": len(emo)})
        b, bp = rows[0], per[0]
        for row, p in zip(rows[1:], per[1:]):
            row["delta_hallucination"] = summarize([p["asserts"][i] - bp["asserts"][i] for i in neu])
            row["delta_emotion_words"] = summarize([p["words"][i] - bp["words"][i] for i in neu])
            row["delta_specificity"] = summarize([p["carries"][i] - bp["carries"][i] for i in emo])
            row["fluency"] = guards(row, b)
            dh, ds = row["delta_hallucination"], row["delta_specificity"]
            row["counts"] = bool(dh["ci95"][1] is not None and dh["ci95"][1] < 0
                                 and ds["mean"] is not None and ds["mean"] > -margin
                                 and row["fluency"]["ok"])
        return rows

    dev, test = table("dev"), table("test")
    ok = [i for i in range(1, len(conds)) if dev[i]["fluency"]["ok"]
          and (dev[i]["delta_specificity"]["mean"] or 0.0) > -margin
          and (dev[i]["delta_hallucination"]["mean"] or 0.0) < 0]
    chosen = (min(ok, key=lambda i: (dev[i]["delta_hallucination"]["mean"],
                                     -(dev[i]["delta_specificity"]["mean"] or 0.0))) if ok else None)
    templates = lambda sp: sorted({s.template for s in scenes if s.split == sp})  # noqa: E731
    return {
        "emotions": sorted({s.emotion for s in scenes if s.emotion}),
        "templates": {"dev": templates("dev"), "test": templates("test")},
        "n": {sp: {"neutral": t[0]["n_neutral"], "emotional": t[0]["n_emotional"]}
              for sp, t in (("dev", dev), ("test", test))},
        "max_tokens": max_tokens, "margin": margin,
        "rule": ("hallucination = share of narratives on neutral scenes asserting any emotion; "
                 "specificity = share of narratives on emotional scenes carrying the scene's "
                 "emotion. A condition counts when its paired change in hallucination has a 95 % "
                 f"CI below 0, its specificity falls by less than {margin:g} and perplexity <= "
                 "1.25x and repeated 3-grams <= 2x the unsteered text's; the operating point is "
                 "chosen on the dev templates (the largest fall in hallucination among conditions "
                 "that lower it and pass the guards and the margin there) and reported on the test templates"),
        "conditions": [{"condition": c["condition"], "label": c["label"], "spec": c["spec"],
                        "dev": d, "test": t} for c, d, t in zip(conds, dev, test)],
        "chosen": None if chosen is None else conds[chosen]["label"],
        "chosen_index": chosen,
        "chosen_counts_on_test": None if chosen is None else test[chosen]["counts"],
        "counting_on_test": [conds[i]["label"] for i in range(1, len(conds)) if test[i]["counts"]],
    }
