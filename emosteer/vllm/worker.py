"""The worker side of the plugin: buffers on the model, slots, per-step metadata, captures.

One ``WorkerSteering`` lives on each model runner (``runner._emosteer``). At load time
it finds the decoder layers, allocates ``SteerBuffers`` and installs a *site* on every
patched module. Each step, before the forward, it reads the runner's batch (request
order, per-request token ranges and positions) and writes ``token_slot`` and the capture
indices; after the forward it copies captured rows out and resets the indices to -1.
Requests take slots when first seen and give them back when vLLM reports them finished.
Errors in one request's config are contained: that request is recorded as failed (the
offline API raises) and runs without interventions; the engine and the other requests
go on.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from emosteer.bank import ModelInfo, VectorBank
from emosteer.slots import SlotTable
from emosteer.spec import SteerSpec
from emosteer.vllm.buffers import ActSite, AttnSite, NormSite, Shape, SteerBuffers
from emosteer.vllm.config import settings_from_vllm_config
from emosteer.vllm.frontend import EXTRA_KEY, RESULT_KEY
from emosteer.vllm.tables import PHASES, phase_fingerprints, phase_spec, slot_tables

logger = logging.getLogger("emosteer.vllm")



class RequestState:
    def __init__(self, req_id: str, key: str | None, num_prompt: int):
        self.req_id, self.key, self.num_prompt = req_id, key, num_prompt
        self.spec: SteerSpec | None = None
        self.fps: dict[str, str | None] = {p: None for p in PHASES}
        self.slots: dict[str, int] = {p: -1 for p in PHASES}
        self.capture = None
        self.heads: dict[int, dict[int, torch.Tensor]] = {}  # layer -> position -> [Hl, D]
        self.residual: dict[int, dict[int, torch.Tensor]] = {}  # layer -> position -> [d]
        self.error: str | None = None
        self.fetched = False  # results already handed out (see WorkerSteering.fetch)

    @property
    def active(self) -> bool:
        return self.slots["prompt"] >= 0 or self.slots["generated"] >= 0 or self.capture is not None


def find_decoder(model: torch.nn.Module, num_layers: int):
    """(layers ModuleList, its parent) of the text decoder: a ``*.layers`` list of
    ``num_layers`` blocks holding vLLM ``Attention`` modules."""
    from vllm.model_executor.layers.attention.attention import Attention

    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or name.split(".")[-1] != "layers":
            continue
        if len(mod) != num_layers:
            continue
        if any(isinstance(m, Attention) for blk in mod for m in blk.modules()):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            return mod, parent
    raise RuntimeError(f"emosteer: found no decoder layer list of {num_layers} layers in {type(model).__name__}")


class WorkerSteering:
    def __init__(self, runner: Any):
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.activation import SiluAndMul
        from vllm.model_executor.layers.attention.attention import Attention
        from vllm.model_executor.layers.layernorm import RMSNorm

        import emosteer.ops  # noqa: F401  registers torch.ops.emosteer.* before any compile

        vcfg = runner.vllm_config
        self.settings = settings_from_vllm_config(vcfg)
        self.info = ModelInfo.from_hf_config(runner.model_config.hf_config)
        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.device = torch.device(runner.device)
        self.impl = _pick_impl(self.settings.impl, self.device)
        self.bank = VectorBank(self.info)
        if self.settings.bank:
            self.register_bank(VectorBank.load(self.settings.bank))

        L = self.info.num_layers
        layers, parent = find_decoder(runner.get_model(), L)
        attns, norms, acts = {}, {}, {}
        for i, blk in enumerate(layers):
            found = [m for m in blk.modules() if isinstance(m, Attention)]
            if found:
                attns[i] = found[0]
            mlp = getattr(blk, "mlp", None)
            act = [m for m in mlp.modules() if isinstance(m, SiluAndMul)] if mlp is not None else []
            if act:
                acts[i] = act[0]
            nxt = layers[i + 1] if i + 1 < L else None
            norm = getattr(nxt, "input_layernorm", None) if nxt is not None else getattr(parent, "norm", None)
            if isinstance(norm, RMSNorm):
                norms[i] = norm
        if not attns:
            raise RuntimeError("emosteer: the decoder layers hold no vLLM Attention module")
        attn0 = next(iter(attns.values()))
        heads_local = attn0.num_heads
        if heads_local * self.tp_size != self.info.num_heads or attn0.head_size_v != self.info.head_dim:
            raise RuntimeError(
                f"emosteer: attention has {heads_local} heads x {attn0.head_size_v} on this rank "
                f"(tp={self.tp_size}); the config says {self.info.num_heads} x {self.info.head_dim}"
            )
        # Features this architecture supports (all layers patched, or the feature is off).
        self.features = {
            "heads": len(attns) == L,
            "residual": len(norms) == L,
            "neurons": len(acts) == L and self.info.intermediate_size % self.tp_size == 0,
        }
        self.shape = Shape(
            num_layers=L,
            max_slots=self.settings.max_slots,
            heads=heads_local,
            head_dim=self.info.head_dim,
            hidden=self.info.hidden_size,
            neurons=self.info.intermediate_size // self.tp_size,
            max_tokens=int(runner.max_num_tokens),
            capture_rows=self.settings.capture_rows,
        )
        self.bufs = SteerBuffers(self.shape, runner.model_config.dtype, self.device)
        for i, m in attns.items():
            m._emosteer_site = AttnSite(self.bufs, i, self.impl)
        if self.features["residual"]:
            for i, m in norms.items():
                m._emosteer_site = NormSite(self.bufs, i, self.impl)
        if self.features["neurons"]:
            for i, m in acts.items():
                m._emosteer_site = ActSite(self.bufs, i, self.impl)
        self.slots = SlotTable(self.settings.max_slots)
        self.reqs: dict[str, RequestState] = {}
        self.by_key: dict[str, str] = {}  # result key -> live request id
        self.finished: OrderedDict[str, dict] = OrderedDict()
        self._step: dict | None = None
        logger.info(
            "emosteer: %d layers, %d slots, %d capture rows, impl=%s, features=%s, %.1f MiB of buffers",
            L, self.settings.max_slots, self.settings.capture_rows, self.impl,
            [k for k, v in self.features.items() if v], self.bufs.nbytes() / 2**20,
        )

    # -- bank ------------------------------------------------------------------------
    def register_bank(self, bank: VectorBank) -> list[str]:
        bank.validate_against(self.info)
        self.bank.update(bank)
        return bank.names()

    def register_bank_bytes(self, data: bytes) -> list[str]:
        fd, path = tempfile.mkstemp(suffix=".safetensors")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return self.register_bank(VectorBank.load(path))
        finally:
            os.unlink(path)

    # -- requests --------------------------------------------------------------------
    def _new_request(self, req_id: str, cached: Any) -> RequestState:
        params = getattr(cached, "sampling_params", None)
        extra = (getattr(params, "extra_args", None) or {}) if params is not None else {}
        key = extra.get(RESULT_KEY)
        rs = RequestState(req_id, str(key) if key is not None else None, int(cached.num_prompt_tokens))
        self.reqs[req_id] = rs
        if rs.key is not None:
            self.by_key[rs.key] = req_id
        raw = extra.get(EXTRA_KEY)
        if raw is None:
            return rs
        try:
            spec = SteerSpec.parse(raw)
            spec.validate(self.bank, self.info)
            spec = spec.resolve(self.info)
            self._check_features(spec)
            fps = phase_fingerprints(spec, self.bank)
            for phase in PHASES:
                fp = fps[phase]
                if fp is None:
                    continue
                slot, new = self.slots.acquire_new(fp)
                rs.fps[phase], rs.slots[phase] = fp, slot
                if new:
                    self._write_slot(slot, phase_spec(spec, phase))
            rs.spec, rs.capture = spec, spec.capture
        except Exception as e:  # contained: this request fails, the engine goes on
            self._release_slots(rs)
            rs.error = f"{type(e).__name__}: {e}"
            logger.error("emosteer: request %s runs WITHOUT interventions: %s", req_id, rs.error)
        return rs

    def _check_features(self, spec: SteerSpec) -> None:
        from emosteer.spec import SpecError

        if spec.boost is not None:
            raise SpecError("boost", "attention boost (VEE) is not executed by the vLLM plugin yet")
        need = {"steer": "residual", "heads": "heads", "neurons": "neurons"}
        for field, feat in need.items():
            if getattr(spec, field) and not self.features[feat]:
                raise SpecError(field, f"this model's architecture does not expose {feat} to emosteer")
        if spec.capture is not None and spec.capture.residual and not self.features["residual"]:
            raise SpecError("capture.residual", "this model's architecture does not expose the residual")

    def _write_slot(self, slot: int, spec: SteerSpec) -> None:
        rows = slot_tables(spec, self.bank, self.info, self.tp_size, self.tp_rank)
        b = self.bufs
        b.a[:, slot] = rows.a.to(b.device)
        b.b[:, slot] = rows.b.to(b.device)
        b.v[:, slot] = rows.v.to(b.device, b.dtype)
        b.alpha[:, slot] = rows.alpha.to(b.device)
        b.u[:, slot] = rows.u.to(b.device, b.dtype)
        b.g[:, slot] = rows.g.to(b.device)

    def _release_slots(self, rs: RequestState) -> None:
        for phase in PHASES:
            fp = rs.fps[phase]
            if fp is not None:
                if self.slots.release(fp):
                    self.bufs.reset_slot(rs.slots[phase])
                rs.fps[phase], rs.slots[phase] = None, -1

    def finish_requests(self, req_ids) -> None:
        """vLLM reported these requests finished or aborted: free slots, park results."""
        for rid in req_ids:
            rs = self.reqs.pop(rid, None)
            if rs is None:
                continue
            self._release_slots(rs)
            if rs.key is not None:
                self.by_key.pop(rs.key, None)
            if rs.fetched:
                continue
            if rs.key is not None and (rs.capture is not None or rs.error is not None):
                self.finished[rs.key] = _pack(rs)
                while len(self.finished) > self.settings.keep_captures:
                    old, _ = self.finished.popitem(last=False)
                    logger.warning("emosteer: dropped unfetched captures of %s (keep_captures)", old)

    # -- per step --------------------------------------------------------------------
    def prepare_step(self, runner: Any) -> None:
        """Fill token_slot / capture indices for the batch about to run."""
        ib = runner.input_batch
        n = ib.num_reqs
        active = []
        for i, rid in enumerate(ib.req_ids[:n]):
            rs = self.reqs.get(rid)
            if rs is None:
                rs = self._new_request(rid, runner.requests[rid])
            if rs.active:
                active.append((i, rs))
        self._step = None
        if not active:
            return
        qs = runner.query_start_loc.np[: n + 1]
        computed = ib.num_computed_tokens_cpu[:n]
        T = int(qs[n])
        slot = np.full(T, -1, dtype=np.int32)
        L = self.shape.num_layers
        head_cap = res_cap = None
        records: list[tuple[RequestState, str, int, np.ndarray, np.ndarray]] = []
        rows = {"heads": 0, "residual": 0}
        for i, rs in active:
            lo, hi = int(qs[i]), int(qs[i + 1])
            pos = int(computed[i]) + np.arange(hi - lo)
            prompt = pos < rs.num_prompt
            slot[lo:hi] = np.where(prompt, rs.slots["prompt"], rs.slots["generated"])
            cap = rs.capture
            if cap is None or rs.error is not None:
                continue
            want = {"last": pos == rs.num_prompt - 1, "all": np.ones_like(prompt), "generated": ~prompt}[cap.positions]
            idx = np.nonzero(want)[0]
            if idx.size == 0:
                continue
            for kind, layers in (("heads", cap.heads), ("residual", cap.residual)):
                for layer in layers or ():
                    r0 = rows[kind]
                    if r0 + idx.size > self.shape.capture_rows:
                        rs.error = (
                            f"capture overflow: this step needs more than capture_rows="
                            f"{self.shape.capture_rows} rows; raise additional_config.emosteer.capture_rows"
                        )
                        logger.error("emosteer: request %s: %s", rs.req_id, rs.error)
                        break
                    arr = head_cap if kind == "heads" else res_cap
                    if arr is None:
                        arr = np.full((L, T), -1, dtype=np.int32)
                        if kind == "heads":
                            head_cap = arr
                        else:
                            res_cap = arr
                    r = np.arange(r0, r0 + idx.size, dtype=np.int32)
                    arr[layer, lo + idx] = r
                    rows[kind] = r0 + idx.size
                    records.append((rs, kind, layer, pos[idx], r))
        b = self.bufs
        b.token_slot[:T].copy_(torch.from_numpy(slot))
        if head_cap is not None:
            b.head_cap[:, :T].copy_(torch.from_numpy(head_cap))
        if res_cap is not None:
            b.res_cap[:, :T].copy_(torch.from_numpy(res_cap))
        self._step = {"T": T, "records": records, "rows": rows}

    def abandon_step(self, runner: Any) -> None:
        """After an internal error in ``prepare_step``: run this step with no
        interventions and mark the batch's requests failed (never silently unsteered)."""
        self._step = None
        b = self.bufs
        b.token_slot.fill_(-1)
        b.head_cap.fill_(-1)
        b.res_cap.fill_(-1)
        ib = runner.input_batch
        for rid in ib.req_ids[: ib.num_reqs]:
            rs = self.reqs.get(rid)
            if rs is not None and rs.active and rs.error is None:
                rs.error = "internal emosteer error while preparing a step (see the worker log)"

    def finish_step(self) -> None:
        """After the forward: copy captured rows out, put the indices back to -1."""
        step, self._step = self._step, None
        if step is None:
            return
        b, T = self.bufs, step["T"]
        got = {}
        if step["rows"]["heads"]:
            got["heads"] = b.head_buf[: step["rows"]["heads"]].to("cpu", copy=True)
            b.head_cap[:, :T].fill_(-1)
        if step["rows"]["residual"]:
            got["residual"] = b.res_buf[: step["rows"]["residual"], 0].to("cpu", copy=True)
            b.res_cap[:, :T].fill_(-1)
        b.token_slot[:T].fill_(-1)
        for rs, kind, layer, positions, rows in step["records"]:
            store = rs.heads if kind == "heads" else rs.residual
            per = store.setdefault(layer, {})
            for p, r in zip(positions.tolist(), rows.tolist()):
                per[p] = got[kind][r]

    # -- rpc -------------------------------------------------------------------------
    def fetch(self, keys: list[str]) -> dict[str, dict]:
        """Results by key. vLLM tells workers that requests finished one engine step
        later than it tells the client, so a request the client saw finish may still be
        live here: its results are complete (nothing runs after its last token), and
        are handed out now; its slots are freed when the finish notice arrives."""
        out = {}
        for k in keys:
            if k in self.finished:
                out[k] = self.finished.pop(k)
            elif k in self.by_key:
                rs = self.reqs[self.by_key[k]]
                if rs.fetched or (rs.capture is None and rs.error is None):
                    continue
                out[k] = _pack(rs)
                rs.fetched = True
                rs.heads, rs.residual = {}, {}
        return out

    def status(self) -> dict:
        return {
            "slots_in_use": len(self.slots),
            "max_slots": self.slots.max_slots,
            "requests": len(self.reqs),
            "parked": len(self.finished),
            "bank": self.bank.names(),
            "impl": self.impl,
            "features": [k for k, v in self.features.items() if v],
            "tp": [self.tp_rank, self.tp_size],
        }


def _pack(rs: RequestState) -> dict:
    """Plain, msgpack-safe result: positions, error and one safetensors blob."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    positions: set[int] = set()
    for kind, store in (("heads", rs.heads), ("residual", rs.residual)):
        for layer, per in store.items():
            ps = sorted(per)
            positions.update(ps)
            tensors[f"{kind}.{layer}"] = torch.stack([per[p] for p in ps]).contiguous()
    return {
        "error": rs.error,
        "positions": sorted(positions),
        "tensors": save(tensors) if tensors else b"",
    }


def _pick_impl(forced: str | None, device: torch.device) -> str:
    """The op implementation for the engine. The interpreted Triton path (CPU with
    TRITON_INTERPRET set) is test-only; an engine never picks it unless forced."""
    from emosteer.ops import available_impls, resolve_impl

    if forced:
        return resolve_impl(forced, device)
    avail = [i for i in available_impls(device) if not (device.type == "cpu" and i == "triton")]
    return avail[0]
