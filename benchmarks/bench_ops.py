"""Kernel benchmark of the four core steering ops, every available implementation side
by side, over tokens 1..8192 and the head shapes of real models.

Shapes (heads x head_dim, with the model's hidden size d and MLP width I):
32x128 (Llama-2-7B: d 4096, I 11008), 28x128 (Qwen2-7B: d 3584, I 18944),
9x64 (SmolLM2-135M: d 576, I 1536). head_affine_capture runs on [T, H, D];
residual_steer and probe_gate on [T, d]; neuron_gain on [T, I]. Every token holds one
of 4 slots, each naming its own pool row for every head / its vectors / its mask / its
probe (the heaviest case: no token or head skips), no capture rows but for probe scores
(every token's), the flag on. residual_steer runs two terms per slot, an absolute add
and a clamp (so both passes over the row, the first also reading the other addend x of
h = x + r); probe_gate's gate always holds and latches
(the slots survive the repeated calls), one request per slot. Bytes moved count every
element the op must read or write once: the activations, plus the pool rows and
slot-table entries actually used.

    python benchmarks/bench_ops.py            # CPU: quick set; GPU: full set
    python benchmarks/bench_ops.py --full     # all sizes (slow on a CPU)

Rows are appended to benchmarks/results/ops.csv; the plot of this run goes to
benchmarks/results/ops_<device>.png.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS_DIR, append_csv  # noqa: E402
from _runner import COLUMNS, Case, plot, run_cases  # noqa: E402

from emosteer.ops import _dispatch, reference  # noqa: E402

# label -> (heads, head_dim, hidden d, intermediate I)
SHAPES = {
    "32x128": (32, 128, 4096, 11008),
    "28x128": (28, 128, 3584, 18944),
    "9x64": (9, 64, 576, 1536),
}
FULL_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 8192)
QUICK_TOKENS = (1, 16, 128, 1024)
QUICK_SHAPES = ("9x64", "32x128")
QUICK_DTYPES = ("float32", "bfloat16")
SLOTS = 4
OPS = _dispatch.CORE_OPS  # the attention op has its own benchmark (bench_attn_image_boost.py)


MUTATED = {
    "head_affine_capture": (0, 9),
    "residual_steer": (0,),
    "neuron_gain": (0,),
    "probe_gate": (1, 8, 10),
}


def _slots(tokens: int) -> torch.Tensor:
    return torch.randint(0, SLOTS, (tokens,), generator=torch.Generator().manual_seed(1),
                         dtype=torch.int32)


def make_inputs(op: str, dtype: torch.dtype, shape: str, tokens: int, device: torch.device) -> list:
    """Fresh, seeded inputs of ``op``. Values stay bounded under repeated in-place calls
    (the timing loop does not reset them): |a| < 1 for the head affine, alphas near 0,
    gains near 1. Slot s uses pool row s (P = SLOTS rows)."""
    H, D, d, inter = SHAPES[shape]
    T, S = tokens, SLOTS
    gen = torch.Generator().manual_seed(0)

    def uni(*size, lo=0.0, hi=1.0, dt=dtype):
        return (torch.rand(*size, generator=gen) * (hi - lo) + lo).to(dt).to(device)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(dtype).to(device)

    slot = _slots(T).to(device)
    rows = torch.arange(S, dtype=torch.int32, device=device)
    flag = torch.ones(1, dtype=torch.int32, device=device)
    f32 = torch.float32
    if op == "head_affine_capture":
        return [randn(T, H, D), slot, uni(S, H, lo=0.5, hi=0.9, dt=f32), uni(S, H, hi=0.1, dt=f32),
                torch.zeros(S, H, dtype=f32, device=device), rows[:, None].expand(S, H).contiguous(),
                torch.zeros(T, dtype=torch.int32, device=device), randn(S, H, D),
                torch.full((T,), -1, dtype=torch.int32, device=device),
                torch.zeros(1, H, D, dtype=dtype, device=device), flag]
    if op == "residual_steer":  # term 0 an absolute add of near 0, term 1 a clamp to 0.5
        pool = torch.nn.functional.normalize(torch.randn(2 * S, d, generator=gen), dim=1)
        coef = torch.stack([uni(S, hi=1e-3, dt=f32), torch.full((S,), 0.5, device=device)], 1)
        mode = torch.tensor([[reference.RES_ADD, reference.RES_CLAMP]] * S, dtype=torch.int32,
                            device=device)
        return [randn(T, d), randn(T, d), slot, coef, mode, torch.stack([rows, rows + S], 1),
                pool.to(dtype).to(device), flag]
    if op == "probe_gate":  # always holds (threshold -inf), latched; every score captured
        i32 = dict(dtype=torch.int32, device=device)
        return [randn(T, d), slot, rows, uni(S, d, lo=-0.1, hi=0.1, dt=f32),
                uni(S, dt=f32), torch.full((S,), -float("inf"), device=device),
                torch.full((S,), 2, **i32), slot.clone(), torch.zeros(S, **i32),
                torch.arange(T, **i32), torch.zeros(T, dtype=f32, device=device), flag]
    if op == "neuron_gain":
        return [randn(T, inter), slot, uni(S, lo=1.0005, hi=1.001, dt=f32), rows,
                uni(S, inter, lo=0.5, hi=1.0, dt=f32), flag]
    raise ValueError(f"unknown op {op!r}")


def bytes_moved(op: str, dtype: torch.dtype, shape: str, tokens: int) -> int:
    """Reads + writes one call must make: activations once each, the pool rows and
    slot-table entries used."""
    H, D, d, inter = SHAPES[shape]
    T, es = tokens, torch.empty((), dtype=dtype).element_size()
    used = int(_slots(T).unique().numel())
    idx = 4 * T
    if op == "head_affine_capture":  # z read + written, pool rows, a, b, c, vrow, slot + cap index
        return 2 * T * H * D * es + used * (H * D * es + 16 * H) + 2 * idx
    if op == "residual_steer":  # r read + written, x read, 2 pool rows a slot, coef + mode + urow
        return 3 * T * d * es + used * 2 * (d * es + 12) + idx
    if op == "probe_gate":  # h read, fp32 probe rows, per-slot scalars, slot read + written,
        # state rows and score indices read, scores written, state
        return T * d * es + used * (d * 4 + 16) + 5 * idx + 4 * used
    if op == "neuron_gain":  # m read + written, fp32 mask rows, gamma + nrow
        return 2 * T * inter * es + used * (inter * 4 + 8) + idx
    raise ValueError(f"unknown op {op!r}")


def make_case(op: str, impl: str, dtype: torch.dtype, shape: str, tokens: int,
              device: torch.device) -> Case:
    return Case(
        op=op, impl=impl, dtype=dtype, shape=shape, tokens=tokens,
        fn=_dispatch.backend_fn(impl, op), reference=getattr(reference, op),
        make_args=lambda: make_inputs(op, dtype, shape, tokens, device),
        mutated=MUTATED[op], bytes_moved=bytes_moved(op, dtype, shape, tokens),
    )


def default_impls(device: torch.device) -> list[str]:
    """Every runnable implementation; on the CPU not Triton's interpreter (not a kernel
    one would time)."""
    impls = _dispatch.available_impls(device)
    if device.type != "cuda":
        impls = [i for i in impls if i != "triton"]
    usable = []
    for impl in impls:
        try:
            _dispatch.backend_fn(impl, OPS[0])
        except (ImportError, RuntimeError, AttributeError) as err:
            print(f"skipping impl {impl!r}: {err}", file=sys.stderr)
            continue
        usable.append(impl)
    return usable


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="all sizes (default on a GPU)")
    size.add_argument("--quick", action="store_true", help="reduced set (default on a CPU)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--impls", nargs="+", choices=_dispatch.IMPLS, default=None)
    p.add_argument("--dtypes", nargs="+", choices=("float32", "float16", "bfloat16"), default=None)
    p.add_argument("--tokens", nargs="+", type=int, default=None)
    p.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=None)
    p.add_argument("--csv", default=os.path.join(RESULTS_DIR, "ops.csv"))
    p.add_argument("--plot", default=None, help="plot path (default results/ops_<device>.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and the C++ kernels (default: torch's). On a "
                   "shared, oversubscribed CPU, 1 avoids stalls of waiting thread pools")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    full = args.full or (device.type == "cuda" and not args.quick)
    tokens = args.tokens or (FULL_TOKENS if full else QUICK_TOKENS)
    shapes = args.shapes or (tuple(SHAPES) if full else QUICK_SHAPES)
    dtypes = [getattr(torch, n) for n in (args.dtypes or (
        ("float32", "float16", "bfloat16") if full else QUICK_DTYPES))]
    impls = args.impls or default_impls(device)
    print(f"device {device} impls {impls} dtypes {[str(d) for d in dtypes]} shapes {list(shapes)} "
          f"tokens {list(tokens)} (threads {torch.get_num_threads()})")

    cases = [
        make_case(op, impl, dtype, shape, t, device)
        for op in args.ops for shape in shapes for dtype in dtypes for t in tokens for impl in impls
    ]
    rows = run_cases(cases, device)
    append_csv(rows, args.csv, COLUMNS)
    print(f"appended {len(rows)} rows to {args.csv}")
    if not args.no_plot:
        path = args.plot or os.path.join(RESULTS_DIR, f"ops_{device.type}.png")
        plot(rows, path, f"emosteer ops on {rows[0]['device']}\n{rows[0]['version']}")
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
