"""emosteer: per-request steering, head patching and activation capture at serving speed.

The heavy parts load on first use: ``emosteer.LLM`` (the vLLM offline API) imports vLLM,
``SteerSpec`` and ``VectorBank`` import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "LLM": ("emosteer.llm", "LLM"),
    "EmosteerRequestError": ("emosteer.llm", "EmosteerRequestError"),
    "SteerSpec": ("emosteer.request.spec", "SteerSpec"),
    "SpecError": ("emosteer.request.spec", "SpecError"),
    "VectorBank": ("emosteer.request.bank", "VectorBank"),
    "ModelInfo": ("emosteer.request.bank", "ModelInfo"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'emosteer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
