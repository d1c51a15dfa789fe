"""The demo report: report.md and its plots, written from a results dict.

``write_report(results, out_dir)`` renders what :mod:`emosteer.apps.demo` measured; it never
computes a result itself, so every number in report.md is one the pipeline stored in
``results`` (and in results.json beside it). The package's parts: :mod:`.stats` (the one
bootstrap, ``summarize``), :mod:`.plots` (every plot, also those of one attribution run)
and :mod:`.markdown` (report.md's text).

The results dict (keys the writer reads; missing optional parts are skipped)::

    {"model": {"name", "path", "info": {...ModelInfo}},
     "machine": {"platform", "cpus", "python", "torch", "vllm", "transformers"},
     "backend": "vllm" | "hf", "backend_note": str, "quick": bool,
     "settings": {...}, "timings": {stage: seconds}, "total_seconds": float,
     "emotions": {emo: {
        "extraction": {"n_pairs", "n_kept", "tau", "hit_rate_mean", "mean_norm_ratio"},
        "layer_profile": {"layers", "change" (the profile), "profile_source", "stages",
                          "hit_rate_base", "alpha", "n_prompts", "max_tokens", ...},
        "heads": {"intention": [[...] * H] * L, "source", "confirmed",
                  "top": [{"layer","head","score","recovery"}], "patching": [...]},
        "neurons": {"k", "per_layer": {...}, "top": [...], "gain_check": {...}},
        "steering": {"layers", "n_prompts", "baseline": {...}, "conditions": [{...}],
                     "strengths": [{...}], "selection": {...}, "best": {...}},
        "samples": [{"id", "prompt", "unsteered", "steered", "scale"}]}}}
"""

from __future__ import annotations

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emosteer.report.markdown import render_markdown
from emosteer.report.plots import plot_hallucination, plot_head_map, plot_layer_profile, plot_recovery_maps
from emosteer.report.stats import bootstrap, bootstrap_ci, summarize

__all__ = ["bootstrap", "bootstrap_ci", "summarize", "write_report", "render_markdown",
           "plot_layer_profile", "plot_head_map", "plot_recovery_maps"]


def write_report(results: dict, out_dir: str | Path) -> Path:
    """Write report.md, layer_profile.png, head_map.png, head_maps.png,
    hallucination.png (when the run has the study) and results.json; return report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    emotions = results.get("emotions") or {}
    plot_layer_profile(emotions, out / "layer_profile.png")
    plot_head_map(emotions, out / "head_map.png")
    plot_recovery_maps(results.get("head_maps") or {}, out / "head_maps.png")
    if results.get("hallucination"):
        plot_hallucination(results["hallucination"], out / "hallucination.png")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    path = out / "report.md"
    path.write_text(render_markdown(results), encoding="utf-8")
    return path


def _json_default(o: Any):
    """What json cannot write itself: tensors and arrays as lists, paths as text, sets and
    tuples as lists."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
