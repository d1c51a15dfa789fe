"""Per step on the worker: the token tables before the forward, the captured rows after.

Runs in each worker process, around every forward of the model runner
(``patches/gpu_model_runner.py``: ``prepare_step`` before ``_model_forward``,
``finish_step`` after it). What each token gets comes from the one builder both backends
share (``emosteer/request/step.py``); this module only knows where vLLM keeps the batch
(``input_batch``, ``query_start_loc``) and how to move the tables to the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from emosteer.request.step import BatchTables, capture_layout, token_positions, token_row_offsets, token_slots
from emosteer.vllm.buffers import FLAG_ATTENTION, FLAG_GATE, FLAG_HEADS, FLAG_RESIDUAL_CAPTURE, NUM_FLAGS
from emosteer.vllm.worker.requests import RequestState

logger = logging.getLogger("emosteer.vllm")

CAPTURE_FLAGS = {"heads": FLAG_HEADS, "residual": FLAG_RESIDUAL_CAPTURE, "attn_image": FLAG_ATTENTION,
                 "probe": FLAG_GATE}


@dataclass
class _Batch:
    """The per-request tables of the batch now running (rebuilt when its requests change)."""

    states: list[RequestState]
    tables: BatchTables
    any_slot: bool
    layer_flags: np.ndarray | None  # [5, L]: some slot of the batch acts at this layer
    spans: np.ndarray | None  # [n, NS, 2] image spans, where some request uses the attention op
    gate_rows: np.ndarray | None  # [n] latch-state row per request, where some request latches


class StepsMixin:
    """The per-step half of ``WorkerSteering`` (state set up in its ``__init__``)."""

    def _batch_tables(self, runner: Any, n: int) -> _Batch:
        """The batch's per-request tables, rebuilt only when its requests changed."""
        ib = runner.input_batch
        key = tuple(ib.req_ids[:n])
        if key == self._batch_key and self._batch is not None:
            return self._batch
        states: list[RequestState] = []
        spans = None
        for i, rid in enumerate(key):
            rs = self.reqs.get(rid)
            if rs is None:
                rs = self._new_request(rid, runner.requests[rid])
            states.append(rs)
            if rs.vee and rs.spans:
                if spans is None:
                    spans = np.zeros((n, self.shape.max_images, 2), dtype=np.int32)
                spans[i, : len(rs.spans)] = rs.spans
        tables = BatchTables.build([rs.step_row() for rs in states])
        used = tables.used_slots()
        any_slot = bool(used.size)
        layer_flags = self.slot_layers[used].any(axis=0) if any_slot else None
        self._batch_key = key
        gate_rows = np.array([rs.gate_row for rs in states], dtype=np.int32)
        self._batch = _Batch(states, tables, any_slot, layer_flags, spans,
                             gate_rows if (gate_rows >= 0).any() else None)
        self._spans_written = False
        return self._batch

    def prepare_step(self, runner: Any) -> None:
        """Fill token_slot, the per-layer flags and capture indices for the batch about
        to run; a batch without steered or capturing requests writes nothing."""
        ib = runner.input_batch
        n = ib.num_reqs
        self._step = None
        batch = self._batch_tables(runner, n)
        t = batch.tables
        if not batch.any_slot and not t.captures:
            return
        qs = runner.query_start_loc.np[: n + 1]
        T = int(qs[n])
        computed = ib.num_computed_tokens_cpu[:n]
        row, pos = token_positions(qs, computed)
        L = self.shape.num_layers
        flags = np.zeros((NUM_FLAGS, L), dtype=np.int32)
        b = self.bufs
        offs = False
        if batch.any_slot:
            self._h2d(b.token_slot[:T], token_slots(t, row, pos, qs))
            off = token_row_offsets(t, pos, qs)
            if off is not None:  # position-aligned patches: each token's row of their run
                self._h2d(b.row_off[:T], off)
                offs = True
            flags[:3] = batch.layer_flags[:3]
            flags[FLAG_ATTENTION] = batch.layer_flags[3]
            flags[FLAG_GATE] = batch.layer_flags[4]
            if batch.gate_rows is not None:
                # A request (re)starting at position 0 (new, or recomputed after a
                # preemption) starts with its latch unset: the gate has not held yet.
                for i in np.nonzero((batch.gate_rows >= 0) & (computed == 0))[0].tolist():
                    b.gate_state[int(batch.gate_rows[i])] = 0
                self._h2d(b.gate_row[:T], batch.gate_rows[row])
        layout = capture_layout(t, pos, qs, computed, L, self.shape.capture_rows)
        for entry in layout.overflow:
            # Only this request's captures are lost; its text and the others' are not.
            rs = batch.states[t.captures[entry][0]]
            rs.error = (
                f"capture overflow: this step would need more than capture_rows="
                f"{self.shape.capture_rows} rows; raise additional_config.emosteer.capture_rows"
            )
            logger.error("emosteer: request %s: %s", rs.req_id, rs.error)
            self._batch_key = None  # its capture is off from now on
            rs.capture = None
        dst = {"heads": b.head_cap, "residual": b.res_cap, "attn_image": b.mass_cap}
        for kind, idx in layout.index.items():
            if idx is None:
                continue
            if kind == "probe":  # one score per token (at its gate's layer); NaN = not scored
                self._h2d(b.score_cap[:T], idx.max(axis=0))
                b.score_buf[: layout.rows["probe"]].fill_(float("nan"))
                continue
            self._h2d(dst[kind][:, :T], idx)
            flags[CAPTURE_FLAGS[kind]] |= (idx >= 0).any(axis=1)
        records = [(batch.states[t.captures[e][0]], kind, layer, p, r)
                   for e, kind, layer, p, r in layout.records]
        attn = bool(flags[FLAG_ATTENTION].any())
        if attn:
            # The attention op reads each token's batch row and position, and the rows'
            # image spans (empty for requests without images or without VEE).
            self._h2d(b.token_row[:T], row.astype(np.int32))
            self._h2d(b.token_pos[:T], pos.astype(np.int32))
            if not self._spans_written:
                b.spans[:n].zero_()
                if batch.spans is not None:
                    self._h2d(b.spans[:n], batch.spans)
                self._spans_written = True
            for site in self.attn_sites:
                site.host_on = bool(flags[FLAG_ATTENTION, site.layer])
        self._h2d(b.flags, flags.reshape(NUM_FLAGS, L, 1))
        self._step = {"T": T, "records": records, "rows": layout.rows, "slots": batch.any_slot,
                      "offs": offs, "attn": attn, "gate": batch.any_slot and batch.gate_rows is not None}

    def abandon_step(self, runner: Any) -> None:
        """After an internal error in ``prepare_step``: the step runs with every flag 0
        and each steered or capturing request of the batch is failed (reported to the
        scheduler, which finishes it with an error): never silently unsteered."""
        self._step = None
        self._batch_key = None
        b = self.bufs
        b.flags.zero_()
        b.token_slot.fill_(-1)
        b.row_off.zero_()
        b.head_cap.fill_(-1)
        b.res_cap.fill_(-1)
        b.mass_cap.fill_(-1)
        b.token_row.fill_(-1)
        b.gate_row.fill_(-1)
        b.score_cap.fill_(-1)
        for site in self.attn_sites:
            site.host_on = False
        ib = runner.input_batch
        for rid in ib.req_ids[: ib.num_reqs]:
            rs = self.reqs.get(rid)
            if rs is not None and rs.active:
                self._fail(rs, "internal emosteer error while preparing a step (see the worker log)")

    def _h2d(self, dst: torch.Tensor, arr: np.ndarray) -> None:
        """Host table -> device buffer. On a GPU through pinned memory, without blocking
        the host (torch's pinned-memory cache keeps the block until the copy is done)."""
        src = torch.from_numpy(np.ascontiguousarray(arr))
        if self.device.type == "cuda":
            dst.copy_(src.pin_memory(), non_blocking=True)
        else:
            dst.copy_(src)

    def _d2h(self, src: torch.Tensor) -> torch.Tensor:
        """Device rows -> a fresh host tensor; on a GPU asynchronous into pinned memory
        (read it only after ``_resolve_captures`` has waited for the copy)."""
        if self.device.type == "cuda":
            out = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            out.copy_(src, non_blocking=True)
            return out
        return src.to("cpu", copy=True)

    def _resolve_captures(self) -> None:
        """Hand the captured rows of earlier steps to their requests (waiting for their
        copies, which were issued right after those steps' forwards)."""
        pending, self._pending = self._pending, []
        for event, got, records in pending:
            if event is not None:
                event.synchronize()
            for rs, kind, layer, positions, rows in records:
                data = got[kind]
                store = {"heads": rs.heads, "residual": rs.residual, "attn_image": rs.attn,
                         "probe": rs.probe}[kind]
                per = store.setdefault(layer, {})
                for p, r in zip(positions.tolist(), rows.tolist()):
                    per[p] = data[r]

    def finish_step(self) -> None:
        """After the forward: start copying captured rows out, put flags and indices
        back. The rows reach their requests at the next step (or at fetch / finish), so
        the next step never waits for the copy."""
        self._resolve_captures()
        step, self._step = self._step, None
        if step is None:
            return
        b, T = self.bufs, step["T"]
        b.flags.zero_()
        got = {}
        if step["rows"]["heads"]:
            got["heads"] = self._d2h(b.head_buf[: step["rows"]["heads"]])
            b.head_cap[:, :T].fill_(-1)
        if step["rows"]["residual"]:
            got["residual"] = self._d2h(b.res_buf[: step["rows"]["residual"], 0])
            b.res_cap[:, :T].fill_(-1)
        if step["rows"]["attn_image"]:
            got["attn_image"] = self._d2h(b.mass_buf[: step["rows"]["attn_image"]])
            b.mass_cap[:, :T].fill_(-1)
        if step["rows"]["probe"]:
            got["probe"] = self._d2h(b.score_buf[: step["rows"]["probe"]])
            b.score_cap[:T].fill_(-1)
        if step["gate"]:
            b.gate_row[:T].fill_(-1)
        if step["attn"]:
            b.token_row[:T].fill_(-1)
            for site in self.attn_sites:
                site.host_on = False
        if step["slots"]:
            b.token_slot[:T].fill_(-1)
        if step["offs"]:
            b.row_off[:T].zero_()
        if step["records"]:
            event = None
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            self._pending.append((event, got, step["records"]))
