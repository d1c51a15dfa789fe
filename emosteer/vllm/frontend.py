"""The front-end side: check request configs and set the prefix-cache salt.

Runs in the process that accepts requests (``vllm.LLM`` or the OpenAI server), through
the ``input_processor`` patch, before a request reaches the engine: a malformed config
raises ``SpecError`` (a ``ValueError``, so the server answers 400) naming the field.
Prefix caching: a config that changes the prompt's activations gets
``cache_salt = "emosteer:" + fingerprint`` (bank contents included), so it never reuses
KV computed under another config, and unsteered requests never reuse its KV. Captures at
every position (``positions: "all"``) do not read the prefix cache (cached prompt tokens
are never recomputed, so they could not be captured), n > 1 samples included.
"""

from __future__ import annotations

import threading
from typing import Any

from emosteer.bank import ModelInfo, VectorBank
from emosteer.spec import SpecError, SteerSpec
from emosteer.compile import compile_request
from emosteer.vllm.admission import GRANT_KEY, PLAN_KEY, Admission
from emosteer.vllm.config import capacity_for, settings_from_vllm_config

EXTRA_KEY = "emosteer"  # SamplingParams.extra_args key of the request config
RESULT_KEY = "emosteer_key"  # extra_args key under which the worker parks captures and errors
SAMPLES_KEY = "emosteer_n"  # extra_args: n > 1 samples, each with its own results
PRIVATE_KEYS = (PLAN_KEY, GRANT_KEY, SAMPLES_KEY)  # set by emosteer itself; refused from clients


def capture_rows_per_step(spec: SteerSpec, num_prompt_tokens: int | None, num_layers: int) -> int:
    """The most capture rows ``spec`` can fill in one engine step: captured layers times
    the captured tokens one step can hold (every prompt token for "all", else one)."""
    c = spec.capture
    if c is None:
        return 0
    layers = sum(num_layers if v == "all" else len(v) for v in (c.heads, c.residual) if v is not None)
    tokens = (num_prompt_tokens or 1) if c.positions == "all" else 1
    return layers * tokens


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

    def check(self, raw: Any, num_prompt_tokens: int | None = None, max_tokens: int | None = None) -> SteerSpec:
        """Parse + validate against the bank and the model; SpecError names the field."""
        spec = SteerSpec.parse(raw)
        spec.validate(self.bank, self.info, num_prompt_tokens, max_tokens)
        if spec.boost is not None:
            raise SpecError("boost", "attention boost (VEE) is not executed by the vLLM plugin yet")
        return spec.resolve(self.info)

    def plan(self, spec: SteerSpec, num_prompt_tokens: int | None = None) -> dict:
        """What the scheduler admits the request by: per phase (and position group) the
        slot fingerprint and the pool keys (``emosteer/compile.py``); SpecError if it
        could never fit."""
        plan = compile_request(spec, self.bank, self.info, num_prompt_tokens).to_plan(
            capture_rows_per_step(spec, num_prompt_tokens, self.info.num_layers)
        )
        why = Admission.fits(plan, self.capacity)
        if why is not None:
            raise SpecError("", why)
        return plan

    def salt(self, spec: SteerSpec, request_id: str) -> str | None:
        parts = []
        if spec.changes_prompt():
            parts.append("emosteer:" + spec.fingerprint(self.bank))
        return "|".join(parts) or None

    @staticmethod
    def skips_prefix_cache(spec: SteerSpec) -> bool:
        """Captures at every position must compute every prompt token: such a request
        never reads the prefix cache (its own KV is valid and may be cached for others)."""
        return spec.capture is not None and spec.capture.positions == "all"


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
