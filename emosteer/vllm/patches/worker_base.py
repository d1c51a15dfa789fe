"""Patch ``vllm.v1.worker.worker_base.WorkerBase``: add the method ``emosteer_rpc``.

Runs in: each worker process, on the engine core's collective RPC.
Upstream (vLLM 0.32.0): https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/v1/worker/worker_base.py

Adds (replaces nothing): ``WorkerBase.emosteer_rpc(op, payload)``, reached with
``LLM.collective_rpc("emosteer_rpc", args=(op, payload))``. Ops: ``"ready"`` -> ``{"ok", "why"}`` (the
start-up handshake, ``patches/scheduler.py``); ``"register"``
(payload: a bank file's bytes) -> list of names; ``"remove"`` (payload: names) ->
names removed; ``"fetch"`` (payload: request keys)
-> {key: {"error", "positions", "tensors": safetensors bytes}}; ``"status"`` -> dict;
``"memory"`` -> where the worker's memory is (``worker/memory.py``).
Arguments and results are plain (str, bytes, lists, dicts): a method name needs no
pickled callables (``VLLM_ALLOW_INSECURE_SERIALIZATION``) and no torch objects cross
the wire (a returned ``torch.Size`` hangs the client).
Why: the bank and the captures live in the workers.
When it can go: when vLLM offers plugin-defined worker RPCs.
"""

from __future__ import annotations

from emosteer.vllm.patches import Swap

_swap: Swap | None = None


def ready(worker) -> dict:
    """The start-up handshake's answer: does this worker's model runner carry emosteer's
    hooks (``patches/gpu_model_runner.py`` installs them when the model loads)?"""
    runner = getattr(worker, "model_runner", None)
    if getattr(runner, "_emosteer", None) is not None:
        return {"ok": True, "runner": type(runner).__name__}
    name = f"{type(runner).__module__}.{type(runner).__name__}" if runner is not None else "none"
    why = f"the worker's model runner ({name}) carries no emosteer hooks"
    if getattr(worker, "use_v2_model_runner", False) or ".worker.gpu." in name:
        why += (" (it is vLLM's Model Runner V2, which emosteer does not patch: leave "
                "VLLM_USE_V2_MODEL_RUNNER unset, emosteer then selects V1, or set it to 0)")
    return {"ok": False, "why": why}


def emosteer_rpc(self, op: str, payload=None):
    if op == "ready":
        return ready(self)
    runner = getattr(self, "model_runner", None)
    st = getattr(runner, "_emosteer", None)
    if st is None:
        raise RuntimeError("emosteer is not installed in this worker (was the plugin loaded?)")
    if op == "register":
        return st.register_bank_bytes(bytes(payload))
    if op == "remove":
        return st.remove_vectors([str(n) for n in payload])
    if op == "fetch":
        return st.fetch([str(k) for k in payload])
    if op == "status":
        return st.status()
    if op == "memory":
        from emosteer.vllm.worker.memory import memory_report

        return memory_report(top=40)
    raise ValueError(f"unknown emosteer_rpc op {op!r}; expected register, remove, fetch, status "
                     "or memory")


def apply() -> None:
    global _swap
    from vllm.v1.worker.worker_base import WorkerBase

    if _swap is None:
        _swap = Swap(WorkerBase, "emosteer_rpc", lambda _orig: emosteer_rpc)
    _swap.apply()


def revert() -> None:
    if _swap is not None:
        _swap.revert()
