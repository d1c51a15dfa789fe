"""The front-end side: check request configs and set the prefix-cache salt.

Runs in the process that accepts requests (``vllm.LLM`` or the OpenAI server), through
the ``input_processor`` patch, before a request reaches the engine: a malformed config
raises ``SpecError`` (a ``ValueError``, so the server answers 400) naming the field.
Prefix caching: the admission plan carries the request's cache identity (the program in
effect at each position, from the compiled program: ``RequestProgram.cache_identity``);
the plugin's block hasher keys every KV block by it (``patches/prefix_cache.py``), so a
block is reused only under exactly the interventions it was computed with. Clients
cannot set the plan, and a client ``cache_salt`` holding the reserved prefix
``emosteer@`` is refused. Captures at every position (``positions: "all"``) do not read
the prefix cache (cached prompt tokens are never recomputed, so they could not be
captured), n > 1 samples included.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from emosteer.request import inline as inline_vec
from emosteer.request import positions as pos_model
from emosteer.request.bank import ModelInfo, VectorBank
from emosteer.request.spec import SpecError, SteerSpec
from emosteer.request.compile import compile_request
from emosteer.vllm.admission import GRANT_KEY, PLAN_KEY, Admission
from emosteer.vllm.config import capacity_for, settings_from_vllm_config

EXTRA_KEY = "emosteer"  # SamplingParams.extra_args key of the request config
RESULT_KEY = "emosteer_key"  # extra_args key under which the worker parks captures and errors
SAMPLES_KEY = "emosteer_n"  # extra_args: n > 1 samples, each with its own results
CLAIM_KEY = "emosteer_claim"  # extra_args: the front end's nonce binding a result key to one request
PRIVATE_KEYS = (PLAN_KEY, GRANT_KEY, SAMPLES_KEY, CLAIM_KEY)  # set by emosteer itself; refused from clients
# Result keys and vector names that clients choose: no paths, no markup, bounded length.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def check_name(value: Any, field: str) -> str:
    """A client-chosen result key or vector name; SpecError naming ``field`` otherwise."""
    if not isinstance(value, str) or NAME_RE.fullmatch(value) is None:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise SpecError(
            field,
            f"must be 1-128 characters of letters, digits and . _ : - (starting with a letter "
            f"or digit), got {shown}",
        )
    return value


def worker_key(key: str, nonce: str | None) -> str:
    """Where workers file a request's results: the client's key bound to its claim."""
    return f"{key}~{nonce}" if nonce else key


def capture_rows_per_step(spec: SteerSpec, num_prompt_tokens: int | None, num_layers: int) -> int:
    """The most capture rows ``spec`` can fill in one engine step in any one capture
    buffer (heads, residual, attention-to-image and probe-score rows have a buffer each):
    captured layers times the captured tokens one step can hold (every prompt token for
    "all", else one)."""
    c = spec.capture
    if c is None:
        return 0
    layers = max([num_layers if v == "all" else len(v) for v in (c.heads, c.residual, c.attn_image)
                  if v is not None] + [1 if c.probe else 0])
    return layers * pos_model.capture_tokens_per_step(c.positions, num_prompt_tokens)


class FrontendSteering:
    def __init__(self, vllm_config: Any):
        self.settings = settings_from_vllm_config(vllm_config)
        self.info = ModelInfo.from_hf_config(vllm_config.model_config.hf_config)
        tp = vllm_config.parallel_config.tensor_parallel_size
        self.capacity = capacity_for(self.settings, self.info, vllm_config.model_config.dtype, tp)
        self.bank = VectorBank(self.info)
        if self.settings.bank:
            bank = VectorBank.load(self.settings.bank)
            bank.validate_against(self.info)
            self.bank.update(bank)
        # Result keys of accepted requests whose results have not been fetched: key ->
        # (samples, time claimed, request id, claim nonce). Two live requests never share
        # a key, and the workers file results under "<key>~<nonce>": a key claimed again
        # after it expired here can never be handed an earlier request's results.
        self._keys: "OrderedDict[str, tuple[int, float, str, str]]" = OrderedDict()
        self._keys_lock = threading.Lock()

    # -- vectors ---------------------------------------------------------------------
    def registration(self, bank: VectorBank) -> bytes:
        """Check ``bank`` against the served model and return the bytes every worker
        registers (``emosteer_rpc("register", ...)``); the caller then ``bank.update``s
        the front end, after every worker has the new contents."""
        bank.validate_against(self.info)
        return bank.to_bytes()

    # -- result keys -------------------------------------------------------------------
    def claim_key(self, key: Any, samples: int = 1, request_id: str = "") -> str:
        """Reserve a client-chosen result key; SpecError if malformed or still in use.
        Returns the claim nonce (the request carries it to the workers, ``CLAIM_KEY``)."""
        key = check_name(key, "emosteer_key")
        if int(samples) > self.settings.keep_captures:
            # Each sample parks its own results and the workers keep at most
            # keep_captures: some samples' results would be dropped before any fetch.
            raise SpecError("n", f"{int(samples)} samples with a result key, but the workers keep at "
                                 f"most keep_captures={self.settings.keep_captures} unfetched "
                                 "results: lower n or raise keep_captures")
        horizon = time.monotonic() - 2 * self.settings.capture_ttl_s
        with self._keys_lock:
            while self._keys and next(iter(self._keys.values()))[1] < horizon:
                self._keys.popitem(last=False)  # never fetched: long expired in the workers
            if key in self._keys:
                raise SpecError("emosteer_key", f"{key!r} is in use by another request whose "
                                "results were not fetched yet; choose a fresh key (a UUID)")
            nonce = uuid.uuid4().hex[:16]
            self._keys[key] = (int(samples), time.monotonic(), str(request_id), nonce)
        return nonce

    def release_key(self, key: str) -> int | None:
        """Forget ``key`` (its results were fetched); returns its sample count, if known."""
        with self._keys_lock:
            got = self._keys.pop(key, None)
        return None if got is None else got[0]

    def key_info(self, key: str) -> tuple[int, str] | None:
        """(samples, request id) of a claimed key, None if unknown."""
        with self._keys_lock:
            got = self._keys.get(key)
        return None if got is None else (got[0], got[2])

    def worker_keys(self, keys: list[str]) -> dict[str, str]:
        """Client result key ("<key>" or "<key>#<sample>") -> the key the workers file its
        results under, for the keys claimed now."""
        out = {}
        with self._keys_lock:
            for k in keys:
                base, sep, sample = k.partition("#")
                got = self._keys.get(base)
                if got is not None:
                    out[k] = worker_key(base, got[3]) + (sep + sample if sep else "")
        return out

    def check(self, raw: Any, num_prompt_tokens: int | None = None, max_tokens: int | None = None) -> SteerSpec:
        """Parse + validate against the bank and the model; SpecError names the field."""
        spec = SteerSpec.parse(raw)
        inline = [it for it in spec.inline_items() if it.inline is not None]
        size = inline_vec.total_bytes(inline)
        if size > self.settings.inline_mib * 2**20:
            raise SpecError(inline[-1].inline.field,
                            f"the request's inline vectors hold {size} bytes, more "
                            f"than this server's inline_mib ({self.settings.inline_mib} MiB)")
        spec.validate(self.bank, self.info, num_prompt_tokens, max_tokens)
        return spec.resolve(self.info)

    def plan(self, spec: SteerSpec, num_prompt_tokens: int | None = None) -> dict:
        """What the scheduler admits the request by: per phase (and position group) the
        slot fingerprint and the pool keys (``emosteer/request/compile.py``); SpecError if it
        could never fit."""
        plan = compile_request(spec, self.bank, self.info, num_prompt_tokens).to_plan(
            capture_rows_per_step(spec, num_prompt_tokens, self.info.num_layers), num_prompt_tokens
        )
        # The contents this request is accepted with: workers read exactly these versions
        # even if a vector is replaced or removed while the request waits.
        inline = set(spec.inline_names())  # (carried by the request itself)
        plan["bank"] = {n: self.bank.content_hash(n) for n in spec.vector_names() if n not in inline}
        why = Admission.fits(plan, self.capacity)
        if why is not None:
            raise SpecError("", why)
        return plan

    @staticmethod
    def skips_prefix_cache(spec: SteerSpec) -> bool:
        """Captures at every position must compute every prompt token, and a latched gate
        must see every token to know whether it has held: such a request never reads the
        prefix cache (its own KV is valid and may be cached for others)."""
        if spec.when is not None and spec.when.latch:
            return True
        return spec.capture is not None and pos_model.computes_every_prompt_token(spec.capture.positions)


_lock = threading.Lock()


def frontend_for(owner: Any, vllm_config: Any) -> FrontendSteering:
    """The FrontendSteering cached on ``owner`` (an InputProcessor), built on first use."""
    fe = getattr(owner, "_emosteer_frontend", None)
    if fe is None:
        with _lock:
            fe = getattr(owner, "_emosteer_frontend", None)
            if fe is None:
                fe = FrontendSteering(vllm_config)
                owner._emosteer_frontend = fe
    return fe
