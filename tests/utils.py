"""Shared test helpers: the one dtype tolerance table, a comparison helper that says
what went wrong, and makers of random non-zero inputs, slot and capture patterns.

Every op test compares a kernel with ``emosteer.ops.reference`` using these, so a
tolerance is changed in one place only.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# One table: absolute / relative tolerance per dtype for results rounded once to the
# dtype (a few ulps; bf16 has 8 mantissa bits, fp16 11, fp32 24).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}

SLOT_PATTERNS = ("none", "one", "random", "sorted", "own")
CAPTURE_PATTERNS = ("none", "last", "random", "all")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------- comparisons
def _describe(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, name: str) -> str:
    idx = bad.nonzero()[:5].tolist()
    pairs = ", ".join(
        f"{tuple(i)}: got {actual[tuple(i)].item()!r} want {expected[tuple(i)].item()!r}"
        for i in idx
    )
    nan_a, nan_e = int(actual.isnan().sum()), int(expected.isnan().sum())
    inf_a, inf_e = int(actual.isinf().sum()), int(expected.isinf().sum())
    return (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements differ "
        f"(shape {tuple(actual.shape)}, {actual.dtype}); first: {pairs}; "
        f"NaN got/want {nan_a}/{nan_e}, Inf got/want {inf_a}/{inf_e}"
    )


def _check_meta(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Bit-for-bit equality (NaN equals NaN of the same bits, -0.0 differs from 0.0)."""
    _check_meta(actual, expected, name)
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.is_floating_point():
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        bad = a.view(ints) != e.view(ints)
    else:
        bad = a != e
    if bool(bad.any()):
        raise AssertionError("exact: " + _describe(a, e, bad, name))


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str
) -> None:
    """Elementwise ``|a - e| <= atol + rtol*|e|`` with ``TOL[dtype]``; NaN must meet NaN."""
    _check_meta(actual, expected, name)
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    tol = TOL[dtype]
    both_nan = a.isnan() & e.isnan()
    same_inf = a.isinf() & (a == e)
    diff = (a - e).abs()
    bad = ~(both_nan | same_inf | (diff <= tol["atol"] + tol["rtol"] * e.abs()))
    if bool(bad.any()):
        raise AssertionError(
            f"tolerance {tol}, max abs diff {diff[~both_nan].max().item():.3g}: "
            + _describe(actual.detach().cpu(), expected.detach().cpu(), bad, name)
        )


def assert_error_bound(
    actual: torch.Tensor,
    same_dtype: torch.Tensor,
    precise: torch.Tensor,
    dtype: torch.dtype,
    name: str,
    factor: float = 2.0,
) -> None:
    """The kernel's error against a precise result is at most ``factor`` (2) times that
    of the torch computation in the same dtype (plus ``TOL[dtype]['atol']`` of slack for
    tiny errors), and the kernel is within the table of the same-dtype result."""
    _check_meta(actual, same_dtype, name)
    if actual.numel() == 0:
        return
    p = precise.detach().cpu().double()
    err_kernel = (actual.detach().cpu().double() - p).abs().max().item()
    err_torch = (same_dtype.detach().cpu().double() - p).abs().max().item()
    bound = factor * err_torch + TOL[dtype]["atol"]
    assert err_kernel <= bound, (
        f"{name}: max error {err_kernel:.3g} vs precise result exceeds {factor}x the same-dtype "
        f"torch error {err_torch:.3g} (+ atol {TOL[dtype]['atol']})"
    )
    assert_close(actual, same_dtype, dtype, name)


def error_factor(impl: str, dtype: torch.dtype, device) -> float:
    """Allowed error ratio kernel / same-dtype torch for ``assert_error_bound``: 2, but 4
    for Triton's CPU interpreter in bf16, whose fp32->bf16 casts truncate instead of
    rounding to nearest (a known interpreter quirk; compiled kernels round), so each
    rounding step can be off by a whole ulp instead of half of one."""
    interpreted = impl == "triton" and torch.device(device).type != "cuda"
    return 4.0 if interpreted and dtype == torch.bfloat16 else 2.0


# ------------------------------------------------------------------------- inputs
def randn_nonzero(*shape: int, dtype=torch.float32, device="cpu", gen=None) -> torch.Tensor:
    """Standard normal values pushed away from zero (|x| >= 0.05) so that a kernel that
    writes zeros, or leaves zeros alone, cannot pass by accident."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float32)
    x = torch.where(x.abs() < 0.05, torch.sign(x + 1e-9) * 0.05 + x, x)
    return x.to(device=device, dtype=dtype)


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    """An output buffer full of NaN: anything the op forgets to write stays visible."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


def slot_pattern(kind: str, T: int, S: int, gen=None, device="cpu") -> torch.Tensor:
    """int32 ``token_slot`` of length T over S slots.

    ``none``: all -1; ``one``: every token slot 0; ``random``: a mix of -1 and slots;
    ``sorted``: contiguous runs per slot as in a batch of requests, e.g.
    ``[-1, -1, 0, 0, 0, 2, 2]``; ``own``: token t uses slot t (needs S >= T).
    """
    if kind == "none":
        s = torch.full((T,), -1)
    elif kind == "one":
        s = torch.zeros(T)
    elif kind == "random":
        s = torch.randint(-1, S, (T,), generator=gen)
        if T >= 2:  # both an untouched and an intervened token, whatever the draw
            s[0], s[1] = -1, S - 1
    elif kind == "sorted":
        cuts = torch.linspace(0, T, S + 2).long()
        s = torch.empty(T, dtype=torch.long)
        for k in range(S + 1):
            s[cuts[k] : cuts[k + 1]] = k - 1
    elif kind == "own":
        assert S >= T, "every token its own slot needs S >= T"
        s = torch.arange(T)
    else:
        raise ValueError(f"unknown slot pattern {kind!r}")
    return s.to(device=device, dtype=torch.int32)


def capture_pattern(kind: str, T: int, C: int, gen=None, device="cpu") -> torch.Tensor:
    """int32 ``cap_index`` of length T into C capture rows (distinct rows).

    ``none``: all -1; ``last``: only the last token, into row C-1; ``random``: a random
    subset of tokens into a random permutation of rows; ``all``: token t into row t
    (needs C >= T).
    """
    c = torch.full((T,), -1, dtype=torch.long)
    if kind == "last":
        c[-1] = C - 1
    elif kind == "random":
        n = min(T, C)
        tokens = torch.randperm(T, generator=gen)[: max(1, n // 2)]
        rows = torch.randperm(C, generator=gen)[: tokens.numel()]
        c[tokens] = rows
    elif kind == "all":
        assert C >= T, "capturing every token needs C >= T"
        c = torch.arange(T)
    elif kind != "none":
        raise ValueError(f"unknown capture pattern {kind!r}")
    return c.to(device=device, dtype=torch.int32)


# --------------------------------------------------------------------- environment
@contextlib.contextmanager
def env(**values: str | None) -> Iterator[None]:
    """Set (or with None, unset) environment variables for the duration of a block."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kernel_impls(device: str = "cpu") -> list[str]:
    """Every non-reference implementation that runs on ``device`` here; on the CPU the
    Triton interpreter is counted in (the op tests run with TRITON_INTERPRET=1)."""
    from emosteer.ops import available_impls

    with env(TRITON_INTERPRET="1" if device == "cpu" else None):
        return [i for i in available_impls(device) if i != "torch"]


def gpu_test(fn):
    """Mark a test as needing a CUDA GPU and skip it cleanly where there is none."""
    import pytest

    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn)
    return pytest.mark.gpu(fn)
