"""Patch ``vllm.v1.worker.gpu_model_runner.GPUModelRunner`` (also the CPU runner's base).

Runs in: each worker process (the model runner), at model load and around every step.
Upstream (vLLM 0.32.0): https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/v1/worker/gpu_model_runner.py

Replaces:
- ``load_model``: after the original, install emosteer on the model
  (``WorkerSteering``: buffers at fixed addresses, a site on every patched module),
  i.e. before the first forward, hence before any compile or CUDA-graph capture.
- ``execute_model``: first forget requests vLLM reports finished or aborted
  (``scheduler_output.finished_req_ids``) and park their captures for fetching; after
  the step, attach the requests the worker failed to the output (the scheduler patch
  finishes them with an error); ``sample_tokens`` likewise, for the steps where
  ``execute_model`` returns no output (vLLM then returns it from ``sample_tokens``).
- ``_model_forward``: before the original, write this step's per-token slots and
  capture indices from the runner's batch; after it, copy captured rows out. vLLM
  documents ``_model_forward`` as the override point for model execution.
Why: per-request state lives in the worker; these are the points where the batch
layout is final and the forward is about to run.
When it can go: when vLLM has a per-request intervention/metadata plugin interface.
"""

from __future__ import annotations

import functools
import logging

from emosteer.vllm.patches import Swap

logger = logging.getLogger("emosteer.vllm")
_swaps: list[Swap] = []


def install(runner) -> None:
    """Attach a WorkerSteering to ``runner`` once per loaded model."""
    from emosteer.vllm.worker import WorkerSteering

    model = runner.get_model()
    st = getattr(runner, "_emosteer", None)
    if st is not None and getattr(runner, "_emosteer_model", None) is model:
        return
    runner._emosteer = WorkerSteering(runner)
    runner._emosteer_model = model


def attach_failures(out, failed: dict[str, str]):
    """``out`` (what the runner returns for a step) carrying ``failed`` (request id ->
    message) to the scheduler as ``_emosteer_failed``, through every executor: the
    attribute is pickled with the output between processes; under async scheduling the
    runner returns a wrapper whose ``get_output()`` the executor sends instead, so the
    failures go onto that output; a shared object (vLLM's empty output) is never marked,
    a copy is."""
    import copy

    from vllm.v1.outputs import AsyncModelRunnerOutput

    if not failed:
        return out
    if isinstance(out, AsyncModelRunnerOutput):
        inner = out.get_output

        def get_output():
            return attach_failures(inner(), failed)

        out.get_output = get_output
        return out
    if not hasattr(out, "__dict__"):
        logger.error("emosteer: cannot attach failures to a %s; they go through the shared table "
                     "only", type(out).__name__)
        return out
    out = copy.copy(out)
    out._emosteer_failed = {**(getattr(out, "_emosteer_failed", None) or {}), **failed}
    return out


def _make_load_model(original):
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        install(self)
        return out

    return load_model


def _make_execute_model(original):
    @functools.wraps(original)
    def execute_model(self, scheduler_output, *args, **kwargs):
        st = getattr(self, "_emosteer", None)
        if st is not None and scheduler_output.finished_req_ids:
            st.finish_requests(scheduler_output.finished_req_ids)
        out = original(self, scheduler_output, *args, **kwargs)
        if st is not None and st.failed_now and out is not None:
            # Separate worker processes: the failures travel with the step's output.
            out = attach_failures(out, st.take_failed())
        return out

    return execute_model


def _make_sample_tokens(original):
    @functools.wraps(original)
    def sample_tokens(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        st = getattr(self, "_emosteer", None)
        if st is not None and st.failed_now and out is not None:
            out = attach_failures(out, st.take_failed())
        return out

    return sample_tokens


def _make_model_forward(original):
    @functools.wraps(original)
    def _model_forward(self, *args, **kwargs):
        st = getattr(self, "_emosteer", None)
        if st is None:
            return original(self, *args, **kwargs)
        try:
            st.prepare_step(self)
        except Exception:  # never take the engine down; requests are marked failed
            logger.exception("emosteer: preparing the step failed; this step runs without interventions")
            st.abandon_step(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            st.finish_step()

    return _model_forward


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not _swaps:
        _swaps.extend(
            [
                Swap(GPUModelRunner, "load_model", _make_load_model),
                Swap(GPUModelRunner, "execute_model", _make_execute_model),
                Swap(GPUModelRunner, "sample_tokens", _make_sample_tokens),
                Swap(GPUModelRunner, "_model_forward", _make_model_forward),
            ]
        )
    for s in _swaps:
        s.apply()


def revert() -> None:
    for s in reversed(_swaps):
        s.revert()
