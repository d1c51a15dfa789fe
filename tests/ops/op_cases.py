"""Helpers shared by the op tests (beside tests/utils.py): the pool-row patterns of the
slot tables, the on/off flag, and which implementations must match the torch reference
bit for bit.

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


def flag(on: bool = True, device="cpu") -> torch.Tensor:
    """The ops' [1] int32 switch: 1 (on) or 0 (off)."""
    return torch.tensor([1 if on else 0], dtype=torch.int32, device=device)


def bit_exact(impl: str, dtype: torch.dtype, device) -> bool:
    """Whether ``impl`` must equal the reference bit for bit in ``dtype`` on ``device``."""
    interpreted = impl == "triton" and torch.device(device).type != "cuda"
    return not (interpreted and dtype == torch.bfloat16)


def check_result(impl, actual, expected, precise, dtype, name) -> None:
    """``actual`` equals the same-dtype reference ``expected`` bit for bit where
    :func:`bit_exact` says so, else is within the error bound of ``precise``."""
    if bit_exact(impl, dtype, actual.device):
        assert_equal(actual, expected, f"{name} ({impl} is bit-exact in {dtype})")
    else:
        k = error_factor(impl, dtype, actual.device)
        assert_error_bound(actual, expected, precise, dtype, name, k)


def clone_all(args: dict) -> dict:
    return {k: v.clone() for k, v in args.items()}
