"""What the worker finds on the loaded model: the decoder layers, the op implementation,
image spans of a request, and whether the attention can take VEE.

Runs in each worker process (vLLM's GPU / CPU model runner), once at load time except
``image_spans`` (once per request).
"""

from __future__ import annotations

from typing import Any

import torch

from emosteer.models.decoder import find_layer_list
from emosteer.vllm.patches import attention as attention_patch


def decoder_layers(model: torch.nn.Module, num_layers: int):
    """(layers ModuleList, its parent) of the text decoder: the longest list of blocks
    holding vLLM ``Attention`` modules (``emosteer/models/decoder.py``)."""
    from vllm.model_executor.layers.attention.attention import Attention

    found = find_layer_list(model, lambda blk: any(isinstance(m, Attention) for m in blk.modules()),
                            length=num_layers)
    if found is None:
        raise RuntimeError(f"emosteer: found no decoder layer list of {num_layers} layers in {type(model).__name__}")
    return found[1], found[2]


def pick_impl(forced: str | None, device: torch.device, op: str | None = None) -> str:
    """The op implementation for the engine (of ``op``, or of every core op). The
    interpreted Triton path (CPU with TRITON_INTERPRET set) is test-only; an engine never
    picks it unless forced."""
    from emosteer.ops import available_impls, resolve_impl

    if forced:
        return resolve_impl(forced, device, op)
    avail = [i for i in available_impls(device, op) if not (device.type == "cpu" and i == "triton")]
    return avail[0]


def image_spans(cached: Any) -> list[tuple[int, int]]:
    """Key spans ``[start, end)`` of the prompt's image (and video) placeholder tokens,
    in prompt order, from vLLM's multimodal feature specs."""
    out = []
    for f in getattr(cached, "mm_features", None) or ():
        if getattr(f, "modality", None) in ("image", "video"):
            p = f.mm_position
            out.append((int(p.offset), int(p.offset + p.length)))
    return sorted(out)


def vee_unsupported(runner: Any, attns: dict) -> str | None:
    """Why this engine's attention cannot take VEE / attention-to-image captures, or
    None when it can: emosteer must be able to read the paged KV cache (a layout it
    knows, checked by a probe on the CPU) and the attention must be plain causal
    softmax (no sliding window, soft cap, ALiBi or sinks)."""
    if not attns:
        return "the decoder layers hold no vLLM Attention module"
    m0 = next(iter(attns.values()))
    backend = m0.attn_backend.get_name()
    for i, m in attns.items():
        impl = m.impl
        window = getattr(impl, "sliding_window", None)
        if window not in (None, -1, (-1, -1)):
            return f"layer {i} uses sliding-window attention"
        if getattr(impl, "logits_soft_cap", None) or getattr(impl, "alibi_slopes", None) is not None:
            return f"layer {i} uses a logit soft cap or ALiBi"
        if getattr(impl, "sinks", None) is not None:
            return f"layer {i} uses attention sinks"
        if str(getattr(m, "kv_cache_dtype", "auto")) != "auto":
            return f"the KV cache is quantized ({m.kv_cache_dtype})"
    if runner.device.type == "cuda":
        mode = getattr(runner.vllm_config.compilation_config, "cudagraph_mode", None)
        if mode is not None and "NONE" not in str(mode):
            return "CUDA graphs are on (run the engine with enforce_eager=True for VEE)"
    if backend == "CPU_ATTN":
        return _probe_cpu_cache(runner, m0)
    if backend not in ("FLASH_ATTN", "TRITON_ATTN"):
        return f"attention backend {backend} stores its KV cache in a layout emosteer does not read"
    return None


def _probe_cpu_cache(runner: Any, attn: Any) -> str | None:
    """Write known keys and values with vLLM's own CPU cache writer into a scratch cache
    and read them back through ``cache_views``: the layout emosteer assumes is checked
    on this machine's ISA, not taken on faith."""
    from vllm import _custom_ops as vops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    dtype = runner.model_config.dtype
    BS = int(runner.cache_config.block_size)
    KVH, D = int(attn.num_kv_heads), int(attn.head_size)
    try:
        isa = _get_attn_isa(dtype, BS, D, "auto")
        kv = torch.zeros((2, KVH, BS, 2 * D), dtype=dtype)
        view = kv.view(2, KVH, 2 * BS, D)
        kc, vc = view.chunk(2, dim=2)
        g = torch.Generator().manual_seed(0)
        n = min(BS + 3, 2 * BS)
        k = torch.randn((n, KVH, D), generator=g).to(dtype)
        v = torch.randn((n, KVH, D), generator=g).to(dtype)
        slots = torch.arange(n, dtype=torch.int64)
        vops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0,
                                        kv_cache_dtype="auto")
        got = attention_patch.cache_views("CPU_ATTN", kv, KVH, D)
    except Exception as e:  # an ISA or vLLM version whose writer differs
        return f"the CPU KV-cache probe failed ({type(e).__name__}: {e})"
    if got is None:
        return "the CPU KV cache has a shape emosteer does not read"
    keys = got[0].reshape(2 * BS, KVH, D)[:n]
    values = got[1].reshape(2 * BS, KVH, D)[:n]
    if not (torch.equal(keys, k) and torch.equal(values, v)):
        return f"vLLM's CPU KV cache (isa {isa!r}) stores keys in a layout emosteer does not read"
    return None
