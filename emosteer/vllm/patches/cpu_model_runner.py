"""Patch ``vllm.v1.worker.cpu_model_runner.CPUModelRunner.load_model``.

Runs in: each worker process (the CPU model runner), once at model load.
Upstream (vLLM 0.32.0): https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/v1/worker/cpu_model_runner.py

Replaces: the CPU runner's own ``load_model`` (it does not call the GPU runner's), to
install emosteer on the loaded model exactly as ``patches/gpu_model_runner.py`` does.
Why: the CPU runner overrides ``load_model``; everything else it inherits.
When it can go: with the GPU runner patch.
"""

from __future__ import annotations

from emosteer.vllm.patches import Swap
from emosteer.vllm.patches.gpu_model_runner import _make_load_model

_swap: Swap | None = None


def apply() -> None:
    global _swap
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # GPU-only builds may lack CPU pieces
        return
    if _swap is None:
        _swap = Swap(CPUModelRunner, "load_model", _make_load_model)
    _swap.apply()


def revert() -> None:
    if _swap is not None:
        _swap.revert()
