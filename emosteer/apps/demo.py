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

Every number in the report is measured in the run; nothing is hard-coded. The stages
themselves are in :mod:`emosteer.apps.demo_stages`; this module sizes and runs them.
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
from emosteer.apps.demo_stages import (_best_layer, _head_dict, _layer_dict, _mean, _neuron_dict,
                                       head_maps_stage, heldout_prompts, preset_candidates,
                                       split_dev_test, steer_band, steering_stage, study_stage)

__all__ = ["run_demo", "demo_settings", "SIZES", "steering_stage", "split_dev_test", "heldout_prompts",
           "preset_candidates", "steer_band", "carries"]

# Sized for SmolLM2-135M on 2 CPU cores. alpha and strengths are ‖added vector‖ / ‖residual‖
# at the layer (DESIGN: α ≈ 0.1); SmolLM2's own emotional shift ‖S_l‖/‖h_l‖ is ≈ 0.06, and
# 0.25+ degrades the text. map_emotions None: the head maps of the run's own emotions.
# eager: vLLM without torch.compile. On this CPU it decodes within a few percent of the
# compiled engine (README, plugin overhead table) and starts in about 70 s rather than the
# compiled engine's 150 s on a first run.
#
# full: joy alone about 36 min (engine start 3.5, the four full head maps 7, the 64-prompt
# layer sweep 9, the 12 steering candidates on 48 prompts 7, the hallucination study 10;
# benchmarks/results/demo_study/console.txt).
FULL = dict(n_pairs=32, tau=0.5, extract_tokens=32, n_layer_prompts=64, layer_tokens=24,
            alpha=0.1, proxy="next", top_heads=4, n_patch_prompts=8, neurons_k=64,
            ena_gamma=2.0, n_heldout=48, heldout_tokens=48, strengths=(0.05, 0.1, 0.2),
            n_samples=4, batch_size=16, band_k=4, band_strengths=(0.1, 0.2, 0.3),
            gen_strengths=(0.2, 0.3), head_scales=(2.0, 4.0),
            map_emotions=("joy", "sadness", "anger", "fear"), n_map_pairs=8, map_top=5, eager=False,
            ena_atp=True, study=True, study_neutral=8, study_emotional=12, study_tokens=40,
            study_pairs=32, study_neg=(0.1, 0.2), study_ena=(0.5, 0.25))
# short (the default): every stage once on few prompts; six steering candidates (the peak
# layer at two strengths, generated tokens only, the intention heads, the map heads, ENA)
# on 18 held-out prompts (3 per template: 9 dev, 9 test); the head map of the run's
# emotions only; a small hallucination study (24 scenes).
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
                builtin = load_builtin(emo)
                pairs = builtin[:cfg["n_pairs"]]
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
                prompts = [pair_text(p.neutral, p.query) for p in builtin[:cfg["n_layer_prompts"]]]
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
                                              map_heads=causal)
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
