"""The one kernel-benchmark runner: each benchmark supplies only its cases (an op, an
implementation, inputs and the bytes the op must move); the runner checks the result
against the torch reference, times it with warm-up and returns one CSV row per case
(appended with ``_common.append_csv``); ``plot`` draws them.

CSV columns (benchmarks/results/*.csv)::

    op,impl,device,dtype,shape,tokens,median_ms,p20_ms,p80_ms,gbps,frac_of_copy,version,timestamp

``gbps`` is the op's bytes moved (counted per op, see the benchmark) over its median
time; ``frac_of_copy`` is the time of a device-to-device copy moving the same number of
bytes over the op's time (1.0 = as fast as a plain copy of that traffic).
"""

from __future__ import annotations

import datetime as _dt
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from _common import device_name, pyplot, save_figure, version_string

COLUMNS = (
    "op", "impl", "device", "dtype", "shape", "tokens", "median_ms", "p20_ms", "p80_ms",
    "gbps", "frac_of_copy", "version", "timestamp",
)
# Tolerances for the pre-timing check: a few ulps of each dtype (as tests/utils.py).
CHECK_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


@dataclass
class Case:
    """One timed call: ``fn(*args)`` mutates some of ``args`` in place.

    ``make_args`` builds fresh inputs (called once for the check, once for timing);
    ``reference`` has the same signature as ``fn``; ``mutated`` are the indices of the
    arguments to compare after the call; ``bytes_moved`` is the honest traffic of one
    call (reads + writes of every byte the op must touch)."""

    op: str
    impl: str
    dtype: torch.dtype
    shape: str
    tokens: int
    fn: Callable[..., None]
    reference: Callable[..., None]
    make_args: Callable[[], list]
    mutated: Sequence[int]
    bytes_moved: int
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_ms(
    fns: Sequence[Callable[[], None]],
    device: torch.device,
    *,
    warmup: int = 5,
    min_reps: int = 20,
    max_reps: int = 200,
    budget_s: float = 0.25,
) -> list[list[float]]:
    """Per-call times in ms of each of ``fns``, called in turn in every round so that
    all of them see the same machine load: ``warmup`` untimed rounds, then rounds until
    ``budget_s`` is spent (between ``min_reps`` and ``max_reps``). CUDA calls are timed
    with events."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    start_all = time.perf_counter()
    while len(times[0]) < max_reps and (
        len(times[0]) < min_reps or time.perf_counter() - start_all < budget_s
    ):
        for fn, out in zip(fns, times):
            out.append(_time_once(fn, device))
    return times


def quantiles(times: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of ``times``."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def copy_fn(n_bytes: int, device: torch.device) -> Callable[[], None]:
    """A device-to-device copy whose traffic is ``n_bytes`` (it reads and writes
    ``n_bytes / 2``): the bandwidth roofline an elementwise op can hope for."""
    half = max(1, n_bytes // 2)
    src = torch.empty(half, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


# ------------------------------------------------------------------ checking
def check(case: Case, device: torch.device) -> None:
    """Raise if ``case.fn`` differs from ``case.reference`` on the same fresh inputs."""
    args = case.make_args()
    want = [a.detach().cpu().clone() if isinstance(a, torch.Tensor) else a for a in args]
    case.reference(*want)
    case.fn(*args)
    _sync(device)
    tol = CHECK_TOL[case.dtype]
    for i in case.mutated:
        got, exp = args[i].detach().cpu().double(), want[i].double()
        ok = torch.isclose(got, exp, equal_nan=True, **tol)
        if not bool(ok.all()):
            bad = (~ok).nonzero()[:3].tolist()
            raise AssertionError(
                f"{case.op}/{case.impl}/{case.dtype}/{case.shape}/T={case.tokens}: argument {i} "
                f"differs from the reference in {int((~ok).sum())} elements, first at {bad}"
            )


# ------------------------------------------------------------------ running
def run_cases(
    cases: Sequence[Case],
    device: torch.device,
    *,
    with_copy: bool = True,
    log: Callable[[str], None] = print,
    timing: dict | None = None,
) -> list[dict]:
    """Check then time every case; returns one CSV row (dict) per case."""
    dev_name, version = device_name(device), version_string()
    rows = []
    for case in cases:
        check(case, device)
        args = case.make_args()
        fns = [lambda: case.fn(*args)]
        if with_copy:
            fns.append(copy_fn(case.bytes_moved, device))
        times = time_ms(fns, device, **(timing or {}))
        med, p20, p80 = quantiles(times[0])
        gbps = case.bytes_moved / (med * 1e-3) / 1e9
        frac = quantiles(times[1])[0] / med if with_copy else float("nan")
        row = dict(
            op=case.op, impl=case.impl, device=dev_name, dtype=str(case.dtype).replace("torch.", ""),
            shape=case.shape, tokens=case.tokens, median_ms=f"{med:.6g}", p20_ms=f"{p20:.6g}",
            p80_ms=f"{p80:.6g}", gbps=f"{gbps:.4g}", frac_of_copy=f"{frac:.4g}",
            version=version, timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        rows.append(row)
        log(
            f"{case.op:26s} {case.impl:6s} {row['dtype']:8s} {case.shape:8s} T={case.tokens:<5d} "
            f"{med:9.4f} ms  {gbps:8.2f} GB/s  copy-frac {frac:.3f}"
        )
        del args
    return rows


def plot(rows: Sequence[dict], path: str, title: str, y: str = "gbps") -> None:
    """One panel per (op, shape): ``y`` against tokens, a line per (impl, dtype)."""
    plt = pyplot()
    ops = list(dict.fromkeys(r["op"] for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(
        len(ops), len(shapes), figsize=(4.2 * len(shapes), 2.8 * len(ops)), squeeze=False,
        sharex=True,
    )
    for i, op in enumerate(ops):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            sel = [r for r in rows if r["op"] == op and r["shape"] == shape]
            for key in dict.fromkeys((r["impl"], r["dtype"]) for r in sel):
                pts = sorted(
                    (int(r["tokens"]), float(r[y])) for r in sel if (r["impl"], r["dtype"]) == key
                )
                ax.plot(*zip(*pts), marker="o", ms=3, label=f"{key[0]} {key[1]}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{op}  [{shape}]", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel({"gbps": "GB/s", "median_ms": "ms"}.get(y, y))
            if i == len(ops) - 1:
                ax.set_xlabel("tokens")
            if sel:
                ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9, wrap=True)
    save_figure(fig, path, dpi=110)
