"""Why a CPU worker's memory grows while serving: vLLM's oneDNN matmul primitives.

On the CPU, vLLM runs each unquantized linear layer through a oneDNN matmul handler
(``vllm._custom_ops.create_onednn_mm`` / ``onednn_mm``). oneDNN builds one primitive for
every batch size (rows M) it meets for a weight shape and keeps it in its process-wide
primitive cache, up to ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` entries (1024 by default).
A server sees a new M whenever a step's batch holds a token count it has not held
before, so its worker's memory rises with each new batch size until the cache is full.
The memory is in use (glibc's ``mallinfo2``), not held free, and below Python.

This script measures it without a server: handlers for the default model's linear
shapes (from its ``config.json``), each batch size run once through all of them, the
allocator's bytes in use after each step of new batch sizes, once per cache capacity
(each in its own process: oneDNN reads the variable once). Writes
``results/onednn_cache.csv`` and ``results/onednn_cache_<device>.png``.

    python benchmarks/onednn_cache.py                  # capacities: default, 64
    python benchmarks/onednn_cache.py --capacities default,256,64 --max-m 1500
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _common import RESULTS_DIR, append_csv, git_commit, machine_info, pyplot, read_csv, save_figure  # noqa: E402

COLUMNS = ("run", "capacity", "distinct_m", "primitives", "in_use_mib", "shapes", "model", "machine",
           "cores", "vllm", "git_commit", "timestamp")
STEPS = (8, 16, 32, 64, 128, 192, 256, 320, 384, 512)


def linear_shapes(model: str) -> list[tuple[int, int]]:
    """(in, out) of the decoder's linear layers: qkv, o, gate_up, down."""
    from emosteer.models import resolve_model
    from emosteer.request.bank import ModelInfo

    m = ModelInfo.from_hf_config(json.loads((resolve_model(model) / "config.json").read_text()))
    h, d = m.hidden_size, m.head_dim
    return [(h, (m.num_heads + 2 * m.num_kv_heads) * d), (m.num_heads * d, h),
            (h, 2 * m.intermediate_size), (m.intermediate_size, h)]


def child(model: str, max_m: int) -> list[dict]:
    """In this process: the bytes in use after each step of new batch sizes."""
    import torch
    from vllm import _custom_ops as ops

    from emosteer.vllm.worker.memory import malloc_stats

    if not getattr(ops, "_supports_onednn", False):
        raise SystemExit("this vLLM build has no oneDNN matmul (nothing to measure)")
    torch.manual_seed(0)
    shapes = linear_shapes(model)
    handlers = [(ops.create_onednn_mm(torch.randn(n, k).t(), 32), k) for k, n in shapes]
    base = malloc_stats()["in_use"]
    rows, m = [{"distinct_m": 0, "primitives": 0, "in_use_mib": 0.0}], 1
    for step in (s for s in STEPS if s <= max_m):
        while m <= step:
            for h, k in handlers:
                ops.onednn_mm(h, torch.randn(m, k), None)
            m += 1
        rows.append({"distinct_m": step, "primitives": step * len(handlers),
                     "in_use_mib": round(malloc_stats()["in_use"] - base, 2)})
    return rows


def measure(model: str, capacities: list[str], max_m: int, out_dir: str) -> list[dict]:
    import vllm

    from emosteer.models import resolve_model

    mach = machine_info()
    base = dict(run=dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
                shapes=" ".join(f"{k}x{n}" for k, n in linear_shapes(model)),
                model=resolve_model(model).name, machine=mach["machine"],
                cores=mach["cores"], vllm=vllm.__version__, git_commit=git_commit(),
                timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    out = []
    for cap in capacities:
        env = dict(os.environ)
        env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
        if cap != "default":
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = cap
        proc = subprocess.run([sys.executable, __file__, "--child", "--model", model, "--max-m", str(max_m)],
                              env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"capacity {cap}: the measuring process failed:\n{proc.stderr[-2000:]}")
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
        out += [dict(base, capacity=cap, **r) for r in rows]
        print(f"capacity {cap:>8}: " + ", ".join(f"{r['distinct_m']} M {r['in_use_mib']} MiB" for r in rows),
              flush=True)
    append_csv(out, os.path.join(out_dir, "onednn_cache.csv"), COLUMNS)
    return out


def plot(out_dir: str) -> str:
    rows = read_csv(os.path.join(out_dir, "onednn_cache.csv"))
    run = rows[-1]["run"]
    rows = [r for r in rows if r["run"] == run]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for cap in dict.fromkeys(r["capacity"] for r in rows):
        rs = [r for r in rows if r["capacity"] == cap]
        ax.plot([int(r["distinct_m"]) for r in rs], [float(r["in_use_mib"]) for r in rs], "o-",
                label=f"ONEDNN_PRIMITIVE_CACHE_CAPACITY={cap}")
    r0 = rows[0]
    ax.set(xlabel="distinct batch sizes (rows M) seen",
           ylabel="allocator bytes in use, MiB since start",
           title=f"vLLM CPU oneDNN matmul primitives, {len(r0['shapes'].split())} weight shapes\n"
                 f"{r0['model']}, vLLM {r0['vllm']}, {r0['machine']} ({r0['cores']} cores), {run}")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7)
    path = os.path.join(out_dir, f"onednn_cache_{machine_info()['tag']}.png")
    save_figure(fig, path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--capacities", default="default,64", help="comma-separated; 'default' leaves it unset")
    ap.add_argument("--max-m", type=int, default=512, help="the largest batch size run")
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, args.max_m)))
        return 0
    measure(args.model, [c.strip() for c in args.capacities.split(",") if c.strip()], args.max_m,
            args.out_dir)
    print("plot:", plot(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
