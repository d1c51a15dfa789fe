"""How many prompts and pairs the analysis needs on the default model: one layer sweep
on up to all 120 built-in neutral prompts of an emotion and one full head map on more
pairs than the demo uses, each one batch of requests on the vLLM engine with the plugin.

Writes ``benchmarks/results/analysis_power_<device>.json``: the layer profile's stage
confidence (share of bootstrap resamples with the same aggregate band), its stability by
number of prompts (``stability_by_n``), the head map's top heads with their intervals,
and the engine seconds of each. Not a test: it takes about 20 minutes on 2 CPU cores.

    .venv/bin/python benchmarks/analysis_power.py --emotion joy --prompts 120 --pairs 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS_DIR, git_commit, machine_info  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emotion", default="joy")
    ap.add_argument("--prompts", type=int, default=120, help="layer-sweep prompts (at most 120; 0: no sweep)")
    ap.add_argument("--pairs", type=int, default=16, help="head-map pairs")
    ap.add_argument("--extract-pairs", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=24, help="new tokens per sweep narrative")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from emosteer.analysis import attribution as attr
    from emosteer.analysis.extract import extract_vectors, pair_text
    from emosteer.analysis.runners import make_runner
    from emosteer.data import load_builtin
    from emosteer.models import resolve_model

    pairs = load_builtin(args.emotion)
    if args.prompts > len(pairs):
        raise SystemExit(f"--prompts: at most {len(pairs)} built-in prompts for {args.emotion}")
    info = machine_info()
    path = resolve_model("default")
    t0 = time.perf_counter()
    runner = make_runner(path, "vllm", batch_size=16, progress=True, enforce_eager=True)
    out: dict = {"machine": info, "commit": git_commit(), "model": str(path), "emotion": args.emotion,
                 "engine": "vLLM with the plugin, eager", "engine_start_s": time.perf_counter() - t0}
    try:
        extract_vectors(runner, pairs[:args.extract_pairs], [args.emotion], backend=runner.backend,
                        max_new_tokens=32, progress=False)
        tids = attr.target_token_ids(runner.tokenizer, args.emotion)
        prompts = [pair_text(p.neutral, p.query) for p in pairs[:args.prompts]]
        t = time.perf_counter()
        lp = None if not prompts else attr.layer_attribution(runner, args.emotion, prompts, alpha=0.1, max_new_tokens=args.tokens,
                                    proxy="next", tids=tids)
        out["layers"] = None if lp is None else {"n_prompts": len(prompts), "seconds": time.perf_counter() - t,
                         "requests": len(prompts) * runner.info.num_layers,
                         "profile_source": lp.profile_source, "stages": lp.stages,
                         "stage_confidence": lp.stage_confidence, "three_stage_frac": lp.three_stage_frac,
                         "stability_by_n": lp.stability_by_n}
        if lp is not None:
            print(f"layers: {len(prompts)} prompts in {out['layers']['seconds']:.0f} s; aggregate "
                  f"{lp.stages.get('aggregate')}; stage confidence {lp.stage_confidence}; by n "
                  f"{lp.stability_by_n}", flush=True)
        t = time.perf_counter()
        hm = attr.head_map(runner, args.emotion, pairs[:args.pairs])
        top = hm.top(5)
        out["heads"] = {"n_pairs": args.pairs, "seconds": time.perf_counter() - t,
                        "requests": args.pairs * runner.info.num_layers * runner.info.num_heads,
                        "significant": int((hm.ci[..., 0] > 0).sum()),
                        "top": [{"layer": l, "head": h, "recovery": float(hm.recovery[l, h]),
                                 "ci95": [float(x) for x in hm.ci[l, h]]} for l, h in top]}
        print(f"heads: {args.pairs} pairs in {out['heads']['seconds']:.0f} s; top {out['heads']['top']}",
              flush=True)
    finally:
        runner.close()
    dest = args.out or os.path.join(RESULTS_DIR, f"analysis_power_{info['tag']}.json")
    with open(dest, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
