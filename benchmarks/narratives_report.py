"""The results of bench_narratives.py: how far each method's narratives agree with (a)'s,
(a)'s speed-ups and the targets, one CSV row per method, and the README table and the
plot of a run.
"""

from __future__ import annotations

from typing import Sequence

from _common import pyplot, save_figure

METHODS = ("emosteer_vllm", "hf_hooks", "hf_batched")
LABELS = {
    "emosteer_vllm": "(a) emosteer.LLM on vLLM, all prompts in one generate call",
    "hf_hooks": "(b) transformers generate + forward hooks, one config at a time",
    "hf_batched": "(c) transformers, per-row configs batched (emosteer.hf)",
}
SHORT = {"emosteer_vllm": "(a) emosteer vLLM", "hf_hooks": "(b) HF hooks, 1 at a time",
         "hf_batched": "(c) HF batched (emosteer.hf)"}
TARGETS = {"hf_hooks": 20.0, "hf_batched": 3.0}  # (a)'s tokens/s over that method's
COLUMNS = (
    "method", "prompts", "max_tokens", "seconds", "tokens", "tok_per_s", "speedup_vs_hooks",
    "speedup_vs_batched", "agreement", "load_s", "model", "dtype", "machine", "torch", "vllm",
    "transformers", "timestamp",
    # beyond the list
    "extrapolated", "timed_prompts", "token_agreement", "agreement_prompts", "warmup_s",
    "batch_size", "mode", "threads", "git_commit", "notes",
)


# ------------------------------------------------------------------ comparisons
def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(got: Sequence[Sequence[int]], ref: Sequence[Sequence[int]]) -> tuple[float, float, int]:
    """``(identical, token_agreement, n)`` over the first ``n = min(len)`` narratives:
    the fraction identical token for token, and the fraction of ``ref``'s tokens that come
    before the narrative's first differing token."""
    n = min(len(got), len(ref))
    if n == 0:
        return float("nan"), float("nan"), 0
    same = sum(list(a) == list(b) for a, b in zip(got[:n], ref[:n]))
    total = sum(len(b) for b in ref[:n])
    pref = sum(common_prefix(a, b) for a, b in zip(got[:n], ref[:n]))
    return same / n, (pref / total if total else 1.0), n


def extrapolate(seconds: float, tokens: int, timed: int, total: int) -> tuple[float, int]:
    """A run timed on ``timed`` of ``total`` prompts, scaled linearly per prompt."""
    if timed <= 0:
        raise ValueError("nothing was timed")
    f = total / timed
    return seconds * f, int(round(tokens * f))


def speedups(tps: dict[str, float]) -> dict[str, dict[str, float | str]]:
    """Per method: its tokens/s over hf_hooks' and over hf_batched' ('' when absent)."""
    out = {}
    for m, v in tps.items():
        out[m] = {
            "speedup_vs_hooks": round(v / tps["hf_hooks"], 3) if tps.get("hf_hooks") else "",
            "speedup_vs_batched": round(v / tps["hf_batched"], 3) if tps.get("hf_batched") else "",
        }
    return out


def target_lines(rows: Sequence[dict]) -> list[str]:
    """'(a) over (b): 23.1x (target >= 20x): met' for each target method present."""
    a = next((r for r in rows if r["method"] == "emosteer_vllm"), None)
    lines = []
    if a is None:
        return lines
    for m, want in TARGETS.items():
        key = "speedup_vs_hooks" if m == "hf_hooks" else "speedup_vs_batched"
        if a.get(key) in ("", None):
            continue
        got = float(a[key])
        lines.append(f"(a) over {SHORT[m]}: {got:.1f}x (target >= {want:g}x): "
                     f"{'met' if got >= want else 'NOT met'}")
    return lines


# ------------------------------------------------------------------ rows, table, plot
def build_rows(results: dict[str, dict], args, meta: dict) -> list[dict]:
    """One CSV row per method from the children's results (extrapolating hf_hooks when
    it was timed on fewer prompts)."""
    n, m = args.prompts, args.max_tokens
    ref = results.get("emosteer_vllm", {}).get("token_ids")
    tps, base = {}, {}
    for meth in METHODS:
        res = results.get(meth)
        if res is None:
            continue
        tokens = sum(len(t) for t in res["token_ids"])
        secs = res["seconds"]
        timed = res["timed_prompts"]
        extrap = timed < n
        if extrap:
            secs, tokens_all = extrapolate(secs, tokens, timed, n)
        else:
            tokens_all = tokens
        tps[meth] = tokens / res["seconds"]
        if ref is not None:
            same, tok_agr, k = agreement(res["token_ids"], ref)
        else:
            same, tok_agr, k = "", "", ""
        notes = []
        if tokens != timed * m:
            notes.append(f"{tokens} tokens generated, expected {timed * m}")
        if res.get("impl"):
            notes.append(f"emosteer impl {res['impl']}")
        base[meth] = {
            "method": meth, "prompts": n, "max_tokens": m, "seconds": round(secs, 3),
            "tokens": tokens_all, "tok_per_s": round(tps[meth], 2),
            "agreement": "" if same == "" else round(same, 4),
            "load_s": round(res["load_s"], 2), **meta,
            "extrapolated": extrap, "timed_prompts": timed,
            "token_agreement": "" if tok_agr == "" else round(tok_agr, 4),
            "agreement_prompts": k, "warmup_s": round(res.get("warmup_s", 0.0), 2),
            "batch_size": args.batch_size,
            "mode": ("eager" if args.eager else "compiled") if meth == "emosteer_vllm" else "eager (transformers)",
            "threads": res.get("threads", ""), "notes": "; ".join(notes),
        }
    sp = speedups(tps)
    return [{**row, **sp[meth]} for meth, row in base.items()]


def latest_run(rows: Sequence[dict]) -> list[dict]:
    """The rows of the latest run (the latest timestamp), in METHODS order."""
    if not rows:
        return []
    ts = max(r["timestamp"] for r in rows)
    keep = [r for r in rows if r["timestamp"] == ts]
    return sorted(keep, key=lambda r: METHODS.index(r["method"]) if r["method"] in METHODS else 99)


def _truthy(v) -> bool:
    return str(v).strip().lower() in ("true", "1", "yes")


def table(rows: Sequence[dict]) -> str:
    """The README text of one run: a markdown table, the targets and the settings."""
    out = ["| method | tok/s | seconds | speed-up of (a) | narratives identical to (a) "
           "(tokens before first difference) | load / start s |",
           "| --- | --- | --- | --- | --- | --- |"]
    a = next((r for r in rows if r["method"] == "emosteer_vllm"), None)
    for r in rows:
        m = r["method"]
        if m == "emosteer_vllm":
            sp = "—"
        else:
            key = "speedup_vs_hooks" if m == "hf_hooks" else "speedup_vs_batched"
            sp = f"{float(a[key]):.1f}×" if a is not None and a.get(key) not in ("", None) else ""
        secs = f"{float(r['seconds']):.1f}"
        if _truthy(r.get("extrapolated")):
            secs += f" (extrapolated from {r['timed_prompts']} prompts)"
        agr = "reference" if m == "emosteer_vllm" else (
            f"{float(r['agreement']):.0%} ({float(r['token_agreement']):.1%}) of "
            f"{r['agreement_prompts']}")
        out.append(f"| {LABELS.get(m, m)} | {float(r['tok_per_s']):.1f} | {secs} | {sp} | {agr} | "
                   f"{float(r['load_s']):.1f} |")
    if not rows:
        return "\n".join(out)
    r0 = rows[0]
    out.append("")
    out += [f"- {t}" for t in target_lines(rows)]
    ext = [r for r in rows if _truthy(r.get("extrapolated"))]
    for r in ext:
        out.append(f"- {SHORT.get(r['method'], r['method'])} was timed on its first {r['timed_prompts']} "
                   f"of {r['prompts']} prompts; its seconds and tokens are extrapolated linearly per "
                   "prompt (its tok/s is the measured one).")
    out.append(
        f"\n{r0['model']}, {r0['dtype']}; {r0['prompts']} prompts × {r0['max_tokens']} new tokens, "
        f"greedy, EOS not stopping, every request its own residual-steering config; (a) "
        f"{next((r['mode'] for r in rows if r['method'] == 'emosteer_vllm'), '')} engine, (c) batches "
        f"of {r0['batch_size']}; one run, generation time only (model load / engine start in the "
        f"last column); {r0['machine']}; torch {r0['torch']}, vLLM {r0['vllm']}, transformers "
        f"{r0['transformers']}; {r0['timestamp']}.")
    return "\n".join(out)


def plot(rows: Sequence[dict], path: str, title: str) -> None:
    """Bars of tokens/s per method (log scale), (a)'s speed-ups over (b) and (c) written
    on their bars, the targets as dotted marks."""
    plt = pyplot()
    colors = {"emosteer_vllm": "#55a868", "hf_hooks": "#999999", "hf_batched": "#4c72b0"}
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    names = [SHORT.get(r["method"], r["method"]) for r in rows]
    vals = [float(r["tok_per_s"]) for r in rows]
    bars = ax.bar(names, vals, color=[colors.get(r["method"], "#777") for r in rows], zorder=3)
    a = next((r for r in rows if r["method"] == "emosteer_vllm"), None)
    a_tps = float(a["tok_per_s"]) if a is not None else None
    for b, r in zip(bars, rows):
        m = r["method"]
        txt = f"{float(r['tok_per_s']):.1f} tok/s"
        if m != "emosteer_vllm" and a is not None:
            key = "speedup_vs_hooks" if m == "hf_hooks" else "speedup_vs_batched"
            if a.get(key) not in ("", None):
                txt += f"\n(a) is {float(a[key]):.1f}× faster"
            if m in TARGETS:
                ax.hlines(a_tps / TARGETS[m], b.get_x(), b.get_x() + b.get_width(), colors="k",
                          linestyles=":", linewidth=2, zorder=4,
                          label="(a) ÷ target (bar above = target missed)" if m == "hf_hooks" else None)
        if _truthy(r.get("extrapolated")):
            txt += f"\n(timed on {r['timed_prompts']} prompts)"
        if m != "emosteer_vllm":
            txt += f"\nsame text as (a): {float(r['agreement']):.0%}"
        ax.annotate(txt, (b.get_x() + b.get_width() / 2, b.get_height()), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    if vals:
        marks = [a_tps / TARGETS[r["method"]] for r in rows if a is not None and r["method"] in TARGETS]
        ax.set_ylim(min(vals + marks) / 3, max(vals) * 6)
    ax.set_ylabel("generated tokens / s (log)")
    ax.grid(True, axis="y", which="both", alpha=0.3, zorder=0)
    if any(r["method"] in TARGETS for r in rows) and a is not None:
        ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title, fontsize=8, wrap=True)
    save_figure(fig, path)
