"""Patch ``vllm.v1.core.sched.scheduler.Scheduler``: admission of steered requests.

Runs in: the engine-core process (the scheduler and ``EngineCore`` itself).
Upstream (vLLM 0.32.0): https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/v1/core/sched/scheduler.py
and https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/v1/engine/core.py

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
- ``EngineCore.__init__`` (or, where the plugin loads inside it, as in a spawned
  engine-core process, ``EngineCoreProc.run_busy_loop`` and ``add_request``): the
  start-up handshake: every worker is
  asked (``emosteer_rpc("ready")``) whether its model runner carries emosteer's hooks,
  and the engine's settings are checked for features the plugin does not handle
  (``unsupported_engine``). Until the handshake succeeds no steered request is admitted:
  each is finished with an error naming the cause (fail closed); plain requests serve.
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
        from emosteer.request.bank import ModelInfo
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
        if adm.refusal is not None:
            adm.refuse(request.request_id)  # finished with the error at the next update
            return False
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
        adm = getattr(self, "_emosteer", None)
        if adm is not None:
            failures.update(adm.take_refused())
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


def unsupported_engine(vllm_config) -> str | None:
    """The first engine setting the plugin does not handle (steered requests are then
    refused; plain ones serve), or None."""
    pc = vllm_config.parallel_config
    checks = [
        (vllm_config.speculative_config is not None,
         "speculative decoding (speculative_config): draft tokens would run through the "
         "steered layers and be captured"),
        (int(getattr(pc, "pipeline_parallel_size", 1) or 1) > 1,
         "pipeline parallelism (pipeline_parallel_size > 1)"),
        (int(getattr(pc, "data_parallel_size", 1) or 1) > 1,
         "data parallelism (data_parallel_size > 1): each engine would keep its own slots"),
        (bool(getattr(pc, "enable_dbo", False)) or bool(getattr(pc, "use_ubatching", False)),
         "dual-batch overlap / micro-batching (enable_dbo): each micro-batch would index the "
         "per-token slots from 0"),
        (getattr(vllm_config, "kv_transfer_config", None) is not None,
         "KV transfer / disaggregated prefill (kv_transfer_config): KV computed by another "
         "engine never had the config applied"),
        (getattr(vllm_config, "ec_transfer_config", None) is not None,
         "encoder-cache transfer (ec_transfer_config)"),
    ]
    for bad, what in checks:
        if bad:
            return f"this engine runs with {what}, which emosteer does not support"
    return None


def handshake(engine_core) -> str | None:
    """Why steered requests must be refused in this engine, or None when the engine's
    settings are supported and every worker's model runner carries emosteer's hooks."""
    why = unsupported_engine(engine_core.vllm_config)
    if why is not None:
        return why
    try:
        replies = engine_core.model_executor.collective_rpc("emosteer_rpc", args=("ready",))
    except Exception as e:  # a worker process without the plugin, or a failed RPC
        return f"a worker did not answer emosteer's start-up handshake ({type(e).__name__}: {e})"
    if not replies:
        return "no worker answered emosteer's start-up handshake"
    for i, reply in enumerate(replies):
        if not isinstance(reply, dict) or not reply.get("ok"):
            why = reply.get("why") if isinstance(reply, dict) else repr(reply)
            return f"worker {i}: {why}"
    return None


def ensure_handshake(engine_core) -> None:
    """Run the start-up handshake once per engine (at the end of ``EngineCore.__init__``,
    or at its first request where the plugin loaded inside that ``__init__``, as in a
    spawned engine-core process)."""
    adm = getattr(getattr(engine_core, "scheduler", None), "_emosteer", None)
    if adm is None or adm.handshake_done:
        return
    from emosteer.vllm import engine_logger

    why = handshake(engine_core)
    adm.set_ready(why)
    if why is None:
        engine_logger().info("emosteer: every worker carries emosteer's hooks; steered requests are served")
    else:
        engine_logger().error("emosteer: steered requests will be REFUSED by this engine (plain ones "
                     "are served): %s", why)


def _make_engine_init(original):
    @functools.wraps(original)
    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        ensure_handshake(self)

    return __init__


def _make_busy_loop(original):
    @functools.wraps(original)
    def run_busy_loop(self, *args, **kwargs):
        ensure_handshake(self)  # a spawned engine core: right after start-up, before requests
        return original(self, *args, **kwargs)

    return run_busy_loop


def _make_add_request(original):
    @functools.wraps(original)
    def add_request(self, request, *args, **kwargs):
        ensure_handshake(self)
        return original(self, request, *args, **kwargs)

    return add_request


def emosteer_status(self) -> dict | None:
    """Added to ``EngineCore``: the admission state (client: ``call_utility``)."""
    adm = getattr(getattr(self, "scheduler", None), "_emosteer", None)
    return adm.status() if adm is not None else None


def apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore, EngineCoreProc

    if not _swaps:
        _swaps.extend(
            [
                Swap(Scheduler, "__init__", _make_init),
                Swap(Scheduler, "_handle_blocked_waiting_request", _make_blocked),
                Swap(Scheduler, "_free_request", _make_free),
                Swap(Scheduler, "update_from_output", _make_update),
                Swap(EngineCore, "__init__", _make_engine_init),
                Swap(EngineCore, "add_request", _make_add_request),
                Swap(EngineCoreProc, "run_busy_loop", _make_busy_loop),
                Swap(EngineCore, "emosteer_status", lambda _orig: emosteer_status),
            ]
        )
    for s in _swaps:
        s.apply()


def revert() -> None:
    for s in reversed(_swaps):
        s.revert()
