"""The plugin's patches to vLLM 0.32 internals, one module per patched target.

Every module has a header (what it replaces, why, when it can go), ``apply()`` and
``revert()``. ``apply_all`` runs them in order; both are idempotent. The patched
functions keep vLLM's behaviour bit for bit when emosteer is not installed on a module
(no ``_emosteer_site`` attribute) and when no request asks for anything (slot -1).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

PATCHES = (
    "envs",  # compile-cache salt: graphs with and without the ops never mix
    "attention",  # Attention.forward: head affine + capture on the o_proj input
    "layernorm",  # RMSNorm.forward: residual steering + residual capture
    "activation",  # SiluAndMul.forward: neuron gain
    "gpu_model_runner",  # install buffers after load, per-step metadata, slot release
    "cpu_model_runner",  # the same install hook for the CPU runner's own load_model
    "worker_base",  # emosteer_rpc: bank registration and capture fetch
    "input_processor",  # request validation, admission plan, prefix-cache salt (front end)
    "prefix_cache",  # the config's salt goes into the block of its first affected position
    "scheduler",  # admission: a request waits for its slots; worker failures -> errors
    "serving_errors",  # HTTP error body names emosteer when it stopped a request
)


def _module(name: str):
    return importlib.import_module(f"emosteer.vllm.patches.{name}")


def apply_all() -> None:
    for name in PATCHES:
        _module(name).apply()


def revert_all() -> None:
    for name in reversed(PATCHES):
        _module(name).revert()


class Swap:
    """Replace ``owner.attr`` with a new value and put the original back on revert.

    ``new`` is built from the original (``make(original) -> replacement``), so a
    replacement can call through. Idempotent: applying twice keeps one layer.
    """

    def __init__(self, owner: Any, attr: str, make: Callable[[Any], Any]):
        self.owner, self.attr, self.make = owner, attr, make
        self.original: Any = None
        self.applied = False

    def apply(self) -> None:
        if self.applied:
            return
        self.original = self.owner.__dict__.get(self.attr, _MISSING)
        current = getattr(self.owner, self.attr, None)
        new = self.make(current)
        setattr(self.owner, self.attr, new)
        self.applied = True

    def revert(self) -> None:
        if not self.applied:
            return
        if self.original is _MISSING:
            delattr(self.owner, self.attr)
        else:
            setattr(self.owner, self.attr, self.original)
        self.applied = False


_MISSING = object()
