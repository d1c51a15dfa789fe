"""Pick the compiled or the interpreted form of a Triton kernel by the tensors' device.

``@triton.jit`` decides once, at import, from ``TRITON_INTERPRET``: a process that
imported emosteer before setting it (or a test that sets it only while it runs) would
otherwise hold kernels of the wrong kind. The launchers instead take the kernel's Python
function and build the compiled ``JITFunction`` for CUDA tensors and the CPU
``InterpretedFunction`` for anything else. For this to work whatever the import-time
setting, the kernels call only Triton builtins (``tl.load``, ``tl.where`` …), never
library functions that are themselves ``@triton.jit`` (``tl.sum``, ``tl.zeros``,
``tl.cdiv``): those are frozen in one form when ``triton.language`` is imported.
"""

from __future__ import annotations

import functools

import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


@functools.lru_cache(maxsize=None)
def _twin(fn, interpret: bool):
    return InterpretedFunction(fn) if interpret else JITFunction(fn)


def for_device(kernel, device: torch.device):
    """``kernel`` (a ``@triton.jit`` object) as it must run on ``device``."""
    return _twin(kernel.fn, device.type != "cuda")


# Launch options for every kernel: no FMA contraction, so ``a*z + b*v`` rounds like the
# torch reference and the C++ twins (two products and a sum); the ops are memory bound,
# FMA would buy nothing but 1-ulp disagreements between implementations.
LAUNCH_OPTIONS = dict(enable_fp_fusion=False)


__all__ = ["for_device", "LAUNCH_OPTIONS"]
