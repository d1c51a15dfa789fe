"""Helpers shared by the op tests (beside tests/utils.py): the pool-row patterns of the
slot tables, the on/off flag, which implementations must match the torch reference bit
for bit, and probe_gate's request runs and thresholds kept away from the scores.

Bit-exact (every output element, non-NaN results): the C++ CPU twins (both their AVX2
and portable builds), the CUDA kernels and compiled Triton, in every dtype: they all do
the reference's float32 operations in its order, without FMA contraction, and round
once to nearest even. Triton's CPU interpreter is exact in float32 and float16 but not
in bfloat16, whose fp32->bf16 cast it truncates (see ``tests.utils.error_factor``);
there the results are held to the error bound instead.
"""

from __future__ import annotations

import torch

from tests.utils import assert_equal, assert_error_bound, error_factor

# Patterns of a slot -> pool-row table (vrow / urow / nrow):
#   random: rows in [-1, P), with at least one -1 and one row used by several entries
#   shared: every entry names the same row
#   none:   every entry is -1 (no vector / no mask)
ROW_PATTERNS = ("random", "shared", "none")


def row_pattern(kind: str, shape, P: int, gen=None, device="cpu") -> torch.Tensor:
    """int32 table of pool rows of the given shape over a pool of P rows."""
    if kind == "random":
        rows = torch.randint(-1, P, tuple(shape), generator=gen)
        flat = rows.view(-1)
        if flat.numel() >= 1:
            flat[0] = -1
        if flat.numel() >= 3 and P > 0:
            flat[1], flat[2] = P - 1, P - 1
    elif kind == "shared":
        rows = torch.full(tuple(shape), P // 2)
    elif kind == "none":
        rows = torch.full(tuple(shape), -1)
    else:
        raise ValueError(f"unknown row pattern {kind!r}")
    return rows.to(device=device, dtype=torch.int32)


# Patterns of head_affine_capture's per-token pool-row offset (row_off), over a pool
# with MAX_OFF spare rows past the P rows the tables name:
#   zero:    every token reads its slot's own rows
#   random:  offsets in [0, MAX_OFF], at least one 0 and one MAX_OFF
#   aligned: runs of tokens counting 0, 1, 2, ... (a position-aligned patch's listed
#            positions), 0 between the runs
OFF_PATTERNS = ("zero", "random", "aligned")
MAX_OFF = 3


def off_pattern(kind: str, T: int, gen=None, device="cpu") -> torch.Tensor:
    """int32 ``row_off`` of T tokens."""
    if kind == "zero":
        off = torch.zeros(T, dtype=torch.int64)
    elif kind == "random":
        off = torch.randint(0, MAX_OFF + 1, (T,), generator=gen)
        if T >= 2:
            off[0], off[-1] = 0, MAX_OFF
    elif kind == "aligned":
        off = torch.zeros(T, dtype=torch.int64)
        t = 1
        while t < T:
            n = min(MAX_OFF + 1, T - t)
            off[t:t + n] = torch.arange(n)
            t += n + 2
    else:
        raise ValueError(f"unknown offset pattern {kind!r}")
    return off.to(device=device, dtype=torch.int32)


def flag(on: bool = True, device="cpu") -> torch.Tensor:
    """The ops' [1] int32 switch: 1 (on) or 0 (off)."""
    return torch.tensor([1 if on else 0], dtype=torch.int32, device=device)


def bit_exact(impl: str, dtype: torch.dtype, device) -> bool:
    """Whether ``impl`` must equal the reference bit for bit in ``dtype`` on ``device``."""
    interpreted = impl == "triton" and torch.device(device).type != "cuda"
    return not (interpreted and dtype == torch.bfloat16)


def check_result(impl, actual, expected, precise, dtype, name, exact: bool = True) -> None:
    """``actual`` equals the same-dtype reference ``expected`` bit for bit where
    :func:`bit_exact` says so, else is within the error bound of ``precise``.
    ``exact=False``: the op itself promises no bit-exact result here (a sum whose order
    the kernels choose), so always the error bound."""
    if exact and bit_exact(impl, dtype, actual.device):
        assert_equal(actual, expected, f"{name} ({impl} is bit-exact in {dtype})")
    else:
        k = error_factor(impl, dtype, actual.device)
        assert_error_bound(actual, expected, precise, dtype, name, k)


def clone_all(args: dict) -> dict:
    return {k: v.clone() for k, v in args.items()}


# ------------------------------------------------------------------ probe_gate
def request_runs(T: int, R: int, gen=None) -> torch.Tensor:
    """int32 ``state_row`` of T tokens as in a batch: contiguous runs of requests
    0..R-1 in random order (each run non-empty where T allows), the last token of no
    request (-1)."""
    order = torch.randperm(R, generator=gen)
    cuts = torch.linspace(0, max(T - 1, 0), R + 1).long()
    rows = torch.full((T,), -1, dtype=torch.int32)
    for k in range(R):
        rows[cuts[k]:cuts[k + 1]] = int(order[k])
    return rows


def gate_scores64(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For probe_gate's arguments ``args`` (a dict): (gated [T] bool, float64 scores [T],
    sum of |terms| with the bias [T]); the scores of tokens not gated mean nothing."""
    slot, prow = args["token_slot"].cpu(), args["prow"].cpu()
    rows = torch.where(slot >= 0, prow[slot.clamp(min=0).long()], -1)
    terms = args["h"].cpu().double() * args["probes"].cpu().double()[rows.clamp(min=0).long()]
    b = args["bias"].cpu().double()[slot.clamp(min=0).long()]
    return rows >= 0, terms.sum(1) + b, terms.abs().sum(1) + b.abs()


def separate(args, margin: float = 1e-3) -> None:
    """Move each slot's threshold (``args["thresh"]``, in place) until no gated token of
    the slot scores within ``margin`` (relative to the sum of |terms|) of it, so that
    the gate's decisions never hang on the order of a float32 sum."""
    gated, p, mag = gate_scores64(args)
    slot = args["token_slot"].cpu()
    thresh = args["thresh"].cpu().clone()
    for s in range(thresh.shape[0]):
        mine = gated & (slot == s)
        for _ in range(1000):
            near = ((p[mine] - float(thresh[s])).abs() <= margin * (1 + mag[mine])).any()
            if not bool(near):
                break
            thresh[s] += 0.0137 * (1 + float(mag[mine].max()))
    args["thresh"].copy_(thresh.to(args["thresh"].device))
