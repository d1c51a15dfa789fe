"""The fused steering operators: public API, argument checks and backend dispatch.

Each op exists as a torch reference (``reference.py``), a Triton kernel, a C++ CPU
kernel and a CUDA kernel (``csrc/``). All are registered as in-place torch custom ops
(``torch.ops.emosteer.*``) so that torch.compile and vLLM's compiled graphs keep them
as opaque calls. ``impl=None`` picks the best available: CUDA > Triton (GPU) > C++ CPU
> torch; ``impl="torch" | "triton" | "cpp" | "cuda"`` forces one, and the
``EMOSTEER_IMPL`` environment variable sets the default.
"""

from __future__ import annotations

# The Triton modules share their names with public ops (``residual_add``,
# ``neuron_gain``). Importing ``emosteer.ops.residual_add`` binds the *module* to the
# package attribute ``residual_add`` the first time it is loaded, so load them before
# the public functions are bound below; later imports hit sys.modules and bind nothing.
try:
    from emosteer.ops import head_affine as _head_affine  # noqa: F401
    from emosteer.ops import neuron_gain as _neuron_gain  # noqa: F401
    from emosteer.ops import residual_add as _residual_add  # noqa: F401
    from emosteer.ops import attn_boost as _attn_boost  # noqa: F401
except ImportError:  # no Triton: the modules can never be imported, nothing to shadow
    pass

from emosteer.ops._dispatch import (
    IMPLS,
    attn_image_boost,
    available_impls,
    head_affine_capture,
    neuron_gain,
    resolve_impl,
    residual_add,
)

__all__ = [
    "IMPLS",
    "available_impls",
    "resolve_impl",
    "head_affine_capture",
    "residual_add",
    "neuron_gain",
    "attn_image_boost",
]
