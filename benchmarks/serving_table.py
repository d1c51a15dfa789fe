"""The README's serving table, rendered from benchmarks/results/serving.csv (the latest
run of each dtype x mode): ``python benchmarks/serving_table.py``; ``--plot PNG`` also
draws those runs in one figure (with bench_serving's plot)."""

from __future__ import annotations

import os
import sys

from _common import RESULTS_DIR, read_csv

CSV = os.path.join(RESULTS_DIR, "serving.csv")
LABELS = {
    "plain": "plain vLLM (plugin excluded, own process)",
    "idle": "plugin loaded, no request steered",
    "shared": "every request the same config",
    "distinct": "every request its own config (residual on a third of the layers + a head add)",
    "distinct_capture": "… plus all heads captured at the last prompt token",
    "distinct_relative": "every request its own relative-strength steer (scale × ‖h‖)",
    "distinct_clamp": "every request its own clamp target along the vector",
    "distinct_gated": "every request its own steer behind a probe gate",
}


def latest_rows(path: str = CSV) -> tuple[list[dict], dict]:
    """The rows of the latest run of each (dtype, mode), and those runs' timestamps."""
    rows = read_csv(path)
    latest: dict[tuple[str, str], str] = {}
    for r in rows:
        k = (r["dtype"], r["mode"])
        latest[k] = max(latest.get(k, ""), r["timestamp"])
    keep = [r for r in rows if latest[(r["dtype"], r["mode"])] == r["timestamp"]]
    return keep, latest


def _interval(r: dict) -> str:
    if not r.get("ratio_ci_low"):
        return "–"
    lo, hi = float(r["ratio_ci_low"]), float(r["ratio_ci_high"])
    ratios = sorted(float(x) for x in r["round_ratios"].split(";"))
    n = len(ratios)
    med = ratios[n // 2] if n % 2 else (ratios[n // 2 - 1] + ratios[n // 2]) / 2
    return f"{med:.3f} [{lo:.3f}, {hi:.3f}] (width {100 * (hi - lo):.1f} points)"


def table(path: str = CSV) -> str:
    rows, latest = latest_rows(path)
    ci = any(r.get("ratio_ci_low") for r in rows)
    out = ["| dtype, mode | condition | tok/s (median) | vs plain (median, min–max over rounds) |"
           + (" median per-round ratio, 95 % interval |" if ci else ""),
           "| --- | --- | --- | --- |" + (" --- |" if ci else "")]
    for (dtype, mode), ts in sorted(latest.items()):
        for r in rows:
            if (r["dtype"], r["mode"], r["timestamp"]) != (dtype, mode, ts):
                continue
            ratio = float(r["ratio_to_plain"])
            spread = f"{float(r['ratio_min']):.3f}–{float(r['ratio_max']):.3f}"
            out.append(f"| {dtype}, {mode} | {LABELS.get(r['condition'], r['condition'])} | "
                       f"{float(r['median_tok_per_s']):.0f} | {ratio:.3f} ({spread}) |"
                       + (f" {_interval(r)} |" if ci else ""))
    first = next(r for r in rows if r["timestamp"] == max(latest.values()))
    bad = int(first.get("disturbed_rounds") or 0)
    rerun = (f" ({bad} more not counted: the hypervisor took over {float(first['max_steal']):.0%} of "
             f"the CPU time in them)" if bad else "")
    out.append("")
    out.append(f"{first['model']}, {first['n_prompts']} prompts × {first['max_tokens']} tokens, "
               f"{first['rounds']} rounds{rerun} interleaved in one pair of engine processes"
               + ("; interval: 95 % bootstrap of the median of the per-round paired ratios, rounds "
                  "resampled whole" if ci else "")
               + f"; {first['machine']} "
               f"{first['cores']} cores ({first['core_setting']}); vLLM {first['vllm']}, torch {first['torch']}.")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
    if len(sys.argv) == 3 and sys.argv[1] == "--plot":
        from bench_serving import plot

        rows, _ = latest_rows()
        r0 = rows[0]
        plot(rows, sys.argv[2], f"{r0['model']} on {r0['machine']} ({r0['cores']} cores): "
             f"{r0['n_prompts']} prompts x {r0['max_tokens']} tokens, {r0['rounds']} rounds + warm-up, "
             f"greedy, prefix cache off; {r0['core_setting']}; vllm {r0['vllm']}")
