"""Does a probe-gated project-out lower emotion words on neutral prompts?

On the default model: the four built-in emotions' vectors and probes are extracted, their
mean probe becomes the gate (``emotions.probe``, at the layer of best mean held-out
accuracy), and these conditions run beside the unsteered model, every (condition, scene)
one request of one batch on the vLLM engine with the plugin, for each window of layers
after the gate (``--windows``: the next k layers, or every later layer):

* the four emotion directions projected out of the window, ungated;
* the same, only at tokens where the gate's score is above 0 (not latched);
* with ``--latch``, also latched (from the first token where it held on).

The study picks its operating point on the dev templates and reports it on the test
templates, so trying several windows does not select on the numbers reported.

Scored by ``emosteer.analysis.hallucination.hallucination_study`` on the neutral and
emotional scenes of the six templates (the numbers the README quotes are on the test
templates): emotion words per neutral narrative and the share asserting any emotion
(lower is better), the emotional scenes' specificity (kept is better) and the fluency
guards, with paired 95 % intervals.

Writes ``benchmarks/results/gated_project_out/``: ``results.json``, ``report.md`` (the
study table), ``hallucination.png`` and ``narratives.jsonl``. Not a test: about 10
minutes on 2 CPU cores.

    .venv/bin/python benchmarks/gated_project_out.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS_DIR, git_commit, machine_info  # noqa: E402


def _conditions(names: list, L: int, probe: str, layer: int, windows: list, latch: bool) -> list[dict]:
    """The unsteered model, then per window the project-out ungated and gated."""
    from emosteer.analysis.hallucination import gate_conditions

    conds = [{"condition": "unsteered", "label": "unsteered", "spec": None}]
    for w in windows:
        hi = L if w == "all" else min(L, layer + 1 + int(w))
        conds += gate_conditions(names, probe, layer, range(layer + 1, hi), (False, True) if latch else (False,))
    return conds


def write_report(out: dict, folder: str) -> None:
    """report.md (the study's table, as the demo report renders it) and the plot."""
    from emosteer.report.markdown import _hallucination_section
    from emosteer.report.plots import plot_hallucination

    lines = [f"# Probe-gated project-out on neutral prompts ({out['machine']['tag']})", "",
             f"Model {os.path.basename(str(out['model']))}, {out['engine']}, commit {out['commit']}; "
             f"settings {json.dumps({k: v for k, v in out['settings'].items() if k != 'out'})}; engine "
             f"start {out['engine_start_s']} s, extraction {out['extract_s']} s, study {out['study_s']} s.", ""]
    _hallucination_section(out["study"], lines)
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_hallucination(out["study"], os.path.join(folder, "hallucination.png"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=32, help="extraction pairs per emotion")
    ap.add_argument("--neutral", type=int, default=8, help="neutral scenes per template")
    ap.add_argument("--emotional", type=int, default=12, help="emotional scenes per emotion")
    ap.add_argument("--tokens", type=int, default=40, help="new tokens per narrative")
    ap.add_argument("--windows", default="2,5,all",
                    help="comma-separated windows of layers after the gate: k or 'all'")
    ap.add_argument("--latch", action="store_true", help="also the latched gate")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "gated_project_out"))
    ap.add_argument("--render", action="store_true",
                    help="only rewrite report.md and the plot from the results.json in --out")
    args = ap.parse_args(argv)
    if args.render:
        with open(os.path.join(args.out, "results.json")) as f:
            write_report(json.load(f), args.out)
        return 0

    from emosteer.analysis import hallucination as hal
    from emosteer.analysis.extract import extract_vectors
    from emosteer.analysis.runners import make_runner
    from emosteer.data import BUILTIN_EMOTIONS, load_builtin
    from emosteer.models import resolve_model

    os.makedirs(args.out, exist_ok=True)
    narr = os.path.join(args.out, "narratives.jsonl")
    if os.path.exists(narr):
        os.remove(narr)
    info = machine_info()
    path = resolve_model("default")
    t0 = time.perf_counter()
    runner = make_runner(path, "vllm", batch_size=16, progress=True, enforce_eager=True)
    out: dict = {"machine": info, "commit": git_commit(), "model": str(path),
                 "engine": "vLLM with the plugin, eager", "settings": vars(args),
                 "engine_start_s": round(time.perf_counter() - t0, 1)}
    try:
        t = time.perf_counter()
        for e in BUILTIN_EMOTIONS:
            extract_vectors(runner, load_builtin(e)[:args.pairs], [e], backend=runner.backend,
                            tau=0.5, max_new_tokens=32, progress=False)
        bank = runner.bank
        probe, layer = hal.register_general_probe(bank, BUILTIN_EMOTIONS)
        runner.register(bank)
        out["extract_s"] = round(time.perf_counter() - t, 1)
        out["gate"] = {"probe": probe, "layer": layer,
                       "mean_heldout_accuracy": bank.meta(probe)["mean_accuracy"][layer]}
        print(f"gate: {probe} at layer {layer} (mean held-out accuracy "
              f"{out['gate']['mean_heldout_accuracy']:.3f})", flush=True)
        conds = _conditions(list(BUILTIN_EMOTIONS), runner.info.num_layers, probe, layer,
                            args.windows.split(","), args.latch)
        scenes = hal.study_scenes(BUILTIN_EMOTIONS, args.neutral, args.emotional, reserved_pairs=args.pairs)
        t = time.perf_counter()
        res = hal.hallucination_study(runner, scenes, conds, args.tokens, narr_path=narr,
                                      desc="gated project-out")
        out["study_s"] = round(time.perf_counter() - t, 1)
        res.update(heads=[], heads_source="none", band=[], probe=probe, probe_layer=layer)
        out["study"] = res
    finally:
        runner.close()
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    write_report(out, args.out)
    for c in out["study"]["conditions"]:
        t = c["test"]
        w, dw = t.get("emotion_words") or {}, t.get("delta_emotion_words") or {}
        print(f"{c['label']}: emotion words {w.get('mean')}, Δ {dw.get('mean')} {dw.get('ci95')}; "
              f"hallucination {t['hallucination']['rate']}; specificity {t['specificity']['rate']}; "
              f"fluency {(t.get('fluency') or {}).get('ok')}", flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
