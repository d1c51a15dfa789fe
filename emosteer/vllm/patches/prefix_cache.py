"""Patch ``generate_block_hash_extra_keys`` (``vllm.v1.core.kv_cache_utils``): key every
KV block by the interventions applied at its positions.

Runs in: the engine-core process (block hashes are computed when a request enters the scheduler).
Upstream (vLLM 0.32.0): https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/v1/core/kv_cache_utils.py

Replaces: the function in ``kv_cache_utils`` and the names ``block_pool`` and
``simple_kv_offload.manager`` imported from it (each block's extra hash keys).
What it does: a steered request carries its *cache identity* in its admission plan
(``SamplingParams.extra_args["emosteer_plan"]["cache"]``, written by the front end from
the compiled program; clients cannot set that key). For each block ``[start, end)`` the
hasher appends ``("emosteer", emosteer.request.positions.block_identity(identity, start, end))``:
the program in effect at every position of the block. Blocks whose positions are all
unsteered get no key and stay shared with everyone (attention is causal: the KV before
the first steered position is the plain model's); a block is reused only by a request
that applied exactly the same interventions at each of its positions. vLLM chains block
hashes, so a block's hash also covers every earlier position. docs/DESIGN.md §4 has the
rule and a table of what each position kind shares.
A client's ``cache_salt`` is vLLM's own business (mixed into the first block, as tagged
``("cache_salt", salt)``); it can never equal an ``("emosteer", ...)`` key, and the front
end refuses salts that contain the reserved prefix ``emosteer@``.
Why: vLLM has no per-position cache key.
When it can go: when vLLM lets a plugin add per-block hash keys.
"""

from __future__ import annotations

from typing import Any

from emosteer.request.positions import block_identity
from emosteer.vllm.patches import Swap

_swaps: list[Swap] = []
TAG = "emosteer"


def identity_of(request: Any) -> dict | None:
    """The cache identity in ``request``'s admission plan (None for plain requests)."""
    sp = getattr(request, "sampling_params", None)
    extra = getattr(sp, "extra_args", None) if sp is not None else None
    if not extra:
        return None
    plan = extra.get("emosteer_plan")
    ident = plan.get("cache") if isinstance(plan, dict) else None
    if ident is not None and ident.get("P", -1) < 0:  # prompt length unknown to the front end
        ident = {**ident, "P": int(getattr(request, "num_prompt_tokens", 0))}
    return ident


def _make(original):
    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, mm_idx = original(request, start_token_idx, end_token_idx, start_mm_idx)
        ident = identity_of(request)
        if ident is None:
            return keys, mm_idx
        ours = block_identity(ident, start_token_idx, end_token_idx)
        if ours is not None:
            keys = (*(keys or ()), (TAG, ours))
        return keys, mm_idx

    return generate_block_hash_extra_keys


def apply() -> None:
    import importlib

    from vllm.v1.core import kv_cache_utils

    if _swaps:
        for s in _swaps:
            s.apply()
        return
    new = _make(kv_cache_utils.generate_block_hash_extra_keys)
    owners = [kv_cache_utils]
    for mod in ("vllm.v1.core.block_pool", "vllm.v1.simple_kv_offload.manager"):
        try:
            m = importlib.import_module(mod)
        except Exception:  # an optional part of vLLM that is not importable here
            continue
        if hasattr(m, "generate_block_hash_extra_keys"):
            owners.append(m)
    for owner in owners:
        s = Swap(owner, "generate_block_hash_extra_keys", lambda _orig: new)
        s.apply()
        _swaps.append(s)


def revert() -> None:
    for s in reversed(_swaps):
        s.revert()
