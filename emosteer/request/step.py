"""Per-step metadata: the slot and the capture rows of every token of a batch.

Both backends call this one builder (the role of vLLM's ``PunicaWrapper`` for LoRA): the
vLLM worker for the tokens vLLM scheduled in a step (``emosteer/vllm/worker/step.py``),
the transformers backend for its padded batch (``emosteer/hf/steerer.py``). Each knows
which request (batch row) and which position every token has; the builder applies the
position model (``positions.choose`` and ``positions.captured``) to answer:

* ``token_slots``: the slot whose program acts on each token (-1: none). A token at a
  position group ("last" or a listed prompt position) takes its group's slot, other
  prompt tokens the prompt slot, later tokens the generated slot.
* ``token_row_offsets``: the head op's pool-row offset of each token (``row_off``): k
  at the k-th listed position of a position-aligned patch held in one slot (its vectors
  are a run of consecutive pool rows), 0 elsewhere.
* ``capture_layout``: per capture kind ("heads", "residual", "attn_image", "probe": the
  gate's score, at the gate's layer) a
  ``[num_layers, T]`` table of capture-buffer rows (-1: not captured), and the records
  that say which request, layer and positions each run of rows belongs to.

Running example: two requests, A with prompt slot 0 and a "last" group (slot 2) on a
3-token prompt, B plain; a prefill step holding A's 3 tokens then B's 2::

    rows  = [StepRow(3, 0, -1, [2], [2]), StepRow(2)]
    token_positions([0, 3, 5], [0, 0])  ->  row [0 0 0 1 1], pos [0 1 2 0 1]
    token_slots(...)                    ->  [0 0 2 -1 -1]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from emosteer.request import positions as pos_model
from emosteer.request.spec import CaptureItem

CAPTURE_KINDS = ("heads", "residual", "attn_image", "probe")

__all__ = ["CAPTURE_KINDS", "StepRow", "BatchTables", "CaptureLayout", "token_positions",
           "token_slots", "token_row_offsets", "capture_layout"]


@dataclass
class StepRow:
    """One request of the batch as the step tables see it."""

    num_prompt: int
    prompt_slot: int = -1
    generated_slot: int = -1
    group_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # sorted
    group_slot: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    capture: CaptureItem | None = None
    gate_layer: int = -1  # the layer of the request's probe gate (its score capture), -1 none
    group_off: np.ndarray | None = None  # per group position: head-pool row offset (None: all 0)


@dataclass
class BatchTables:
    """Per-batch arrays; a backend keeps them while the batch's requests stay the same."""

    num_prompt: np.ndarray  # [n] int64
    prompt_slot: np.ndarray  # [n] int32
    generated_slot: np.ndarray  # [n] int32
    groups: list[tuple[int, np.ndarray, np.ndarray]]  # (row, group positions, their slots)
    captures: list[tuple[int, CaptureItem]]  # (row, capture) of the capturing rows
    capture_last: np.ndarray  # per capture: the one position it records, -1 if more
    capture_gate: np.ndarray  # per capture: the layer of its gate (probe scores), -1 none
    offsets: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)
    # (row, group positions, their head-pool row offsets) of the rows with a non-zero one

    @classmethod
    def build(cls, rows: Sequence[StepRow]) -> "BatchTables":
        n = len(rows)
        npr = np.fromiter((r.num_prompt for r in rows), dtype=np.int64, count=n)
        ps = np.fromiter((r.prompt_slot for r in rows), dtype=np.int32, count=n)
        gs = np.fromiter((r.generated_slot for r in rows), dtype=np.int32, count=n)
        groups = [(i, r.group_pos, r.group_slot) for i, r in enumerate(rows) if r.group_slot.size]
        caps = [(i, r.capture) for i, r in enumerate(rows) if r.capture is not None]
        last = np.array([pos_model.capture_only_at(c.positions, rows[i].num_prompt) for i, c in caps],
                        dtype=np.int64)
        gate = np.array([rows[i].gate_layer for i, _ in caps], dtype=np.int64)
        offs = [(i, r.group_pos, np.asarray(r.group_off, dtype=np.int32)) for i, r in enumerate(rows)
                if r.group_off is not None and np.any(r.group_off)]
        return cls(npr, ps, gs, groups, caps, last, gate, offs)

    def used_slots(self) -> np.ndarray:
        """Every slot some token of the batch can take (sorted, unique)."""
        parts = [self.prompt_slot, self.generated_slot, *(s for _, _, s in self.groups)]
        allv = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return np.unique(allv[allv >= 0])


def token_positions(query_start: np.ndarray, computed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batch row and position of each token of a step in which request i holds the tokens
    ``[query_start[i], query_start[i+1])``, the first of them at position ``computed[i]``."""
    n = len(query_start) - 1
    counts = np.diff(query_start).astype(np.int64)
    row = np.repeat(np.arange(n), counts)
    pos = np.asarray(computed, dtype=np.int64)[row] + (np.arange(int(query_start[n])) - query_start[:-1][row])
    return row, pos


def token_slots(t: BatchTables, row: np.ndarray, pos: np.ndarray, query_start: np.ndarray,
                valid: np.ndarray | None = None) -> np.ndarray:
    """int32 ``[T]``: the slot acting on each token (-1 none; also where ``valid`` is
    False, e.g. padding)."""
    slot = pos_model.choose(pos, t.num_prompt[row], t.prompt_slot[row], t.generated_slot[row])
    for i, gpos, gslot in t.groups:
        lo, hi = int(query_start[i]), int(query_start[i + 1])
        slot[lo:hi] = pos_model.choose(pos[lo:hi], t.num_prompt[i], t.prompt_slot[i],
                                       t.generated_slot[i], gpos, gslot)
    if valid is not None:
        slot = np.where(valid, slot, -1)
    return slot.astype(np.int32)


def token_row_offsets(t: BatchTables, pos: np.ndarray, query_start: np.ndarray) -> np.ndarray | None:
    """int32 ``[T]``: the head op's pool-row offset of each token (``row_off``), or None
    when every token's is 0 (no request of the batch reads a run of rows)."""
    if not t.offsets:
        return None
    out = np.zeros(int(query_start[-1]), dtype=np.int32)
    zero = np.int32(0)
    for i, gpos, goff in t.offsets:
        lo, hi = int(query_start[i]), int(query_start[i + 1])
        out[lo:hi] = pos_model.choose(pos[lo:hi], t.num_prompt[i], zero, zero, gpos, goff)
    return out


@dataclass
class CaptureLayout:
    """Where each captured (token, layer) goes in its kind's capture buffer."""

    index: dict[str, np.ndarray | None]  # kind -> [L, T] int32 buffer row, -1 = not captured
    rows: dict[str, int]  # kind -> rows used this step
    # (capture entry of BatchTables.captures, kind, layer, positions, buffer rows)
    records: list[tuple[int, str, int, np.ndarray, np.ndarray]]
    overflow: list[int]  # capture entries that would not fit in ``capacity`` rows

    def layer_tokens(self, kind: str, layer: int) -> np.ndarray | None:
        """bool ``[T]``: the tokens captured at ``layer`` (None: none). In token order
        their rows ascend, which is how a backend with one buffer per layer (the
        transformers backend) maps records to its rows (``local_rows``)."""
        idx = self.index[kind]
        if idx is None or not (idx[layer] >= 0).any():
            return None
        return idx[layer] >= 0

    def local_rows(self, kind: str, layer: int, rows: np.ndarray) -> np.ndarray:
        """Rows of a record at ``layer`` counted among that layer's captured tokens."""
        got = self.index[kind][layer]
        return np.searchsorted(np.sort(got[got >= 0]), rows)


def capture_layout(t: BatchTables, pos: np.ndarray, query_start: np.ndarray, computed: np.ndarray,
                   num_layers: int, capacity: int | None = None,
                   valid: np.ndarray | None = None) -> CaptureLayout:
    """Capture rows for this step. Each kind's buffer is filled layer after layer, request
    after request; a request whose rows would pass ``capacity`` is listed in
    ``overflow`` and captures nothing in this step (the others are unaffected).
    ``computed[i]`` is the first position request i holds in this step: a "last"
    capture has work only in the step holding its last prompt token, and the others are
    skipped without looking at their tokens (decode steps of a big batch)."""
    out = CaptureLayout({k: None for k in CAPTURE_KINDS}, {k: 0 for k in CAPTURE_KINDS}, [], [])
    if not t.captures:
        return out
    T = int(query_start[-1])
    ci = np.array([i for i, _ in t.captures], dtype=np.int64)
    start = np.asarray(computed, dtype=np.int64)[ci]
    counts = (query_start[ci + 1] - query_start[ci]).astype(np.int64)
    last = t.capture_last
    keep = (last < 0) | ((start <= last) & (last < start + counts))
    for entry in np.nonzero(keep)[0].tolist():
        i, cap = t.captures[entry]
        lo, hi = int(query_start[i]), int(query_start[i + 1])
        rpos = pos[lo:hi]
        want = pos_model.captured(cap.positions, rpos, t.num_prompt[i])
        if valid is not None:
            want &= valid[lo:hi]
        idx = np.nonzero(want)[0]
        if idx.size == 0:
            continue
        gate = int(t.capture_gate[entry])
        sel = {"heads": cap.heads, "residual": cap.residual, "attn_image": cap.attn_image,
               "probe": (gate,) if cap.probe and gate >= 0 else None}
        need = idx.size * max(len(v or ()) for v in sel.values())
        if capacity is not None and max(out.rows.values()) + need > capacity:
            out.overflow.append(entry)
            continue
        for kind in CAPTURE_KINDS:
            for layer in sel[kind] or ():
                if out.index[kind] is None:
                    out.index[kind] = np.full((num_layers, T), -1, dtype=np.int32)
                r0 = out.rows[kind]
                r = np.arange(r0, r0 + idx.size, dtype=np.int32)
                out.index[kind][layer, lo + idx] = r
                out.rows[kind] = r0 + idx.size
                out.records.append((entry, kind, layer, rpos[idx], r))
    return out
