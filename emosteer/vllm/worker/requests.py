"""Requests on the worker: compile a request's config, write the slots and pool rows the
scheduler granted (only what changed), fail a request that cannot be applied, park and
hand out its results.

Runs in each worker process, from the model runner's ``_update_states`` (new and
finished requests) and the ``emosteer_rpc`` calls (``fetch``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from emosteer.request import inline as inline_vec
from emosteer.request.bank import VectorBank, head_shard
from emosteer.request.compile import PHASES, compile_request, key_kind, key_rows, materialize
from emosteer.request.spec import MAX_IMAGES, SpecError, SteerSpec
from emosteer.request.step import StepRow
from emosteer.vllm.admission import GRANT_KEY, PLAN_KEY, discard_failures, report_failure
from emosteer.vllm.frontend import CLAIM_KEY, EXTRA_KEY, RESULT_KEY, SAMPLES_KEY, worker_key
from emosteer.vllm.worker.model import image_spans

logger = logging.getLogger("emosteer.vllm")


class RequestState:
    def __init__(self, req_id: str, key: str | None, num_prompt: int):
        self.req_id, self.key, self.num_prompt = req_id, key, num_prompt
        self.spec: SteerSpec | None = None
        self.slots: dict[str, int] = {p: -1 for p in PHASES}
        # Position groups ("last", listed prompt positions): sorted positions, their slots.
        self.pos_positions = np.zeros(0, dtype=np.int64)
        self.pos_slots = np.zeros(0, dtype=np.int32)
        self.pos_offs: np.ndarray | None = None  # their head-pool row offsets (None: all 0)
        self.capture = None
        self.heads: dict[int, dict[int, torch.Tensor]] = {}  # layer -> position -> [Hl, D]
        self.residual: dict[int, dict[int, torch.Tensor]] = {}  # layer -> position -> [d]
        self.attn: dict[int, dict[int, torch.Tensor]] = {}  # layer -> position -> [Hl, NS]
        self.spans: list[tuple[int, int]] = []  # image key spans [start, end) of the prompt
        self.vee = False  # uses the attention op (boost or attn_image capture)
        self.gate_row = -1  # its latch-state row (gate_state) while a latched gate runs
        self.probe: dict[int, dict[int, torch.Tensor]] = {}  # gate layer -> position -> score []
        self.error: str | None = None
        self.fetched = False  # results already handed out (see WorkerSteering.fetch)

    @property
    def active(self) -> bool:
        return (self.slots["prompt"] >= 0 or self.slots["generated"] >= 0 or self.pos_slots.size > 0
                or self.capture is not None)


    def step_row(self) -> StepRow:
        """What the per-step tables need of this request (``emosteer/request/step.py``)."""
        gate = self.spec.when.layer if self.spec is not None and self.spec.when is not None else -1
        return StepRow(self.num_prompt, self.slots["prompt"], self.slots["generated"],
                       self.pos_positions, self.pos_slots,
                       self.capture if self.error is None else None, gate, self.pos_offs)


class RequestsMixin:
    """The request half of ``WorkerSteering`` (state set up in its ``__init__``)."""

    def _new_request(self, req_id: str, cached: Any) -> RequestState:
        params = getattr(cached, "sampling_params", None)
        extra = (getattr(params, "extra_args", None) or {}) if params is not None else {}
        key = extra.get(RESULT_KEY)
        if key is not None:
            key = worker_key(str(key), extra.get(CLAIM_KEY))
        if key is not None and int(extra.get(SAMPLES_KEY, 1)) > 1:
            # One of n samples (vLLM's child request "<index>_<parent id>"): its own key.
            key = f"{key}#{req_id.split('_', 1)[0]}"
        rs = RequestState(req_id, str(key) if key is not None else None, int(cached.num_prompt_tokens))
        rs.spans = image_spans(cached)
        self.reqs[req_id] = rs
        if rs.key is not None:
            self.by_key[rs.key] = req_id
        raw = extra.get(EXTRA_KEY)
        if raw is None:
            return rs
        try:
            plan = extra.get(PLAN_KEY)
            # The vector contents the front end admitted this request with, even if a
            # vector was replaced or removed since (registration is not atomic across
            # processes; versions are).
            bank = self.bank.pinned(plan["bank"]) if plan and "bank" in plan else self.bank
            spec = SteerSpec.parse(raw)
            spec.validate(bank, self.info)
            spec = spec.resolve(self.info)
            bank = inline_vec.overlay(bank, self.info, spec.inline_items())
            self._check_features(spec)
            rs.vee = spec.boost is not None or bool(spec.capture is not None and spec.capture.attn_image)
            if rs.vee and len(rs.spans) > MAX_IMAGES:
                field = "boost" if spec.boost is not None else "capture.attn_image"
                raise SpecError(field, f"the prompt holds {len(rs.spans)} images; VEE and attn_image "
                                f"captures handle up to {MAX_IMAGES} per request")
            prog = compile_request(spec, bank, self.info, rs.num_prompt)
            if spec.when is not None and spec.when.latch:
                if not self.free_gate_rows:
                    raise RuntimeError("no free latch-state row (more running requests than max_num_seqs)")
                rs.gate_row = self.free_gate_rows.pop()
                self.bufs.gate_state[rs.gate_row] = 0
            if spec.intervenes() or spec.capture is not None:
                self._apply_grant(prog, plan, extra.get(GRANT_KEY), rs, bank)
            rs.spec, rs.capture = spec, spec.capture
        except Exception as e:  # contained: this request fails, the engine goes on
            self._fail(rs, f"{type(e).__name__}: {e}")
        return rs

    def _fail(self, rs: RequestState, message: str) -> None:
        """Stop ``rs``: no interventions, and the scheduler finishes it with an error
        (its KV blocks evicted) before any of its tokens reach the client."""
        rs.slots = {p: -1 for p in PHASES}
        rs.pos_positions = np.zeros(0, dtype=np.int64)
        rs.pos_slots = np.zeros(0, dtype=np.int32)
        rs.pos_offs = None
        rs.capture = None
        rs.vee = False
        if rs.error is None:
            rs.error = message
        logger.error("emosteer: request %s is failed (not run without its interventions): %s", rs.req_id, message)
        self.failed_now[rs.req_id] = message
        report_failure(rs.req_id, message)

    def _apply_grant(self, prog, plan, grant, rs: RequestState, bank: VectorBank) -> None:
        """Write the slots and pool rows the scheduler granted (only what changed)."""
        if not plan or not grant:
            raise RuntimeError(
                "the request reached the worker without an emosteer admission grant "
                "(the scheduler patch is not active in this engine)"
            )
        fps = prog.fingerprints()
        plan = plan.get("slots", {})
        if set(plan) != {p for p, f in fps.items() if f is not None}:
            raise RuntimeError(
                "the worker compiled this request to other position groups than the front end "
                f"({sorted(plan)} vs {sorted(p for p, f in fps.items() if f)}); send it again"
            )
        for phase, want in fps.items():
            have = (plan.get(phase) or {}).get("fp")
            if have != want:
                raise RuntimeError(
                    "the worker's vector bank differs from the front end's for this request "
                    "(a vector was registered or replaced while it was queued); send it again"
                )
        rows = grant["rows"]
        for key, row in rows.items():
            kind = key_kind(key)
            n = key_rows(key)  # a run key: n consecutive rows, "<key>#<k>" past the first
            names = [key] + [f"{key}#{k}" for k in range(1, n)]
            if self.row_key[kind][row:row + n] != names:
                vec = materialize(key, bank, self.info, self.tp_size, self.tp_rank)
                pool = self.bufs.pools[kind]
                dst = pool[row:row + n]
                dst.copy_(vec.to(pool.dtype).view_as(dst))
                self.row_key[kind][row:row + n] = names
        for phase, p in prog.phases.items():
            if p is None:
                continue
            slot = int(grant["slots"][phase])
            if self.slot_sig[slot] != _slot_signature(p, rows):
                self._write_slot(slot, p, rows)
            rs.slots[phase] = slot
        at = sorted(prog.positions().items())
        if at:
            rs.pos_positions = np.array([pos for pos, _ in at], dtype=np.int64)
            rs.pos_slots = np.array([rs.slots[name] for _, name in at], dtype=np.int32)
            if prog.row_off:
                rs.pos_offs = np.array([prog.row_off.get(pos, 0) for pos, _ in at], dtype=np.int32)

    def _check_features(self, spec: SteerSpec) -> None:
        want_attn = [f for f, on in (("boost", spec.boost is not None),
                                     ("capture.attn_image", bool(spec.capture and spec.capture.attn_image))) if on]
        if want_attn and not self.features["attention"]:
            raise SpecError(want_attn[0], f"VEE and attention-to-image captures are unavailable in this "
                            f"engine: {self.vee_why or 'the decoder layers hold no vLLM Attention module'}")
        need = {"steer": "residual", "heads": "heads", "neurons": "neurons"}
        for field, feat in need.items():
            if getattr(spec, field) and not self.features[feat]:
                raise SpecError(field, f"this model's architecture does not expose {feat} to emosteer")
        if spec.capture is not None and spec.capture.residual and not self.features["residual"]:
            raise SpecError("capture.residual", "this model's architecture does not expose the residual")

    def _write_slot(self, slot: int, prog, rows: dict[str, int]) -> None:
        """Slot ``slot`` <- the scalars and row ids of ``prog`` (host tables, one copy)."""
        L, Hl = self.shape.num_layers, self.shape.heads
        heads = head_shard(self.info.num_heads, self.tp_size, self.tp_rank)
        a = torch.ones(L, Hl)
        b = torch.zeros(L, Hl)
        hc = torch.zeros(L, Hl)
        vrow = torch.full((L, Hl), -1, dtype=torch.int32)
        K = self.bufs.coef.shape[2]
        coef = torch.zeros(L, K)
        rmode = torch.zeros(L, K, dtype=torch.int32)
        urow = torch.full((L, K), -1, dtype=torch.int32)
        prow = torch.full((L,), -1, dtype=torch.int32)
        gamma = torch.ones(L)
        nrow = torch.full((L,), -1, dtype=torch.int32)
        beta = torch.ones(L, Hl)
        act = np.zeros((5, L), dtype=bool)
        for (layer, head), (ha, hb, hrel, key) in prog.heads.items():
            if head not in heads:
                continue  # another tensor-parallel rank holds this head
            h = head - heads.start
            a[layer, h], b[layer, h], hc[layer, h] = ha, hb, hrel
            if key is not None:
                vrow[layer, h] = rows[key]
            act[0, layer] = True
        for layer, terms in prog.res.items():
            for k, (c, m, key) in enumerate(terms):
                coef[layer, k], rmode[layer, k], urow[layer, k] = c, m, rows[key]
            act[1, layer] = True
        bias = thresh = 0.0
        gmode = 0
        if prog.gate is not None:
            glayer, key, bias, thresh, gmode = prog.gate
            prow[glayer] = rows[key]
            act[4, glayer] = True
        for layer, (g, key) in prog.neu.items():
            gamma[layer], nrow[layer] = g, rows[key]
            act[2, layer] = True
        for layer, per_head in prog.boost.items():
            for head, bval in per_head.items():
                if head in heads:
                    beta[layer, head - heads.start] = bval
                    act[3, layer] = True
        bf = self.bufs
        bf.beta[:, slot] = beta.to(bf.device)
        bf.bmode[slot] = int(prog.boost_mode)
        bf.a[:, slot] = a.to(bf.device)
        bf.b[:, slot] = b.to(bf.device)
        bf.c[:, slot] = hc.to(bf.device)
        bf.vrow[:, slot] = vrow.to(bf.device)
        bf.coef[:, slot] = coef.to(bf.device)
        bf.rmode[:, slot] = rmode.to(bf.device)
        bf.urow[:, slot] = urow.to(bf.device)
        bf.prow[:, slot] = prow.to(bf.device)
        bf.pbias[slot], bf.thresh[slot], bf.gmode[slot] = float(bias), float(thresh), int(gmode)
        bf.gamma[:, slot] = gamma.to(bf.device)
        bf.nrow[:, slot] = nrow.to(bf.device)
        self.slot_layers[slot] = act
        self.slot_sig[slot] = _slot_signature(prog, rows)

    def finish_requests(self, req_ids) -> None:
        """vLLM reported these requests finished or aborted: park their results. (Slots
        and pool rows are the scheduler's: it released them when it freed the request.)"""
        self._resolve_captures()
        for rid in req_ids:
            rs = self.reqs.pop(rid, None)
            self.failed_now.pop(rid, None)
            if rs is None:
                continue
            if rs.gate_row >= 0:
                self.free_gate_rows.append(rs.gate_row)
                rs.gate_row = -1
            if rs.key is not None:
                self.by_key.pop(rs.key, None)
            if rs.fetched:
                continue
            if rs.key is not None and (rs.capture is not None or rs.error is not None):
                self.finished[rs.key] = pack_results(rs)
                self.finished_at[rs.key] = time.monotonic()
                while len(self.finished) > self.settings.keep_captures:
                    old, _ = self.finished.popitem(last=False)
                    self.finished_at.pop(old, None)
                    logger.warning("emosteer: dropped unfetched captures of %s (keep_captures)", old)
        self._expire()

    def _expire(self) -> None:
        """Drop parked results older than ``capture_ttl_s`` (oldest first)."""
        limit = time.monotonic() - self.settings.capture_ttl_s
        while self.finished_at:
            key, t = next(iter(self.finished_at.items()))
            if t > limit:
                break
            del self.finished_at[key]
            self.finished.pop(key, None)
            logger.warning("emosteer: dropped unfetched captures of %s (capture_ttl_s)", key)

    def take_failed(self) -> dict[str, str]:
        out, self.failed_now = self.failed_now, {}
        discard_failures(out)  # delivered with the output instead of the shared table
        return out


def _slot_signature(prog, rows: dict[str, int]) -> tuple:
    """What a written slot holds: the program's fingerprint and the pool row of every
    key it reads (the tables store row ids, not keys)."""
    return (prog.fingerprint, tuple(int(rows[k]) for k in prog.keys()))


def pack_results(rs: RequestState) -> dict:
    """Plain, msgpack-safe result: positions, error and one safetensors blob."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    positions: set[int] = set()
    for kind, store in (("heads", rs.heads), ("residual", rs.residual), ("attn_image", rs.attn),
                        ("probe", rs.probe)):
        for layer, per in store.items():
            ps = sorted(per)
            positions.update(ps)
            t = torch.stack([per[p] for p in ps])
            if kind == "attn_image":  # [P, Hl, NS] -> the request's own images
                t = t[:, :, : len(rs.spans)]
            tensors[f"{kind}.{layer}"] = t.contiguous()
    return {
        "error": rs.error,
        "positions": sorted(positions),
        "tensors": save(tensors) if tensors else b"",
    }
