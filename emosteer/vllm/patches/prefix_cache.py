"""Patch ``generate_block_hash_extra_keys`` (``vllm.v1.core.kv_cache_utils``): place
emosteer's prefix-cache salt at the first position a config can change.

Replaces: the function in ``kv_cache_utils`` and the names ``block_pool`` and
``simple_kv_offload.manager`` imported from it (each block's extra hash keys).
What it does: an intervening request's ``cache_salt`` carries a part
``"emosteer@<p>:<fingerprint>"`` (``SteerSpec.cache_salt``). vLLM mixes a cache salt into
the first block's hash only, and hashes chain, so a salted request shares no block with
anyone. Here that part is taken out of the first block (the rest of the salt, e.g. a
client's own ``cache_salt``, stays there) and mixed into the block holding position p
instead. Attention is causal, so the KV of every position before p is the unsteered
model's: those blocks are shared with unsteered requests and with every other config on
the same prompt (a full head-patching sweep at the last token computes the prompt once,
not once per head). The block holding p and every later one, generated blocks included,
get a new hash chain keyed by the config. Without this patch the whole salt lands in the
first block: nothing is shared, nothing is poisoned.
Why: vLLM has no per-position salt.
When it can go: when vLLM can salt a request's blocks from a given position on.
"""

from __future__ import annotations

from typing import Any

from emosteer.spec import SALT_PREFIX
from emosteer.vllm.patches import Swap

_swaps: list[Swap] = []


def split_salt(salt: str | None) -> tuple[str | None, int | None, str | None]:
    """``(rest of the salt or None, first affected position or None, emosteer part)``."""
    if not salt or SALT_PREFIX not in salt:
        return salt, None, None
    rest, ours = [], None
    for part in salt.split("|"):
        if ours is None and part.startswith(SALT_PREFIX):
            pos, _, _ = part[len(SALT_PREFIX):].partition(":")
            try:
                first = int(pos)
            except ValueError:  # not ours after all: keep it where vLLM puts it
                rest.append(part)
                continue
            ours = (first, part)
        else:
            rest.append(part)
    if ours is None:
        return salt, None, None
    return ("|".join(rest) or None), ours[0], ours[1]


class _SaltView:
    """The request as the original hasher sees it: only ``cache_salt`` differs."""

    __slots__ = ("_request", "cache_salt")

    def __init__(self, request: Any, cache_salt: str | None):
        self._request = request
        self.cache_salt = cache_salt

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def _make(original):
    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        rest, first, ours = split_salt(getattr(request, "cache_salt", None))
        if ours is None:
            return original(request, start_token_idx, end_token_idx, start_mm_idx)
        keys, mm_idx = original(_SaltView(request, rest), start_token_idx, end_token_idx, start_mm_idx)
        if start_token_idx <= first < end_token_idx:
            keys = (*(keys or ()), ("emosteer", ours))
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
