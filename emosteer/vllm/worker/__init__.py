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
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from emosteer.request.bank import ModelInfo, VectorBank
from emosteer.request.spec import MAX_IMAGES
from emosteer.vllm.buffers import NeuronSite, AttentionSite, ResidualSite, Shape, SteerBuffers
from emosteer.vllm.config import capacity_for, settings_from_vllm_config
from emosteer.vllm.patches import attention as attention_patch
from emosteer.vllm.worker.memory import TRACEMALLOC_ENV, start_tracing_from_env
from emosteer.vllm.worker.model import decoder_layers, pick_impl, vee_unsupported
from emosteer.vllm.worker.requests import RequestsMixin, RequestState, pack_results
from emosteer.vllm.worker.step import StepsMixin

KEEP_VERSIONS = 64  # retired vector versions a worker holds for requests already accepted

logger = logging.getLogger("emosteer.vllm")

__all__ = ["KEEP_VERSIONS", "RequestState", "WorkerSteering"]


class WorkerSteering(RequestsMixin, StepsMixin):
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
        if start_tracing_from_env():
            logger.warning("emosteer: tracemalloc is on (%s): every Python allocation is slower",
                           TRACEMALLOC_ENV)
        self.impl = pick_impl(self.settings.impl, self.device)
        # Old versions of replaced/removed vectors stay until requests admitted under them
        # have had time to arrive (pinned by the content hashes in their plan).
        self.bank = VectorBank(self.info, keep_versions=KEEP_VERSIONS)
        if self.settings.bank:
            self.register_bank(VectorBank.load(self.settings.bank))

        L = self.info.num_layers
        layers, parent = decoder_layers(runner.get_model(), L)
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
            m._emosteer_site = AttentionSite(self.bufs, i, self.impl)
        if self.features["residual"]:
            for i, m in norms.items():
                m._emosteer_site = ResidualSite(self.bufs, i, self.impl)
        if self.features["neurons"]:
            for i, m in acts.items():
                m._emosteer_site = NeuronSite(self.bufs, i, self.impl)
        self.vee_why = vee_unsupported(runner, attns)
        self.features["attention"] = len(attns) == L and self.vee_why is None
        self.attn_impl = None
        if self.features["attention"]:
            self.attn_impl = pick_impl(self.settings.impl, self.device, "attn_image_boost")
            backend = attn0.attn_backend.get_name()
            for m in attns.values():
                site = m._emosteer_site
                site.vee, site.backend, site.attn_impl, site.host_on = True, backend, self.attn_impl, False
                site.graph_safe = self.device.type == "cuda"
                site.sm_scale = torch.tensor([float(m.impl.scale)], dtype=torch.float32, device=self.device)
                attention_patch.SITES[m.layer_name] = site
        self.attn_sites = [attns[i]._emosteer_site for i in sorted(attns)]
        S = self.settings.max_slots
        # What each slot / pool row holds now (written on the scheduler's grant). A slot's
        # identity is its program's fingerprint AND the pool rows its tables point at:
        # a config granted its old slot again after the pool evicted and reused its rows
        # reads them from other rows now, so its tables must be rewritten.
        self.slot_sig: list[tuple | None] = [None] * S
        # slot -> (heads, res, neu, boost, gate) x layer
        self.slot_layers = np.zeros((S, 5, L), dtype=bool)
        # Latch-state rows (bufs.gate_state) free for requests with a latched gate.
        self.free_gate_rows = list(range(self.bufs.gate_state.shape[0] - 1, -1, -1))
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
                out[k] = pack_results(rs)
                rs.fetched = True
                rs.heads, rs.residual, rs.attn, rs.probe = {}, {}, {}, {}
        return out

    def status(self) -> dict:
        """This worker's state; ``compile`` counts the graphs vLLM and dynamo compiled in
        this process (a count that grows while serving is a recompilation)."""
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
            "compile": compile_counts(),
        }


def compile_counts() -> dict:
    """vLLM's compile counters (graphs seen, backend and inductor compilations, cache
    entries) and dynamo's unique-graph count, in this process."""
    import dataclasses

    from torch._dynamo.utils import counters
    from vllm.compilation.counter import compilation_counter

    keep = ("num_graphs_seen", "num_piecewise_graphs_seen", "num_backend_compilations",
            "num_inductor_compiles", "num_eager_compiles", "num_cache_entries_updated",
            "num_cudagraph_captured", "num_compiled_artifacts_loaded", "num_aot_artifacts_loaded",
            "stock_torch_compile_count")
    c = dataclasses.asdict(compilation_counter)
    out = {k: int(c[k]) for k in keep if k in c}
    out["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
    return out
