"""Patch ``vllm.model_executor.layers.attention.attention.Attention.forward``.

Replaces: ``Attention.forward`` (returns the attention output ``[T, H*D]``, the input of
the model's ``o_proj``). The patched forward runs the original, then, on layers where
emosteer installed a site, calls the in-place custom op
``torch.ops.emosteer.head_affine_capture`` on the ``[T, H_local, D]`` view: per-token
head affine (add / patch / ablate / scale, vectors gathered from the head pool) and
capture of the pre-intervention heads; a layer whose flag is 0 this step returns at once.
Why: it is the one place every vLLM decoder exposes per-head outputs before ``o_proj``;
Python forward hooks are dropped by vLLM's compiled graphs, an in-place custom op is
kept (measured on vLLM 0.32). Modules without a site run the original code unchanged.
When it can go: when vLLM offers per-request activation hooks on attention outputs.
"""

from __future__ import annotations

import functools

import torch

from emosteer.vllm.patches import Swap

_swap: Swap | None = None


def _make(original):
    @functools.wraps(original)
    def forward(self, query, key, value, output_shape=None, output_dtype=None):
        out = original(self, query, key, value, output_shape, output_dtype)
        site = getattr(self, "_emosteer_site", None)
        if site is None:
            return out
        z = out.view(-1, self.num_heads, self.head_size_v)
        T = z.shape[0]
        torch.ops.emosteer.head_affine_capture(
            z, site.token_slot[:T], site.a, site.b, site.vrow, site.pool,
            site.cap_index[:T], site.cap_buf, site.flag, site.impl,
        )
        return out

    return forward


def apply() -> None:
    global _swap
    from vllm.model_executor.layers.attention.attention import Attention

    if _swap is None:
        _swap = Swap(Attention, "forward", _make)
    _swap.apply()


def revert() -> None:
    if _swap is not None:
        _swap.revert()
