"""Patch ``vllm.v1.worker.worker_base.WorkerBase``: add the method ``emosteer_rpc``.

Adds (replaces nothing): ``WorkerBase.emosteer_rpc(op, payload)``, reached with
``LLM.collective_rpc("emosteer_rpc", args=(op, payload))``. Ops: ``"register"``
(payload: a bank file's bytes) -> list of names; ``"remove"`` (payload: names) ->
names removed; ``"fetch"`` (payload: request keys)
-> {key: {"error", "positions", "tensors": safetensors bytes}}; ``"status"`` -> dict.
Arguments and results are plain (str, bytes, lists, dicts): a method name needs no
pickled callables (``VLLM_ALLOW_INSECURE_SERIALIZATION``) and no torch objects cross
the wire (a returned ``torch.Size`` hangs the client).
Why: the bank and the captures live in the workers.
When it can go: when vLLM offers plugin-defined worker RPCs.
"""

from __future__ import annotations

from emosteer.vllm.patches import Swap

_swap: Swap | None = None


def emosteer_rpc(self, op: str, payload=None):
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
    raise ValueError(f"unknown emosteer_rpc op {op!r}; expected register, remove, fetch or status")


def apply() -> None:
    global _swap
    from vllm.v1.worker.worker_base import WorkerBase

    if _swap is None:
        _swap = Swap(WorkerBase, "emosteer_rpc", lambda _orig: emosteer_rpc)
    _swap.apply()


def revert() -> None:
    if _swap is not None:
        _swap.revert()
