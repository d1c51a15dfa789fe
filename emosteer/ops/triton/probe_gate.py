"""Triton kernels for probe-gated steering: a linear probe per slot decides, per token,
whether the slot keeps acting on the token in the later layers.

``probe_gate`` scores each token whose slot has a probe at this layer
(``p = h[t] . probes[prow[s]] + bias[s]``), captures the score where asked, and sets
``token_slot[t] = -1`` where the gate is closed. The gate is open where the score
*holds* (above the slot's threshold, or below it with bit 0 of ``gmode``); with the
latch bit (bit 1) it stays open for the rest of a request once it has held: at an
earlier token of this step, or in an earlier step (``state[state_row[t]] == 1``).

The latch is a running OR over a request's tokens in token order, which one program
per token cannot see, so the launcher runs two kernels over a small int32 scratch
(``T`` codes + ``R`` first-hold indices, allocated and filled per call; no Python
branch on a tensor value, so the launch is CUDA-graph safe):

1. ``_probe_gate_score_kernel``, program t: the score, its capture, and ``code[t]``:
   -1 not gated, 0 closed, 1 open, 2 latched and open only if an earlier token of the
   request held (``first[g] < t``), 3 latched and open (it holds, or ``state[g] != 0``:
   sets ``state[g] = 1``). A latched token that holds also ``atomic_min``-s its index
   into ``first[g]``. It reads ``state`` and ``token_slot`` but writes neither.
2. ``_probe_gate_apply_kernel``, a block of tokens per program: ``token_slot[t] = -1``
   where closed, ``state[g] = 1`` where code 3. It reads only the scratch and writes
   only the outputs, so no program reads what another one writes.

Both kernels read ``flag`` first and do nothing while it is 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from emosteer.ops.triton._launch import LAUNCH_OPTIONS, for_device


@triton.jit
def _probe_gate_score_kernel(
    h_ptr,  # [T, d] contiguous
    slot_ptr,  # [T] int32 (read only here)
    prow_ptr,  # [S] int32, -1 = no gate
    probes_ptr,  # [P, d] float32
    bias_ptr,  # [S] float32
    thresh_ptr,  # [S] float32
    gmode_ptr,  # [S] int32: bit 0 open below, bit 1 latch
    state_row_ptr,  # [T] int32, -1 = no latch state
    state_ptr,  # [R] int32 (read only here)
    score_index_ptr,  # [T] int32, -1 = no capture
    score_ptr,  # [C] float32, mutated
    code_ptr,  # [T] int32 scratch, written
    first_ptr,  # [R] int32 scratch, T on entry, atomic_min-ed
    flag_ptr,  # [1] int32, 0 = do nothing
    d,
    BLOCK: tl.constexpr,
):
    flag = tl.load(flag_ptr)
    if flag != 0:
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t)
        code = slot * 0 - 1  # int32 -1: not gated
        if slot >= 0:
            s = slot.to(tl.int64)
            row = tl.load(prow_ptr + s)
            if row >= 0:
                cols0 = tl.arange(0, BLOCK)
                acc = tl.full([BLOCK], 0.0, tl.float32)
                for start in range(0, d, BLOCK):
                    cols = start + cols0
                    c_ok = cols < d
                    x = tl.load(h_ptr + t * d + cols, mask=c_ok, other=0.0).to(tl.float32)
                    w = tl.load(probes_ptr + row.to(tl.int64) * d + cols, mask=c_ok, other=0.0)
                    acc += x * w
                p = tl.reduce(acc, 0, tl.standard._sum_combine) + tl.load(bias_ptr + s)
                cap = tl.load(score_index_ptr + t)
                if cap >= 0:
                    tl.store(score_ptr + cap, p)
                th = tl.load(thresh_ptr + s)
                gm = tl.load(gmode_ptr + s)
                hold = tl.where((gm & 1) != 0, p < th, p > th)
                code = hold.to(tl.int32)
                g = tl.load(state_row_ptr + t)
                if ((gm & 2) != 0) & (g >= 0):
                    if hold:
                        code = code * 0 + 3
                        tl.atomic_min(first_ptr + g, t.to(tl.int32))
                    else:
                        st = tl.load(state_ptr + g)
                        code = tl.where(st != 0, 3, 2)
        tl.store(code_ptr + t, code)


@triton.jit
def _probe_gate_apply_kernel(
    slot_ptr,  # [T] int32, mutated
    state_row_ptr,  # [T] int32
    state_ptr,  # [R] int32, mutated
    code_ptr,  # [T] int32 scratch from the score kernel
    first_ptr,  # [R] int32 scratch from the score kernel
    flag_ptr,  # [1] int32, 0 = do nothing
    T,
    BLOCK: tl.constexpr,
):
    flag = tl.load(flag_ptr)
    if flag != 0:
        t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = t < T
        code = tl.load(code_ptr + t, mask=ok, other=-1)
        g = tl.load(state_row_ptr + t, mask=ok, other=-1)
        gi = tl.where(g >= 0, g, 0).to(tl.int64)
        first = tl.load(first_ptr + gi, mask=code == 2, other=0)
        closed = (code == 0) | ((code == 2) & (first.to(tl.int64) >= t))
        tl.store(slot_ptr + t, tl.full([BLOCK], -1, tl.int32), mask=closed)
        tl.store(state_ptr + gi, tl.full([BLOCK], 1, tl.int32), mask=code == 3)


def probe_gate(
    h: torch.Tensor,  # [T, d] residual stream the probe reads
    token_slot: torch.Tensor,  # [T] int32, mutated: -1 where the gate is closed
    prow: torch.Tensor,  # [S] int32 probe row per slot, -1 = no gate here
    probes: torch.Tensor,  # [P, d] float32 probe directions
    bias: torch.Tensor,  # [S] float32
    thresh: torch.Tensor,  # [S] float32
    gmode: torch.Tensor,  # [S] int32 bit 0: open below the threshold; bit 1: latch
    state_row: torch.Tensor,  # [T] int32 latch-state row per token, -1 = none
    state: torch.Tensor,  # [R] int32 latch state per request, mutated
    score_index: torch.Tensor,  # [T] int32 row of score_buf, -1 = no capture
    score_buf: torch.Tensor,  # [C] float32, mutated
    flag: torch.Tensor,  # [1] int32, 0 = do nothing
) -> None:
    """Triton launcher with the reference's signature; see ``reference.probe_gate``."""
    assert h.dim() == 2 and h.is_contiguous(), "h must be a contiguous [T, d] tensor"
    T, d = h.shape
    S = prow.shape[0]
    for t in (token_slot, state_row, score_index):
        assert t.dtype == torch.int32 and t.shape == (T,) and t.is_contiguous()
    assert prow.dtype == torch.int32 and prow.dim() == 1 and prow.is_contiguous()
    assert probes.dtype == torch.float32 and probes.dim() == 2 and probes.shape[1] == d
    assert probes.is_contiguous()
    for t in (bias, thresh):
        assert t.dtype == torch.float32 and t.shape == (S,) and t.is_contiguous()
    assert gmode.dtype == torch.int32 and gmode.shape == (S,) and gmode.is_contiguous()
    assert state.dtype == torch.int32 and state.dim() == 1 and state.is_contiguous()
    assert score_buf.dtype == torch.float32 and score_buf.dim() == 1
    assert score_buf.is_contiguous()
    assert flag.dtype == torch.int32 and flag.shape == (1,)
    if T == 0:
        return
    R = state.shape[0]
    # code[T] then first[R]; first starts at T ("no token held").
    scratch = torch.empty(T + max(R, 1), dtype=torch.int32, device=h.device)
    code, first = scratch[:T], scratch[T:]
    first.fill_(T)
    block = min(triton.next_power_of_2(max(d, 1)), 4096)
    for_device(_probe_gate_score_kernel, h.device)[(T,)](
        h, token_slot, prow, probes, bias, thresh, gmode, state_row, state, score_index,
        score_buf, code, first, flag, d, BLOCK=block, **LAUNCH_OPTIONS)
    tb = min(triton.next_power_of_2(T), 1024)
    for_device(_probe_gate_apply_kernel, h.device)[(triton.cdiv(T, tb),)](
        token_slot, state_row, state, code, first, flag, T, BLOCK=tb, **LAUNCH_OPTIONS)
