"""The worker side of the plugin: buffers on the model, granted slots, per-step metadata, captures.

One ``WorkerSteering`` lives on each model runner (``runner._emosteer``). At load time
it finds the decoder layers, allocates ``SteerBuffers`` (slot tables, vector pools,
per-layer flags, capture buffers) and installs a *site* on every patched module.

The worker owns no accounting: the scheduler admits each steered request and grants it
slot ids and pool rows (``emosteer/vllm/admission.py``). When a request is first seen
the worker compiles its config (``emosteer/request/compile.py``), checks that it compiles to the
fingerprints the front end planned, and writes only what changed: pool rows whose key
differs from what the row holds, slot tables whose fingerprint differs.

Each step, before the forward, it writes ``token_slot`` (vectorised over the batch, the
per-request tables cached while the batch's requests stay the same), the per-layer flags
and the capture indices; after the forward it copies captured rows out and resets them.
A request the worker cannot apply is *failed*: it runs with no interventions for this one
step, and the scheduler finishes it with an error and evicts its KV blocks before any of
its tokens reach the client. The engine and the other requests go on.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from emosteer.request.bank import ModelInfo, VectorBank
from emosteer.request.compile import PHASES, compile_request, key_kind, local_heads, materialize
from emosteer.request.spec import MAX_IMAGES, SpecError, SteerSpec
from emosteer.vllm.admission import GRANT_KEY, PLAN_KEY, discard_failures, report_failure
from emosteer.vllm.buffers import (
    FLAG_ATTN,
    FLAG_HEADS,
    FLAG_RESCAP,
    NUM_FLAGS,
    ActSite,
    AttnSite,
    NormSite,
    Shape,
    SteerBuffers,
)
from emosteer.vllm.config import capacity_for, settings_from_vllm_config
from emosteer.vllm.patches import attention as attention_patch
from emosteer.vllm.frontend import CLAIM_KEY, EXTRA_KEY, RESULT_KEY, SAMPLES_KEY, worker_key

KEEP_VERSIONS = 64  # retired vector versions a worker holds for requests already accepted

logger = logging.getLogger("emosteer.vllm")



class RequestState:
    def __init__(self, req_id: str, key: str | None, num_prompt: int):
        self.req_id, self.key, self.num_prompt = req_id, key, num_prompt
        self.spec: SteerSpec | None = None
        self.slots: dict[str, int] = {p: -1 for p in PHASES}
        # Position groups ("last", listed prompt positions): sorted positions, their slots.
        self.pos_positions = np.zeros(0, dtype=np.int64)
        self.pos_slots = np.zeros(0, dtype=np.int32)
        self.capture = None
        self.heads: dict[int, dict[int, torch.Tensor]] = {}  # layer -> position -> [Hl, D]
        self.residual: dict[int, dict[int, torch.Tensor]] = {}  # layer -> position -> [d]
        self.attn: dict[int, dict[int, torch.Tensor]] = {}  # layer -> position -> [Hl, NS]
        self.spans: list[tuple[int, int]] = []  # image key spans [start, end) of the prompt
        self.vee = False  # uses the attention op (boost or attn_image capture)
        self.error: str | None = None
        self.fetched = False  # results already handed out (see WorkerSteering.fetch)

    @property
    def active(self) -> bool:
        return (self.slots["prompt"] >= 0 or self.slots["generated"] >= 0 or self.pos_slots.size > 0
                or self.capture is not None)


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
        # Old versions of replaced/removed vectors stay until requests admitted under them
        # have had time to arrive (pinned by the content hashes in their plan).
        self.bank = VectorBank(self.info, keep_versions=KEEP_VERSIONS)
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
        max_tokens = int(runner.max_num_tokens)
        self.capacity = capacity_for(self.settings, self.info, runner.model_config.dtype, self.tp_size)
        self.shape = Shape(
            num_layers=L,
            max_slots=self.settings.max_slots,
            heads=heads_local,
            head_dim=self.info.head_dim,
            hidden=self.info.hidden_size,
            neurons=self.info.intermediate_size // self.tp_size,
            max_tokens=max_tokens,
            capture_rows=self.capacity.capture_rows,
            pool_rows=dict(self.capacity.rows),
            max_reqs=int(getattr(runner, "max_num_reqs", 0) or vcfg.scheduler_config.max_num_seqs),
            max_images=MAX_IMAGES,
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
        self.vee_why = _vee_unsupported(runner, attns)
        self.features["vee"] = len(attns) == L and self.vee_why is None
        self.attn_impl = None
        if self.features["vee"]:
            self.attn_impl = _pick_impl(self.settings.impl, self.device, "attn_image_boost")
            backend = attn0.attn_backend.get_name()
            for m in attns.values():
                site = m._emosteer_site
                site.vee, site.backend, site.attn_impl, site.host_on = True, backend, self.attn_impl, False
                site.sm_scale = torch.tensor([float(m.impl.scale)], dtype=torch.float32, device=self.device)
                attention_patch.SITES[m.layer_name] = site
        self.attn_sites = [attns[i]._emosteer_site for i in sorted(attns)]
        S = self.settings.max_slots
        # What each slot / pool row holds now (written on the scheduler's grant). A slot's
        # identity is its program's fingerprint AND the pool rows its tables point at:
        # a config granted its old slot again after the pool evicted and reused its rows
        # reads them from other rows now, so its tables must be rewritten.
        self.slot_sig: list[tuple | None] = [None] * S
        # slot -> (heads, res, neu, boost) x layer
        self.slot_layers = np.zeros((S, 4, L), dtype=bool)
        self.row_key: dict[str, list[str | None]] = {k: [None] * n for k, n in self.capacity.rows.items()}
        self.reqs: dict[str, RequestState] = {}
        self.by_key: dict[str, str] = {}  # result key -> live request id
        self.finished: OrderedDict[str, dict] = OrderedDict()
        self.finished_at: OrderedDict[str, float] = OrderedDict()  # key -> time parked
        self.failed_now: dict[str, str] = {}  # failures to report with this step's output
        self._step: dict | None = None
        self._pending: list = []  # (copy event, host rows, records) not yet handed out
        self._batch_key: tuple | None = None
        self._batch: tuple | None = None
        self._spans_written = False
        logger.info(
            "emosteer: %d layers, %d slots (%.2f MiB), pool %s rows (%.1f MiB), %d capture rows, "
            "impl=%s, features=%s",
            L, S, self.bufs.nbytes("slots") / 2**20, self.capacity.rows["res"],
            self.bufs.nbytes("pool") / 2**20, self.shape.capture_rows, self.impl,
            [k for k, v in self.features.items() if v],
        )

    # -- bank ------------------------------------------------------------------------
    def register_bank(self, bank: VectorBank) -> list[str]:
        bank.validate_against(self.info)
        self.bank.update(bank)
        return bank.names()

    def register_bank_bytes(self, data: bytes) -> list[str]:
        return self.register_bank(VectorBank.from_bytes(data, where="registered bank"))

    def remove_vectors(self, names: list[str]) -> list[str]:
        """Remove entries; requests admitted before still read their (retired) contents."""
        gone = [n for n in names if n in self.bank]
        for n in gone:
            self.bank.remove(n)
        return gone

    # -- requests --------------------------------------------------------------------
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
            self._check_features(spec)
            rs.vee = spec.boost is not None or bool(spec.capture is not None and spec.capture.attn_image)
            if rs.vee and len(rs.spans) > MAX_IMAGES:
                field = "boost" if spec.boost is not None else "capture.attn_image"
                raise SpecError(field, f"the prompt holds {len(rs.spans)} images; VEE and attn_image "
                                f"captures handle up to {MAX_IMAGES} per request")
            prog = compile_request(spec, bank, self.info, rs.num_prompt)
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
            if self.row_key[kind][row] != key:
                vec = materialize(key, bank, self.info, self.tp_size, self.tp_rank)
                pool = self.bufs.pools[kind]
                pool[row].copy_(vec.to(pool.dtype).view_as(pool[row]))
                self.row_key[kind][row] = key
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

    def _check_features(self, spec: SteerSpec) -> None:
        want_attn = [f for f, on in (("boost", spec.boost is not None),
                                     ("capture.attn_image", bool(spec.capture and spec.capture.attn_image))) if on]
        if want_attn and not self.features["vee"]:
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
        heads = local_heads(self.info, self.tp_size, self.tp_rank)
        a = torch.ones(L, Hl)
        b = torch.zeros(L, Hl)
        vrow = torch.full((L, Hl), -1, dtype=torch.int32)
        alpha = torch.zeros(L)
        urow = torch.full((L,), -1, dtype=torch.int32)
        gamma = torch.ones(L)
        nrow = torch.full((L,), -1, dtype=torch.int32)
        beta = torch.ones(L, Hl)
        act = np.zeros((4, L), dtype=bool)
        for (layer, head), (ha, hb, key) in prog.heads.items():
            if head not in heads:
                continue  # another tensor-parallel rank holds this head
            h = head - heads.start
            a[layer, h], b[layer, h] = ha, hb
            if key is not None:
                vrow[layer, h] = rows[key]
            act[0, layer] = True
        for layer, (al, key) in prog.res.items():
            alpha[layer], urow[layer] = al, rows[key]
            act[1, layer] = True
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
        bf.vrow[:, slot] = vrow.to(bf.device)
        bf.alpha[:, slot] = alpha.to(bf.device)
        bf.urow[:, slot] = urow.to(bf.device)
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
            if rs.key is not None:
                self.by_key.pop(rs.key, None)
            if rs.fetched:
                continue
            if rs.key is not None and (rs.capture is not None or rs.error is not None):
                self.finished[rs.key] = _pack(rs)
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

    # -- per step --------------------------------------------------------------------
    def _batch_tables(self, runner: Any, n: int):
        """Per batch row: prompt slot, generated slot, prompt length, capture request
        (or None). Rebuilt only when the batch's requests changed since the last step."""
        ib = runner.input_batch
        key = tuple(ib.req_ids[:n])
        if key == self._batch_key and self._batch is not None:
            return self._batch
        ps = np.full(n, -1, dtype=np.int32)
        gs = np.full(n, -1, dtype=np.int32)
        npr = np.zeros(n, dtype=np.int64)
        caps = []
        at = []  # (batch row, positions, slots) of requests with position groups
        spans = None  # [n, NS, 2] image spans, where some request uses the attention op
        for i, rid in enumerate(key):
            rs = self.reqs.get(rid)
            if rs is None:
                rs = self._new_request(rid, runner.requests[rid])
            ps[i], gs[i], npr[i] = rs.slots["prompt"], rs.slots["generated"], rs.num_prompt
            if rs.vee and rs.spans:
                if spans is None:
                    spans = np.zeros((n, self.shape.max_images, 2), dtype=np.int32)
                spans[i, : len(rs.spans)] = rs.spans
            if rs.pos_slots.size:
                at.append((i, rs.pos_positions, rs.pos_slots))
            if rs.capture is not None and rs.error is None:
                caps.append((i, rs))
        extra = [sl for _, _, sl in at]
        any_slot = bool((ps >= 0).any() or (gs >= 0).any() or extra)
        used = np.unique(np.concatenate([ps[ps >= 0], gs[gs >= 0], *extra])) if any_slot else None
        layer_flags = self.slot_layers[used].any(axis=0) if any_slot else None  # [4, L]
        self._batch_key = key
        cap_at = (
            np.array([i for i, _ in caps], dtype=np.int64),
            np.array([rs.num_prompt - 1 if rs.capture.positions == "last" else -1 for _, rs in caps],
                     dtype=np.int64),
        )
        self._batch = (ps, gs, npr, caps, any_slot, layer_flags, at, cap_at, spans)
        self._spans_written = False
        return self._batch

    def prepare_step(self, runner: Any) -> None:
        """Fill token_slot, the per-layer flags and capture indices for the batch about
        to run; a batch without steered or capturing requests writes nothing."""
        ib = runner.input_batch
        n = ib.num_reqs
        self._step = None
        ps, gs, npr, caps, any_slot, layer_flags, at, cap_at, spans = self._batch_tables(runner, n)
        if not any_slot and not caps:
            return
        qs = runner.query_start_loc.np[: n + 1]
        T = int(qs[n])
        computed = ib.num_computed_tokens_cpu[:n]
        counts = np.diff(qs).astype(np.int64)
        row = np.repeat(np.arange(n), counts)  # batch row of each token
        pos = computed[row] + (np.arange(T) - qs[:-1][row])  # position in its request
        L = self.shape.num_layers
        flags = np.zeros((NUM_FLAGS, L), dtype=np.int32)
        b = self.bufs
        if any_slot:
            slot = np.where(pos < npr[row], ps[row], gs[row]).astype(np.int32)
            for i, P, S in at:  # "last" / listed prompt positions take their group's slot
                lo, hi = int(qs[i]), int(qs[i + 1])
                rpos = pos[lo:hi]
                k = np.searchsorted(P, rpos)
                hit = (k < P.size) & (P[np.minimum(k, P.size - 1)] == rpos)
                if hit.any():
                    slot[lo:hi][hit] = S[k[hit]]
            self._h2d(b.token_slot[:T], slot)
            flags[:3] = layer_flags[:3]
            flags[FLAG_ATTN] = layer_flags[3]
        head_cap = res_cap = mass_cap = None
        records: list[tuple[RequestState, str, int, np.ndarray, np.ndarray]] = []
        rows = {"heads": 0, "residual": 0, "attn_image": 0}
        if caps:
            # "last" captures have work only in the step holding the last prompt token:
            # skip the others without a per-request loop (decode steps of a big batch).
            ci, last = cap_at
            start = computed[ci]
            keep = (last < 0) | ((start <= last) & (last < start + counts[ci]))
            if not keep.all():
                caps = [c for c, k in zip(caps, keep) if k]
        for i, rs in caps:
            lo, hi = int(qs[i]), int(qs[i + 1])
            rpos = pos[lo:hi]
            prompt = rpos < rs.num_prompt
            cap = rs.capture
            want = {"last": rpos == rs.num_prompt - 1, "all": np.ones_like(prompt), "generated": ~prompt}[cap.positions]
            idx = np.nonzero(want)[0]
            if idx.size == 0:
                continue
            need = idx.size * max(len(cap.heads or ()), len(cap.residual or ()), len(cap.attn_image or ()))
            if max(rows.values()) + need > self.shape.capture_rows:
                # Only this request's captures are lost; its text and the others' are not.
                rs.error = (
                    f"capture overflow: this step would need more than capture_rows="
                    f"{self.shape.capture_rows} rows; raise additional_config.emosteer.capture_rows"
                )
                logger.error("emosteer: request %s: %s", rs.req_id, rs.error)
                self._batch_key = None  # its capture is off from now on
                rs.capture = None
                continue
            for kind, layers in (("heads", cap.heads), ("residual", cap.residual),
                                 ("attn_image", cap.attn_image)):
                for layer in layers or ():
                    r0 = rows[kind]
                    if kind == "heads":
                        if head_cap is None:
                            head_cap = np.full((L, T), -1, dtype=np.int32)
                        arr, flag = head_cap, FLAG_HEADS
                    elif kind == "attn_image":
                        if mass_cap is None:
                            mass_cap = np.full((L, T), -1, dtype=np.int32)
                        arr, flag = mass_cap, FLAG_ATTN
                    else:
                        if res_cap is None:
                            res_cap = np.full((L, T), -1, dtype=np.int32)
                        arr, flag = res_cap, FLAG_RESCAP
                    r = np.arange(r0, r0 + idx.size, dtype=np.int32)
                    arr[layer, lo + idx] = r
                    flags[flag, layer] = 1
                    rows[kind] = r0 + idx.size
                    records.append((rs, kind, layer, rpos[idx], r))
        if head_cap is not None:
            self._h2d(b.head_cap[:, :T], head_cap)
        if res_cap is not None:
            self._h2d(b.res_cap[:, :T], res_cap)
        if mass_cap is not None:
            self._h2d(b.mass_cap[:, :T], mass_cap)
        attn = bool(flags[FLAG_ATTN].any())
        if attn:
            # The attention op reads each token's batch row and position, and the rows'
            # image spans (empty for requests without images or without VEE).
            self._h2d(b.token_row[:T], row.astype(np.int32))
            self._h2d(b.token_pos[:T], pos.astype(np.int32))
            if not self._spans_written:
                b.spans[:n].zero_()
                if spans is not None:
                    self._h2d(b.spans[:n], spans)
                self._spans_written = True
            for i, site in enumerate(self.attn_sites):
                site.host_on = bool(flags[FLAG_ATTN, site.layer])
        self._h2d(b.flags, flags.reshape(NUM_FLAGS, L, 1))
        self._step = {"T": T, "records": records, "rows": rows, "slots": any_slot, "attn": attn}

    def abandon_step(self, runner: Any) -> None:
        """After an internal error in ``prepare_step``: the step runs with every flag 0
        and each steered or capturing request of the batch is failed (reported to the
        scheduler, which finishes it with an error): never silently unsteered."""
        self._step = None
        self._batch_key = None
        b = self.bufs
        b.flags.zero_()
        b.token_slot.fill_(-1)
        b.head_cap.fill_(-1)
        b.res_cap.fill_(-1)
        b.mass_cap.fill_(-1)
        b.token_row.fill_(-1)
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
                store = {"heads": rs.heads, "residual": rs.residual, "attn_image": rs.attn}[kind]
                per = store.setdefault(layer, {})
                data = got[kind]
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
        if step["attn"]:
            b.token_row[:T].fill_(-1)
            for site in self.attn_sites:
                site.host_on = False
        if step["slots"]:
            b.token_slot[:T].fill_(-1)
        if step["records"]:
            event = None
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            self._pending.append((event, got, step["records"]))

    # -- rpc -------------------------------------------------------------------------
    def fetch(self, keys: list[str]) -> dict[str, dict]:
        """Results by key. vLLM tells workers that requests finished one engine step
        later than it tells the client, so a request the client saw finish may still be
        live here: its results are complete (nothing runs after its last token), and
        are handed out now; its slots are freed when the finish notice arrives."""
        self._resolve_captures()
        self._expire()
        out = {}
        for k in keys:
            if k in self.finished:
                out[k] = self.finished.pop(k)
                self.finished_at.pop(k, None)
            elif k in self.by_key:
                rs = self.reqs[self.by_key[k]]
                if rs.fetched or (rs.capture is None and rs.error is None):
                    continue
                out[k] = _pack(rs)
                rs.fetched = True
                rs.heads, rs.residual, rs.attn = {}, {}, {}
        return out

    def status(self) -> dict:
        return {
            "slots_written": sum(sig is not None for sig in self.slot_sig),
            "max_slots": self.settings.max_slots,
            "pool_rows": dict(self.capacity.rows),
            "requests": len(self.reqs),
            "parked": len(self.finished),
            "bank": self.bank.names(),
            "impl": self.impl,
            "attn_impl": self.attn_impl,
            "features": [k for k, v in self.features.items() if v],
            "vee_unavailable": self.vee_why,
            "tp": [self.tp_rank, self.tp_size],
        }


def _slot_signature(prog, rows: dict[str, int]) -> tuple:
    """What a written slot holds: the program's fingerprint and the pool row of every
    key it reads (the tables store row ids, not keys)."""
    return (prog.fingerprint, tuple(int(rows[k]) for k in prog.keys()))


def _pack(rs: RequestState) -> dict:
    """Plain, msgpack-safe result: positions, error and one safetensors blob."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    positions: set[int] = set()
    for kind, store in (("heads", rs.heads), ("residual", rs.residual), ("attn_image", rs.attn)):
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


def _pick_impl(forced: str | None, device: torch.device, op: str | None = None) -> str:
    """The op implementation for the engine (of ``op``, or of every core op). The
    interpreted Triton path (CPU with TRITON_INTERPRET set) is test-only; an engine never
    picks it unless forced."""
    from emosteer.ops import available_impls, resolve_impl

    if forced:
        return resolve_impl(forced, device, op)
    avail = [i for i in available_impls(device, op) if not (device.type == "cpu" and i == "triton")]
    return avail[0]


def image_spans(cached: Any) -> list[tuple[int, int]]:
    """Key spans ``[start, end)`` of the prompt's image (and video) placeholder tokens,
    in prompt order, from vLLM's multimodal feature specs."""
    out = []
    for f in getattr(cached, "mm_features", None) or ():
        if getattr(f, "modality", None) in ("image", "video"):
            p = f.mm_position
            out.append((int(p.offset), int(p.offset + p.length)))
    return sorted(out)


def _vee_unsupported(runner: Any, attns: dict) -> str | None:
    """Why this engine's attention cannot take VEE / attention-to-image captures, or
    None when it can: emosteer must be able to read the paged KV cache (a layout it
    knows, checked by a probe on the CPU) and the attention must be plain causal
    softmax (no sliding window, soft cap, ALiBi or sinks)."""
    if not attns:
        return "the decoder layers hold no vLLM Attention module"
    m0 = next(iter(attns.values()))
    backend = m0.attn_backend.get_name()
    for i, m in attns.items():
        impl = m.impl
        window = getattr(impl, "sliding_window", None)
        if window not in (None, -1, (-1, -1)):
            return f"layer {i} uses sliding-window attention"
        if getattr(impl, "logits_soft_cap", None) or getattr(impl, "alibi_slopes", None) is not None:
            return f"layer {i} uses a logit soft cap or ALiBi"
        if getattr(impl, "sinks", None) is not None:
            return f"layer {i} uses attention sinks"
        if str(getattr(m, "kv_cache_dtype", "auto")) != "auto":
            return f"the KV cache is quantized ({m.kv_cache_dtype})"
    if runner.device.type == "cuda":
        mode = getattr(runner.vllm_config.compilation_config, "cudagraph_mode", None)
        if mode is not None and "NONE" not in str(mode):
            return "CUDA graphs are on (run the engine with enforce_eager=True for VEE)"
    if backend == "CPU_ATTN":
        return _probe_cpu_cache(runner, m0)
    if backend not in ("FLASH_ATTN", "TRITON_ATTN"):
        return f"attention backend {backend} stores its KV cache in a layout emosteer does not read"
    return None


def _probe_cpu_cache(runner: Any, attn: Any) -> str | None:
    """Write known keys and values with vLLM's own CPU cache writer into a scratch cache
    and read them back through ``cache_views``: the layout emosteer assumes is checked
    on this machine's ISA, not taken on faith."""
    from vllm import _custom_ops as vops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    dtype = runner.model_config.dtype
    BS = int(runner.cache_config.block_size)
    KVH, D = int(attn.num_kv_heads), int(attn.head_size)
    try:
        isa = _get_attn_isa(dtype, BS, D, "auto")
        kv = torch.zeros((2, KVH, BS, 2 * D), dtype=dtype)
        view = kv.view(2, KVH, 2 * BS, D)
        kc, vc = view.chunk(2, dim=2)
        g = torch.Generator().manual_seed(0)
        n = min(BS + 3, 2 * BS)
        k = torch.randn((n, KVH, D), generator=g).to(dtype)
        v = torch.randn((n, KVH, D), generator=g).to(dtype)
        slots = torch.arange(n, dtype=torch.int64)
        vops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0,
                                        kv_cache_dtype="auto")
        got = attention_patch.cache_views("CPU_ATTN", kv, KVH, D)
    except Exception as e:  # an ISA or vLLM version whose writer differs
        return f"the CPU KV-cache probe failed ({type(e).__name__}: {e})"
    if got is None:
        return "the CPU KV cache has a shape emosteer does not read"
    keys = got[0].reshape(2 * BS, KVH, D)[:n]
    values = got[1].reshape(2 * BS, KVH, D)[:n]
    if not (torch.equal(keys, k) and torch.equal(values, v)):
        return f"vLLM's CPU KV cache (isa {isa!r}) stores keys in a layout emosteer does not read"
    return None
