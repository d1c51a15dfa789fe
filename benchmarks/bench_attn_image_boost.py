"""Kernel benchmark of VEE inside attention (``attn_image_boost``) against plain attention.

The op recomputes, from a paged KV cache, the attention of the (token, head) pairs whose
request boosts image keys, with the per-image mass in the same pass. Its measured copy
is plain attention over exactly the same queries and keys: torch's
``scaled_dot_product_attention`` on contiguous K/V (what the pairs would cost with no
boost, no paging and no mass). Both run in turn in every timing round (same load).

Cases: decode (R requests x 1 new token, each seeing C keys, the image the first half)
and prefill (1 request x T prompt tokens, causal); every token boosted on every head (the
heaviest case), GQA shapes of real models: 32x128 with 8 KV heads (Qwen3-VL-8B text) and
9x64 with 3 KV heads (SmolLM2-135M). The kernel is checked against the torch reference
on a small case of each kind before timing. The CPU layout of vLLM's cache (keys stored
transposed per block) is used on the CPU, the plain one on a GPU.

    python benchmarks/bench_attn_image_boost.py            # quick set (CPU)
    python benchmarks/bench_attn_image_boost.py --full     # more sizes (GPU)

Rows are appended to benchmarks/results/attn_image_boost.csv; the plot goes to
results/attn_image_boost_<device>.png.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    RESULTS_DIR,
    append_csv,
    device_name,
    pyplot,
    save_figure,
    version_string,
)
from _runner import quantiles, time_ms  # noqa: E402

from emosteer.ops import _dispatch, reference  # noqa: E402

OP = "attn_image_boost"
SHAPES = {"32x128/8": (32, 128, 8), "9x64/3": (9, 64, 3)}
BS = 32
COLUMNS = ("op", "impl", "device", "dtype", "shape", "kind", "tokens", "context", "median_ms",
           "p20_ms", "p80_ms", "sdpa_ms", "ratio_to_sdpa", "threads", "version", "timestamp")


def make_args(kind: str, H: int, D: int, KVH: int, n: int, C: int, dtype, device, cpu_layout: bool):
    """Inputs of one call: ``kind`` "decode" (n rows x 1 token at position C-1) or
    "prefill" (1 row x n tokens, positions C-n .. C-1)."""
    g = torch.Generator().manual_seed(0)
    rows = n if kind == "decode" else 1
    T = n
    MB = math.ceil(C / BS)
    NB = rows * MB
    if cpu_layout:  # vLLM CPU: [NB, KVH, D, BS] keys, [NB, KVH, BS, D] values
        kc = torch.randn(NB, KVH, D, BS, generator=g).to(dtype).permute(0, 3, 1, 2)
        vc = torch.randn(NB, KVH, BS, D, generator=g).to(dtype).permute(0, 2, 1, 3)
    else:
        kc = torch.randn(NB, BS, KVH, D, generator=g).to(dtype)
        vc = torch.randn(NB, BS, KVH, D, generator=g).to(dtype)
    block_table = torch.randperm(NB, generator=g).to(torch.int32).view(rows, MB)
    if kind == "decode":
        token_row = torch.arange(rows, dtype=torch.int32)
        token_pos = torch.full((T,), C - 1, dtype=torch.int32)
    else:
        token_row = torch.zeros(T, dtype=torch.int32)
        token_pos = torch.arange(C - T, C, dtype=torch.int32)
    spans = torch.zeros(rows, 1, 2, dtype=torch.int32)
    spans[:, 0, 1] = C // 2
    out = torch.randn(T, H, D, generator=g).to(dtype)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    args = [out, q, kc, vc, block_table, token_row, token_pos, torch.zeros(T, dtype=torch.int32),
            torch.full((1, H), 2.0), torch.zeros(1, dtype=torch.int32), spans,
            torch.full((T,), -1, dtype=torch.int32), torch.zeros(1, H, 1),
            torch.tensor([D ** -0.5]), torch.ones(1, dtype=torch.int32)]
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def sdpa_fn(args):
    """Plain attention over the same (token, head) pairs and keys, contiguous K/V."""
    out, q, kc, vc, bt, row, pos = args[:7]
    T, H, D = q.shape
    KVH = kc.shape[2]
    rows = bt.shape[0]
    C = int(pos.max()) + 1
    k = kc[bt.long()].reshape(rows, -1, KVH, D)[:, :C].transpose(1, 2).contiguous()  # [R, KVH, C, D]
    v = vc[bt.long()].reshape(rows, -1, KVH, D)[:, :C].transpose(1, 2).contiguous()
    if rows == T:  # decode: one query per row
        qq = q.view(T, H, 1, D)
        mask = None
    else:  # prefill: causal over the row's last T positions
        qq = q.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
        j = torch.arange(C, device=q.device)
        mask = j[None, :] <= pos.long()[:, None]
    kk = k.repeat_interleave(H // KVH, dim=1)
    vv = v.repeat_interleave(H // KVH, dim=1)
    return lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)


def check(impl: str, device, cpu_layout: bool) -> None:
    """The kernel equals the reference on a small decode and a small prefill case."""
    for kind, n, C in (("decode", 3, 70), ("prefill", 9, 40)):
        args = make_args(kind, 6, 32, 2, n, C, torch.float32, device, cpu_layout)
        want = [a.detach().cpu().clone() for a in args]
        reference.attn_image_boost(*want)
        _dispatch.backend_fn(impl, OP)(*args)
        torch.testing.assert_close(args[0].cpu(), want[0], atol=1e-4, rtol=1e-4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu_layout = device.type == "cpu"
    impls = [i for i in _dispatch.available_impls(device, OP) if i not in ("torch",)
             and not (device.type == "cpu" and i == "triton")]
    if not impls:
        print("no compiled implementation of attn_image_boost here (build emosteer._C)")
        return 1
    if a.full:
        decode = [(16, 1024), (64, 2048), (256, 4096)]
        prefill = [(256, 256), (1024, 1024), (2048, 2048)]
    else:
        decode = [(8, 512), (32, 1024)]
        prefill = [(128, 128), (512, 512)]
    rows, dev_name, ver = [], device_name(device), version_string()
    for impl in impls:
        check(impl, device, cpu_layout)
        for dt in a.dtypes:
            dtype = getattr(torch, dt)
            for shape, (H, D, KVH) in SHAPES.items():
                for kind, sizes in (("decode", decode), ("prefill", prefill)):
                    for n, C in sizes:
                        args = make_args(kind, H, D, KVH, n, C, dtype, device, cpu_layout)
                        fn = _dispatch.backend_fn(impl, OP)
                        base = sdpa_fn(args)
                        times = time_ms([lambda: fn(*args), base], device, budget_s=0.5, min_reps=5)
                        med, p20, p80 = quantiles(times[0])
                        sd = quantiles(times[1])[0]
                        rows.append(dict(op=OP, impl=impl, device=dev_name, dtype=dt, shape=shape, kind=kind,
                                         tokens=n, context=C, median_ms=f"{med:.6g}", p20_ms=f"{p20:.6g}",
                                         p80_ms=f"{p80:.6g}", sdpa_ms=f"{sd:.6g}", ratio_to_sdpa=f"{med / sd:.4g}",
                                         threads=torch.get_num_threads(), version=ver,
                                         timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")))
                        print(f"{impl:6s} {dt:8s} {shape:9s} {kind:7s} n={n:<5d} C={C:<5d} "
                              f"{med:9.3f} ms  sdpa {sd:9.3f} ms  x{med / sd:.2f}")
    path = os.path.join(RESULTS_DIR, "attn_image_boost.csv")
    append_csv(rows, path, COLUMNS)
    _plot(rows, os.path.join(RESULTS_DIR, f"attn_image_boost_{device.type}.png"), dev_name)
    print(f"appended {len(rows)} rows to {path}")
    return 0


def _plot(rows, path: str, dev: str) -> None:
    """One panel per (kind, shape): the op's time over plain SDPA's per size, a line per
    (impl, dtype)."""
    plt = pyplot()
    kinds = ["decode", "prefill"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(len(kinds), len(shapes), figsize=(4.4 * len(shapes), 3.0 * len(kinds)),
                             squeeze=False)
    for i, kind in enumerate(kinds):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            sel = [r for r in rows if r["kind"] == kind and r["shape"] == shape]
            for key in dict.fromkeys((r["impl"], r["dtype"]) for r in sel):
                pts = [(f"{r['tokens']}x{r['context']}", float(r["ratio_to_sdpa"]))
                       for r in sel if (r["impl"], r["dtype"]) == key]
                ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=f"{key[0]} {key[1]}")
            ax.axhline(1.0, color="#888", lw=0.8, ls=":")
            ax.set_title(f"{kind}, {shape} (heads x dim / KV heads)", fontsize=8)
            ax.set_xlabel("tokens x context", fontsize=8)
            ax.set_ylabel("time / plain SDPA", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
    fig.suptitle(f"VEE attention (every token and head boosted) vs plain attention: {dev}", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
