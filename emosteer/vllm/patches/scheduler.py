"""Patch ``vllm.v1.core.sched.scheduler.Scheduler``: admission of steered requests.

Replaces (each calls through to vLLM's own code):
- ``__init__``: after the original, attach an ``Admission`` (``emosteer/vllm/admission.py``)
  sized from the plugin settings, the model and the tensor-parallel size.
- ``_handle_blocked_waiting_request``: vLLM asks it, for every waiting request it is about
  to schedule, whether to proceed. After vLLM's own answer, a request carrying an
  emosteer plan proceeds only if it holds (or now gets) its slots and pool rows; else it
  is skipped for this step and stays waiting, exactly like a request whose LoRA would
  exceed ``max_loras``. On admission the grant is written into a private copy of the
  request's ``SamplingParams.extra_args``, which the worker reads.
- ``_free_request``: after the original, the request's slot holds are released.
- ``update_from_output``: before the original, requests a worker reported it could not
  apply are finished with ``FINISHED_ERROR`` (the client gets an error, never the
  unsteered text) and their KV blocks are evicted from the prefix cache so nobody reuses
  them; vLLM then skips their sampled tokens.
Why: admission must happen where vLLM decides what runs; the worker can only apply or
refuse, and by then the request is already in the batch.
Adds ``EngineCore.emosteer_status()`` (slots, pool rows, waiting requests), reached from a
client with ``engine_core.call_utility("emosteer_status")``.
When it can go: when vLLM's scheduler offers an admission hook for per-request resources.
"""

from __future__ import annotations

import copy
import functools
import logging

from emosteer.vllm.patches import Swap

logger = logging.getLogger("emosteer.vllm")
_swaps: list[Swap] = []


def _plan_of(request):
    from emosteer.vllm.admission import PLAN_KEY

    sp = getattr(request, "sampling_params", None)
    extra = getattr(sp, "extra_args", None) if sp is not None else None
    if not extra:
        return None
    return extra.get(PLAN_KEY)


def _make_init(original):
    @functools.wraps(original)
    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        from emosteer.bank import ModelInfo
        from emosteer.vllm.admission import Admission
        from emosteer.vllm.config import capacity_for, settings_from_vllm_config

        settings = settings_from_vllm_config(vllm_config)
        info = ModelInfo.from_hf_config(vllm_config.model_config.hf_config)
        tp = vllm_config.parallel_config.tensor_parallel_size
        self._emosteer = Admission(capacity_for(settings, info, vllm_config.model_config.dtype, tp))

    return __init__


def _make_blocked(original):
    @functools.wraps(original)
    def _handle_blocked_waiting_request(self, request):
        ok = original(self, request)
        adm = getattr(self, "_emosteer", None)
        if not ok or adm is None:
            return ok
        plan = _plan_of(request)
        if not plan:
            return True
        grant = adm.try_admit(request.request_id, plan)
        if grant is None:
            return False  # stays waiting until a slot (or pool rows) frees
        from emosteer.vllm.admission import GRANT_KEY

        sp = request.sampling_params
        if sp.extra_args.get(GRANT_KEY) != grant:
            # A private copy: SamplingParams objects may be shared between requests.
            sp = copy.copy(sp)
            sp.extra_args = {**sp.extra_args, GRANT_KEY: grant}
            request.sampling_params = sp
        return True

    return _handle_blocked_waiting_request


def _make_free(original):
    @functools.wraps(original)
    def _free_request(self, request, *args, **kwargs):
        out = original(self, request, *args, **kwargs)
        adm = getattr(self, "_emosteer", None)
        if adm is not None:
            adm.release(request.request_id)
        return out

    return _free_request


def fail_requests(scheduler, failures: dict[str, str]) -> list:
    """Finish ``failures`` (request id -> message) with FINISHED_ERROR, evicting their
    KV blocks from the prefix cache first; returns the EngineCoreOutputs to send."""
    from vllm.v1.engine import EngineCoreOutput
    from vllm.v1.request import RequestStatus

    live = [rid for rid in failures if rid in scheduler.requests and not scheduler.requests[rid].is_finished()]
    if not live:
        return []
    blocks: set[int] = set()
    for rid in live:
        try:
            for group in scheduler.kv_cache_manager.get_block_ids(rid):
                blocks.update(group)
        except Exception:  # a request that holds no blocks yet
            pass
    done = scheduler.finish_requests(live, RequestStatus.FINISHED_ERROR)
    if blocks:
        scheduler.kv_cache_manager.evict_blocks(blocks)
    outs = []
    for request in done:
        logger.error("emosteer: request %s failed: %s", request.request_id, failures[request.request_id])
        outs.append(
            (
                request.client_index,
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=[],
                    finish_reason=request.get_finished_reason(),
                    stop_reason="emosteer: " + failures[request.request_id],
                    events=request.take_events(),
                    trace_headers=request.trace_headers,
                ),
            )
        )
    return outs


def _make_update(original):
    @functools.wraps(original)
    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        from emosteer.vllm.admission import take_failures

        failures = take_failures()
        extra = getattr(model_runner_output, "_emosteer_failed", None)
        if extra:
            failures.update(extra)
        outs = fail_requests(self, failures) if failures else []
        result = original(self, scheduler_output, model_runner_output, *args, **kwargs)
        if outs:
            from vllm.v1.engine import EngineCoreOutputs

            for client, eco in outs:
                if client not in result:
                    result[client] = EngineCoreOutputs()
                result[client].outputs.append(eco)
        return result

    return update_from_output


def emosteer_status(self) -> dict | None:
    """Added to ``EngineCore``: the admission state (client: ``call_utility``)."""
    adm = getattr(getattr(self, "scheduler", None), "_emosteer", None)
    return adm.status() if adm is not None else None


def apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore

    if not _swaps:
        _swaps.extend(
            [
                Swap(Scheduler, "__init__", _make_init),
                Swap(Scheduler, "_handle_blocked_waiting_request", _make_blocked),
                Swap(Scheduler, "_free_request", _make_free),
                Swap(Scheduler, "update_from_output", _make_update),
                Swap(EngineCore, "emosteer_status", lambda _orig: emosteer_status),
            ]
        )
    for s in _swaps:
        s.apply()


def revert() -> None:
    for s in reversed(_swaps):
        s.revert()
