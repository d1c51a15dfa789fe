"""Patch ``vllm.envs.compile_factors``: add emosteer's code hash to the compile-cache key.

Runs in: each worker process, when the model is compiled.
Upstream (vLLM 0.32.0): https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/envs.py

Replaces: ``compile_factors()`` (env vars hashed into the torch.compile cache key, both
the AOT artifact key in ``compilation/caching.py`` and the inductor cache dir in
``compilation/backends.py``).
Why: vLLM reloads compiled graphs from disk keyed by config + env, and its source check
only compares the files a cached artifact lists. A graph compiled before the plugin was
installed (or with older patch code) lists none of our files and would be reloaded
without the ops, silently dropping every intervention. The salt makes such graphs miss.
When it can go: when vLLM offers a plugin hook for compile-cache factors.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from emosteer.vllm.patches import Swap

_swap: Swap | None = None


@functools.lru_cache(maxsize=None)
def emosteer_code_hash() -> str:
    """sha256 over the plugin and op-dispatch sources that end up inside graphs."""
    import emosteer

    root = Path(emosteer.__file__).parent
    files = sorted((root / "vllm").rglob("*.py")) + [root / "ops" / "_dispatch.py"]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _make(original):
    @functools.wraps(original)
    def compile_factors():
        factors = dict(original())
        factors["EMOSTEER_PLUGIN"] = emosteer_code_hash()
        return factors

    compile_factors._emosteer_original = original
    return compile_factors


def apply() -> None:
    global _swap
    import vllm.envs as envs

    if _swap is None:
        _swap = Swap(envs, "compile_factors", _make)
    _swap.apply()


def revert() -> None:
    if _swap is not None:
        _swap.revert()
