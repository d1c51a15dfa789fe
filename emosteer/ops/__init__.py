"""The fused steering operators: public API, argument checks and backend dispatch.

Each op exists as a torch reference (``reference.py``), a Triton kernel
(``triton/<op>.py``), a C++ CPU kernel and a CUDA kernel (``csrc/<op>/``; none for
``attn_image_boost``). All are registered as in-place torch custom ops
(``torch.ops.emosteer.*``) so that torch.compile and vLLM's compiled graphs keep them
as opaque calls. ``impl=None`` picks the best available: CUDA > Triton (GPU) > C++ CPU
> torch; ``impl="torch" | "triton" | "cpp" | "cuda"`` forces one, and the
``EMOSTEER_IMPL`` environment variable sets the default.
"""

from __future__ import annotations

from emosteer.ops._dispatch import (
    IMPLS,
    attn_image_boost,
    available_impls,
    head_affine_capture,
    neuron_gain,
    probe_gate,
    resolve_impl,
    residual_steer,
)

__all__ = [
    "IMPLS",
    "available_impls",
    "resolve_impl",
    "head_affine_capture",
    "residual_steer",
    "neuron_gain",
    "probe_gate",
    "attn_image_boost",
]
