"""Backend selection, argument validation and torch custom-op registration.

The public functions validate their arguments (clear errors naming the argument),
resolve the implementation and call the registered in-place custom op
``torch.ops.emosteer.<op>``. Hot paths that have already validated their buffers once
(the vLLM plugin) call ``torch.ops.emosteer.<op>`` directly.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
from typing import Callable, Optional, Sequence

import torch

from emosteer.ops import reference

IMPLS = ("torch", "triton", "cpp", "cuda")
OPS = (
    "head_affine_capture",
    "residual_steer",
    "neuron_gain",
    "probe_gate",
    "attn_image_boost",
)
# The ops every backend implements; ``available_impls(device)`` without an op answers
# for these. The attention op has a Triton kernel, a C++ CPU kernel and no CUDA C++ one.
CORE_OPS = OPS[:4]
# Module holding each op's Triton launcher (emosteer/ops/triton/<op>.py).
_TRITON_MODULE = {
    "head_affine_capture": "emosteer.ops.triton.head_affine_capture",
    "residual_steer": "emosteer.ops.triton.residual_steer",
    "neuron_gain": "emosteer.ops.triton.neuron_gain",
    "probe_gate": "emosteer.ops.triton.probe_gate",
    "attn_image_boost": "emosteer.ops.triton.attn_image_boost",
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32,)


# --------------------------------------------------------------------------- backends
@functools.lru_cache(maxsize=None)
def _compiled(kind: str):
    """The compiled extension's op namespace (``torch.ops.emosteer_C``) or None.

    ``emosteer._C`` is the prebuilt module where one imports (an in-place or
    ``--no-build-isolation`` build), else compiled on first use (emosteer/ops/_jit.py)."""
    if kind == "cuda" and importlib.util.find_spec("emosteer._C_cuda") is None:
        return None  # (no first-use build of the CPU module for nothing)
    try:
        importlib.import_module("emosteer._C")
    except ImportError:
        from emosteer.ops import _jit

        if _jit.load() is None:
            return None
    try:
        if kind == "cuda":
            importlib.import_module("emosteer._C_cuda")
    except ImportError:
        return None
    ns = torch.ops.emosteer_C
    # A stale build (other schemas than the reference's) counts as not built.
    if not all(_compiled_has(ns, kind, op) for op in CORE_OPS):
        return None
    return ns


def _compiled_has(ns, kind: str, op: str) -> bool:
    """Whether the compiled namespace has ``op`` with the reference's schema and a
    kernel for ``kind``'s device."""
    try:
        names = [a.name for a in getattr(ns, op).default._schema.arguments]
    except (AttributeError, RuntimeError):
        return False
    if names != [_SCHEMA_RENAMES.get(n, n) for n in inspect.signature(getattr(reference, op)).parameters]:
        return False
    key = "CUDA" if kind == "cuda" else "CPU"
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"emosteer_C::{op}", key))


def compiled_has(kind: str, op: str) -> bool:
    """Whether the compiled extension of ``kind`` ("cpp" / "cuda") implements ``op``."""
    ns = _compiled(kind)
    return ns is not None and _compiled_has(ns, kind, op)


def _jit_why() -> Optional[str]:
    from emosteer.ops import _jit

    return _jit.why_unavailable()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available_impls(device: torch.device | str = "cpu", op: Optional[str] = None) -> list[str]:
    """Implementations of ``op`` (None: of every core op) that can run on tensors of
    ``device``, best first."""
    dev = torch.device(device)
    out = []
    has = (lambda kind: _compiled(kind) is not None) if op is None else (lambda kind: compiled_has(kind, op))
    if dev.type == "cuda":
        if has("cuda"):
            out.append("cuda")
        if _triton_ok():
            out.append("triton")
    else:
        if has("cpp"):
            out.append("cpp")
        if _triton_ok() and triton_interpreting():
            out.append("triton")
    out.append("torch")
    return out


# Evaluated once at trace time under torch.compile (it reads the environment and
# imports modules, which Dynamo cannot trace): the choice becomes a graph constant.
@torch.compiler.assume_constant_result
def resolve_impl(impl: Optional[str], device: torch.device | str, op: Optional[str] = None) -> str:
    """Concrete implementation name for ``impl`` (None = best) of ``op`` (None: every
    core op) on ``device``."""
    if impl is None:
        impl = os.environ.get("EMOSTEER_IMPL") or None
    avail = available_impls(device, op)
    if impl is None:
        return avail[0]
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS} (or None for the best available)")
    if impl not in avail:
        why = {
            "cuda": "the CUDA extension emosteer._C_cuda is not built (or stale: rebuild it) or "
            "the tensors are not on a GPU",
            "cpp": "the C++ extension emosteer._C is not built (or stale: rebuild it"
            + (f"; first-use build: {_jit_why()}" if _jit_why() else "")
            + ") or the tensors are not on the CPU",
            "triton": "Triton needs a GPU, or TRITON_INTERPRET=1 set before emosteer is imported",
        }.get(impl, "")
        raise RuntimeError(
            f"impl={impl!r} is not available for device {torch.device(device)}: {why}; "
            f"available: {avail}"
        )
    return impl


@functools.lru_cache(maxsize=None)
def backend_fn(impl: str, op: str) -> Callable[..., None]:
    """The callable implementing ``op`` with ``impl`` (same signature as the reference)."""
    if impl == "torch":
        return getattr(reference, op)
    if impl == "triton":
        return getattr(importlib.import_module(_TRITON_MODULE[op]), op)
    ns = _compiled(impl)
    if ns is None:
        raise RuntimeError(f"compiled implementation {impl!r} is not available")
    return getattr(ns, op)


# ------------------------------------------------------------------- custom-op layer
# Argument names the custom ops' schemas must not use: torch.compile's functionalization
# (auto_functionalized) passes an op's arguments by keyword to implementations whose own
# leading parameters are `mode` / `ctx`, so an argument of that name fails there with
# "got multiple values for argument 'mode'". The schema names such an argument
# `<name>_` (residual_steer's `mode` is `mode_` in torch.ops.emosteer.residual_steer);
# the public wrappers and the vLLM plugin pass every argument positionally.
_SCHEMA_RENAMES = {"mode": "mode_", "ctx": "ctx_"}


def _register(op: str, mutates: Sequence[str]):
    fn_ref = getattr(reference, op)

    def impl_fn(*args):
        *tensors, impl = args
        backend_fn(impl, op)(*tensors)

    # Build a wrapper with the reference's annotated signature + `impl: str`.
    sig = inspect.signature(fn_ref)
    params = [p.replace(name=_SCHEMA_RENAMES.get(p.name, p.name))
              for p in sig.parameters.values()] + [
        inspect.Parameter("impl", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)
    ]
    hints = {p.name: _annotation(p.name, op) for p in params}

    full_sig = inspect.Signature(params)

    def body(*args, **kwargs):
        if kwargs:  # the hot path (the vLLM plugin) passes everything positionally
            args = full_sig.bind(*args, **kwargs).args
        impl_fn(*args)

    body.__signature__ = inspect.Signature(params, return_annotation=None)
    body.__annotations__ = {**hints, "return": None}
    body.__name__ = op
    mutates = tuple(_SCHEMA_RENAMES.get(name, name) for name in mutates)
    custom = torch.library.custom_op(f"emosteer::{op}", mutates_args=mutates)(body)

    def fake(*args, **kwargs):
        return None

    fake.__signature__ = body.__signature__
    custom.register_fake(fake)
    return custom


def _annotation(name: str, op: str):
    if name == "impl":
        return str
    return torch.Tensor


_MUTATES = {
    "head_affine_capture": ("z", "cap_buf"),
    "residual_steer": ("r",),
    "neuron_gain": ("m",),
    "probe_gate": ("token_slot", "state", "score_buf"),
    "attn_image_boost": ("out", "mass_buf"),
}
CUSTOM_OPS = {op: _register(op, _MUTATES[op]) for op in OPS}


def hot_op(op: str, impl: str) -> Callable[..., None]:
    """What a hot path that has validated its buffers once (the vLLM plugin's patched
    forwards, inside the compiled graph) calls for ``op`` with the resolved ``impl``,
    with the reference's arguments and no ``impl``.

    For "cpp" / "cuda" it is the compiled extension's op itself
    (``torch.ops.emosteer_C.<op>.default``: a C++ kernel behind a schema with mutation
    annotations and a Meta kernel), so no Python runs per call; the
    ``torch.ops.emosteer.<op>`` custom op costs a Python body per call (about 70 us on a
    2-core CPU against 2.5 us, 5 ops per layer). Other implementations go through the
    custom op with ``impl`` bound."""
    if impl in ("cpp", "cuda"):
        if not compiled_has(impl, op):
            raise RuntimeError(f"compiled implementation {impl!r} of {op} is not available")
        return getattr(_compiled(impl), op).default
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    custom = getattr(torch.ops.emosteer, op)

    def call(*args):
        custom(*args, impl)

    call.__name__ = f"{op}_{impl}"
    return call


# ------------------------------------------------------------------------ validation
def _check(t, name: str, *, ndim=None, dtypes=None, shape=None, device=None, contiguous=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if shape is not None:
        for i, (want, got) in enumerate(zip(shape, t.shape)):
            if want is not None and want != got:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}; dimension {i} must be {want}"
                )
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (same device as the input)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _can_read_values() -> bool:
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _check_index(idx: torch.Tensor, name: str, upper: int, what: str) -> None:
    if idx.numel() == 0 or not _can_read_values():
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < -1 or hi >= upper:
        raise IndexError(
            f"{name} holds values in [{lo}, {hi}] but must be -1 or in [0, {upper}) ({what})"
        )




def _check_slots(token_slot, n_tokens, n_slots, device):
    _check(token_slot, "token_slot", ndim=1, dtypes=INDEX_DTYPES, shape=(n_tokens,), device=device)
    _check_index(token_slot, "token_slot", n_slots, f"{n_slots} slots")


def _check_offset_rows(token_slot, vrow, row_off, n_rows):
    """Every row a token reads, ``vrow[s, h] + row_off[t]`` (tokens with a slot, heads
    with a row), is a pool row."""
    if token_slot.numel() == 0 or vrow.numel() == 0 or not _can_read_values():
        return
    sel = (token_slot >= 0) & (row_off != 0)
    if not bool(sel.any()):
        return
    rows = vrow[token_slot[sel].long()].long()  # [n, H]
    at = rows + row_off[sel].long().unsqueeze(1)
    bad = (rows >= 0) & ((at < 0) | (at >= n_rows))
    if bool(bad.any()):
        t = int(torch.nonzero(sel)[int(torch.nonzero(bad)[0, 0])])
        raise IndexError(
            f"row_off[{t}] = {int(row_off[t])} takes token {t} past the pool: vrow + row_off must "
            f"lie in [0, {n_rows}) ({n_rows} pool rows) where the token has a slot and the head a row"
        )


def _check_flag(flag, device):
    _check(flag, "flag", ndim=1, dtypes=INDEX_DTYPES, shape=(1,), device=device)


# ----------------------------------------------------------------------- public ops
def head_affine_capture(
    z: torch.Tensor,  # [T, H, D]
    token_slot: torch.Tensor,  # [T] int32
    a: torch.Tensor,  # [S, H] float32
    b: torch.Tensor,  # [S, H] float32
    c: torch.Tensor,  # [S, H] float32 coefficient of |z[t,h]| * v, 0 = none
    vrow: torch.Tensor,  # [S, H] int32 rows of pool, -1 = no vector
    row_off: torch.Tensor,  # [T] int32 added to the token's pool rows
    pool: torch.Tensor,  # [P, H, D] z.dtype
    cap_index: torch.Tensor,  # [T] int32
    cap_buf: torch.Tensor,  # [C, H, D] z.dtype
    flag: torch.Tensor,  # [1] int32, 0 = off
    impl: Optional[str] = None,
) -> None:
    """In place: ``z[t,h] = a[s,h]*z[t,h] + (b[s,h] + c[s,h]*|z[t,h]|)*pool[vrow[s,h] +
    row_off[t], h]``, capturing pre-update rows; nothing at all while ``flag[0] == 0``."""
    _check(z, "z", ndim=3, dtypes=FLOAT_DTYPES)
    T, H, D = z.shape
    dev = z.device
    _check(a, "a", ndim=2, dtypes=(torch.float32,), shape=(None, H), device=dev)
    S = a.shape[0]
    _check(b, "b", ndim=2, dtypes=(torch.float32,), shape=(S, H), device=dev)
    _check(c, "c", ndim=2, dtypes=(torch.float32,), shape=(S, H), device=dev)
    _check(vrow, "vrow", ndim=2, dtypes=INDEX_DTYPES, shape=(S, H), device=dev)
    _check(pool, "pool", ndim=3, dtypes=(z.dtype,), shape=(None, H, D), device=dev)
    P = pool.shape[0]
    _check(cap_buf, "cap_buf", ndim=3, dtypes=(z.dtype,), shape=(None, H, D), device=dev)
    _check(cap_index, "cap_index", ndim=1, dtypes=INDEX_DTYPES, shape=(T,), device=dev)
    _check(row_off, "row_off", ndim=1, dtypes=INDEX_DTYPES, shape=(T,), device=dev)
    _check_flag(flag, dev)
    _check_slots(token_slot, T, S, dev)
    _check_index(cap_index, "cap_index", cap_buf.shape[0], f"{cap_buf.shape[0]} capture rows")
    _check_index(vrow, "vrow", P, f"{P} pool rows")
    _check_offset_rows(token_slot, vrow, row_off, P)
    torch.ops.emosteer.head_affine_capture(
        z, token_slot, a, b, c, vrow, row_off, pool, cap_index, cap_buf, flag, resolve_impl(impl, dev)
    )


def residual_steer(
    r: torch.Tensor,  # [T, d]
    x: torch.Tensor,  # [T, d] r.dtype
    token_slot: torch.Tensor,  # [T] int32
    coef: torch.Tensor,  # [S, K] float32
    mode: torch.Tensor,  # [S, K] int32
    urow: torch.Tensor,  # [S, K] int32 rows of pool, -1 = no term
    pool: torch.Tensor,  # [P, d] r.dtype
    flag: torch.Tensor,  # [1] int32, 0 = off
    impl: Optional[str] = None,
) -> None:
    """In place: add / clamp / project-out terms on the residual ``h = x + r`` of steered
    tokens, written to ``r`` (``r[t] += sum_k w_k * pool[urow[s, k]]``, see
    ``reference.residual_steer``);
    nothing while ``flag[0] == 0``."""
    _check(r, "r", ndim=2, dtypes=FLOAT_DTYPES)
    T, d = r.shape
    dev = r.device
    _check(x, "x", ndim=2, dtypes=(r.dtype,), shape=(T, d), device=dev)
    _check(coef, "coef", ndim=2, dtypes=(torch.float32,), device=dev)
    S, K = coef.shape
    _check(mode, "mode", ndim=2, dtypes=INDEX_DTYPES, shape=(S, K), device=dev)
    _check(urow, "urow", ndim=2, dtypes=INDEX_DTYPES, shape=(S, K), device=dev)
    _check(pool, "pool", ndim=2, dtypes=(r.dtype,), shape=(None, d), device=dev)
    P = pool.shape[0]
    _check_flag(flag, dev)
    _check_slots(token_slot, T, S, dev)
    _check_index(urow, "urow", P, f"{P} pool rows")
    if _can_read_values() and mode.numel():
        base = mode & 3
        if bool(((mode < 0) | (mode > 7) | (base == 3)).any()):
            raise ValueError("mode holds values that are not add (0), clamp (1) or project_out (2), "
                             "plus 4 for a relative scale")
    torch.ops.emosteer.residual_steer(r, x, token_slot, coef, mode, urow, pool, flag,
                                      resolve_impl(impl, dev))


def probe_gate(
    h: torch.Tensor,  # [T, d]
    token_slot: torch.Tensor,  # [T] int32, mutated
    prow: torch.Tensor,  # [S] int32 rows of probes, -1 = no gate
    probes: torch.Tensor,  # [P, d] float32
    bias: torch.Tensor,  # [S] float32
    thresh: torch.Tensor,  # [S] float32
    gmode: torch.Tensor,  # [S] int32
    state_row: torch.Tensor,  # [T] int32
    state: torch.Tensor,  # [R] int32, mutated
    score_index: torch.Tensor,  # [T] int32
    score_buf: torch.Tensor,  # [C] float32, mutated
    flag: torch.Tensor,  # [1] int32, 0 = off
    impl: Optional[str] = None,
) -> None:
    """In place: close the slot of tokens whose probe score fails the gate (``token_slot
    [t] = -1``), latch per request, capture scores; see ``reference.probe_gate``."""
    _check(h, "h", ndim=2, dtypes=FLOAT_DTYPES)
    T, d = h.shape
    dev = h.device
    _check(prow, "prow", ndim=1, dtypes=INDEX_DTYPES, device=dev)
    S = prow.shape[0]
    _check(probes, "probes", ndim=2, dtypes=(torch.float32,), shape=(None, d), device=dev)
    for name, t in (("bias", bias), ("thresh", thresh)):
        _check(t, name, ndim=1, dtypes=(torch.float32,), shape=(S,), device=dev)
    _check(gmode, "gmode", ndim=1, dtypes=INDEX_DTYPES, shape=(S,), device=dev)
    _check(state, "state", ndim=1, dtypes=INDEX_DTYPES, device=dev)
    _check(score_buf, "score_buf", ndim=1, dtypes=(torch.float32,), device=dev)
    for name, t in (("state_row", state_row), ("score_index", score_index)):
        _check(t, name, ndim=1, dtypes=INDEX_DTYPES, shape=(T,), device=dev)
    _check_flag(flag, dev)
    _check_slots(token_slot, T, S, dev)
    _check_index(prow, "prow", probes.shape[0], f"{probes.shape[0]} probe rows")
    _check_index(state_row, "state_row", state.shape[0], f"{state.shape[0]} state rows")
    _check_index(score_index, "score_index", score_buf.shape[0], f"{score_buf.shape[0]} score rows")
    torch.ops.emosteer.probe_gate(h, token_slot, prow, probes, bias, thresh, gmode, state_row, state,
                                  score_index, score_buf, flag, resolve_impl(impl, dev))


def neuron_gain(
    m: torch.Tensor,  # [T, I]
    token_slot: torch.Tensor,  # [T] int32
    gamma: torch.Tensor,  # [S] float32
    nrow: torch.Tensor,  # [S] int32 rows of masks, -1 = no gain
    masks: torch.Tensor,  # [P, I] float32
    flag: torch.Tensor,  # [1] int32, 0 = off
    impl: Optional[str] = None,
) -> None:
    """In place: ``m[t,i] = (1 + (gamma[s]-1)*masks[nrow[s], i]) * m[t,i]``; nothing while
    ``flag[0] == 0``."""
    _check(m, "m", ndim=2, dtypes=FLOAT_DTYPES)
    T, I = m.shape
    dev = m.device
    _check(gamma, "gamma", ndim=1, dtypes=(torch.float32,), device=dev)
    S = gamma.shape[0]
    _check(nrow, "nrow", ndim=1, dtypes=INDEX_DTYPES, shape=(S,), device=dev)
    _check(masks, "masks", ndim=2, dtypes=(torch.float32,), shape=(None, I), device=dev)
    P = masks.shape[0]
    _check_flag(flag, dev)
    _check_slots(token_slot, T, S, dev)
    _check_index(nrow, "nrow", P, f"{P} mask rows")
    torch.ops.emosteer.neuron_gain(m, token_slot, gamma, nrow, masks, flag, resolve_impl(impl, dev))


def attn_image_boost(
    out: torch.Tensor,  # [T, H, D]
    query: torch.Tensor,  # [T, H, D] any strides
    key_cache: torch.Tensor,  # [NB, BS, KVH, D] any strides
    value_cache: torch.Tensor,  # [NB, BS, KVH, D] any strides
    block_table: torch.Tensor,  # [R, MB] int32
    token_row: torch.Tensor,  # [T] int32
    token_pos: torch.Tensor,  # [T] int32
    token_slot: torch.Tensor,  # [T] int32
    beta: torch.Tensor,  # [S, H] float32
    logit_mode: torch.Tensor,  # [S] int32
    spans: torch.Tensor,  # [R, NS, 2] int32
    cap_index: torch.Tensor,  # [T] int32
    mass_buf: torch.Tensor,  # [C, H, NS] float32
    sm_scale: torch.Tensor,  # [1] float32
    flag: torch.Tensor,  # [1] int32, 0 = off
    impl: Optional[str] = None,
) -> None:
    """In place: rewrite ``out[t, h]`` with attention whose image-key weights are
    boosted by ``beta[token_slot[t], h]``, and write the attention mass per image span
    of captured tokens; see ``reference.attn_image_boost``."""
    _check(out, "out", ndim=3, dtypes=FLOAT_DTYPES)
    T, H, D = out.shape
    dev = out.device
    _check(query, "query", ndim=3, dtypes=(out.dtype,), shape=(T, H, D), device=dev, contiguous=False)
    _check(key_cache, "key_cache", ndim=4, dtypes=(out.dtype,), shape=(None, None, None, D),
           device=dev, contiguous=False)
    NB, BS, KVH, _ = key_cache.shape
    _check(value_cache, "value_cache", ndim=4, dtypes=(out.dtype,), shape=(NB, BS, KVH, D),
           device=dev, contiguous=False)
    if KVH == 0 or H % KVH:
        raise ValueError(f"out has {H} heads, which is not a multiple of the cache's {KVH} KV heads")
    _check(block_table, "block_table", ndim=2, dtypes=INDEX_DTYPES, device=dev, contiguous=False)
    R = block_table.shape[0]
    _check(spans, "spans", ndim=3, dtypes=INDEX_DTYPES, shape=(None, None, 2), device=dev)
    if spans.shape[0] < R:
        raise ValueError(f"spans has {spans.shape[0]} rows; the block table has {R}")
    NS = spans.shape[1]
    _check(beta, "beta", ndim=2, dtypes=(torch.float32,), shape=(None, H), device=dev)
    S = beta.shape[0]
    _check(logit_mode, "logit_mode", ndim=1, dtypes=INDEX_DTYPES, shape=(S,), device=dev)
    _check(mass_buf, "mass_buf", ndim=3, dtypes=(torch.float32,), shape=(None, H, NS), device=dev)
    for name, t in (("token_row", token_row), ("token_pos", token_pos), ("cap_index", cap_index)):
        _check(t, name, ndim=1, dtypes=INDEX_DTYPES, shape=(T,), device=dev)
    _check(sm_scale, "sm_scale", ndim=1, dtypes=(torch.float32,), shape=(1,), device=dev)
    _check_flag(flag, dev)
    _check_slots(token_slot, T, S, dev)
    _check_index(token_row, "token_row", R, f"{R} block-table rows")
    _check_index(cap_index, "cap_index", mass_buf.shape[0], f"{mass_buf.shape[0]} capture rows")
    if _can_read_values() and S and not bool((beta > 0).all()):
        raise ValueError("beta must be > 0 everywhere (1 = no boost); got "
                         f"min {float(beta.min())}")
    if _can_read_values() and T:
        rows = token_row >= 0
        if bool(rows.any()):
            pos = token_pos[rows]
            if int(pos.min()) < 0 or int(pos.max()) >= block_table.shape[1] * BS:
                raise IndexError(
                    f"token_pos holds values in [{int(pos.min())}, {int(pos.max())}] but must lie in "
                    f"[0, {block_table.shape[1] * BS}) (block table width x block size)"
                )
    torch.ops.emosteer.attn_image_boost(
        out, query, key_cache, value_cache, block_table, token_row, token_pos, token_slot, beta,
        logit_mode, spans, cap_index, mass_buf, sm_scale, flag, resolve_impl(impl, dev, "attn_image_boost"),
    )
