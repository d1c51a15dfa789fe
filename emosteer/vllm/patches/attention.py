"""Patch ``vllm.model_executor.layers.attention.attention.Attention.forward``.

Runs in: each worker process, inside the model's forward (in the compiled graph).
Upstream (vLLM 0.32.0): https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/model_executor/layers/attention/attention.py

Replaces: ``Attention.forward`` (returns the attention output ``[T, H*D]``, the input of
the model's ``o_proj``). The patched forward runs the original, then, on layers where
emosteer installed a site:

1. where the engine's attention can be read (``site.vee``), the in-place custom op
   ``torch.ops.emosteer.vllm_vee``: VEE (attention to image keys boosted per request and
   head) and the attention-to-image capture, recomputed from vLLM's paged KV cache for
   the (token, head) pairs that ask for it (``emosteer.ops.attn_image_boost``); every
   other pair keeps vLLM's own output bit for bit, and a layer with nothing to do this
   step returns before touching anything;
2. ``head_affine_capture`` on the ``[T, H_local, D]`` view: per-token
   head affine (add / patch / ablate / scale, vectors gathered from the head pool) and
   capture of the heads before that affine (after VEE); a layer whose flag is 0 this
   step returns at once.

Why: it is the one place every vLLM decoder exposes per-head outputs before ``o_proj``,
and the queries after rotary embedding; Python forward hooks are dropped by vLLM's
compiled graphs, an in-place custom op is kept (measured on vLLM 0.32). vLLM's CPU
attention is a C++ op without a per-key bias, and its paged kernels never form the
attention weights, so the boosted rows are recomputed here (only on active layers, only
for the tokens that ask). Modules without a site run the original code unchanged.
When it can go: when vLLM's attention takes a per-request, per-head key bias and can
return the attention mass on a key range.
"""

from __future__ import annotations

import functools

import torch

from emosteer.vllm.patches import Swap

_swap: Swap | None = None


def cache_views(backend: str, kv_cache: torch.Tensor, num_kv_heads: int, head_size: int):
    """(key_cache, value_cache) as ``[NB, BS, KVH, D]`` strided views of the layer's KV
    cache, or None for a layout emosteer does not know.

    CPU_ATTN (isa "vec" / "vec16"): ``[NB, KVH, BS, 2*D]`` holding, per block and KV
    head, the keys transposed (``[D, BS]``) and then the values (``[BS, D]``).
    FLASH_ATTN: ``[2, NB, BS, KVH, D]``. TRITON_ATTN: ``[NB, 2, BS, KVH, D]``."""
    if backend == "CPU_ATTN":
        if kv_cache.dim() != 4 or not kv_cache.is_contiguous():
            return None
        NB, KVH, BS, two_d = kv_cache.shape
        D = two_d // 2
        if KVH != num_kv_heads or D != head_size:
            return None
        off = kv_cache.storage_offset()
        blk, hd = KVH * 2 * BS * D, 2 * BS * D
        key = kv_cache.as_strided((NB, BS, KVH, D), (blk, 1, hd, BS), off)
        value = kv_cache.as_strided((NB, BS, KVH, D), (blk, D, hd, 1), off + BS * D)
        return key, value
    if backend == "FLASH_ATTN" and kv_cache.dim() == 5 and kv_cache.shape[0] == 2:
        return kv_cache[0], kv_cache[1]
    if backend == "TRITON_ATTN" and kv_cache.dim() == 5 and kv_cache.shape[1] == 2:
        return kv_cache[:, 0], kv_cache[:, 1]
    return None


# layer name -> its site, for the op's early return (a step without VEE work costs one
# dict lookup per layer, not a forward-context lookup). Filled by the worker.
SITES: dict = {}


def _vee(out: torch.Tensor, query: torch.Tensor, layer_name: str) -> None:
    site = SITES.get(layer_name)
    if site is None or not (site.host_on or site.graph_safe):
        return
    from vllm.model_executor.layers.attention.attention import get_attention_context

    from emosteer.ops._dispatch import backend_fn

    attn_metadata, layer, kv_cache, _ = get_attention_context(layer_name)
    if attn_metadata is None:
        return
    views = cache_views(site.backend, kv_cache, layer.num_kv_heads, layer.head_size)
    if views is None:  # checked at load time; a changed cache is an engine bug
        raise RuntimeError(f"emosteer: cannot read the KV cache of {layer_name} ({site.backend})")
    T = out.shape[0]
    backend_fn(site.attn_impl, "attn_image_boost")(
        out, query, views[0], views[1], attn_metadata.block_table, site.token_row[:T],
        site.token_pos[:T], site.token_slot[:T], site.beta, site.bmode, site.spans,
        site.mass_cap[:T], site.mass_buf, site.sm_scale, site.attn_flag,
    )


@torch.library.custom_op("emosteer::vllm_vee", mutates_args=("out",))
def vllm_vee(out: torch.Tensor, query: torch.Tensor, layer_name: str) -> None:
    """VEE + attention-to-image capture of one vLLM attention layer, in place on its
    output ``out`` ``[T, H, D]``; the site's buffers and the KV cache are found through
    the layer name (like vLLM's own attention op)."""
    _vee(out, query, layer_name)


@vllm_vee.register_fake
def _(out, query, layer_name) -> None:
    return None


def _make(original):
    @functools.wraps(original)
    def forward(self, query, key, value, output_shape=None, output_dtype=None):
        out = original(self, query, key, value, output_shape, output_dtype)
        site = getattr(self, "_emosteer_site", None)
        if site is None:
            return out
        z = out.view(-1, self.num_heads, self.head_size_v)
        T = z.shape[0]
        if site.vee:
            torch.ops.emosteer.vllm_vee(z, query.view(T, self.num_heads, self.head_size), self.layer_name)
        site.head_affine_capture(
            z, site.token_slot[:T], site.a, site.b, site.c, site.vrow, site.row_off[:T], site.pool,
            site.cap_index[:T], site.cap_buf, site.flag,
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
