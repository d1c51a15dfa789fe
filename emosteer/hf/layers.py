"""Find the decoder of a transformers model: its layers and the modules emosteer hooks.

Works on plain causal LMs (``model.model.layers``) and on the language model inside
vision-language models (Qwen2-VL / Qwen3-VL ``model.language_model.layers``, LLaVA
``model.language_model.layers``, older ``language_model.model.layers``) without naming
them: the decoder is the longest ``ModuleList`` whose blocks all have
``self_attn.o_proj`` and ``mlp.down_proj``. Vision towers (``attn.proj``, CLIP's
``out_proj`` / ``fc2``) never match.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from emosteer.models.decoder import find_layer_list
from emosteer.request.bank import ModelInfo

__all__ = ["DecoderHandles", "find_decoder", "load_hf_model"]


@dataclass
class DecoderHandles:
    """The hook points of one decoder, indexed by 0-based layer."""

    path: str  # dotted name of the layer list, e.g. "model.layers"
    layers: list[nn.Module]  # decoder blocks: residual add on their output
    o_proj: list[nn.Module]  # head affine + capture on their input
    down_proj: list[nn.Module]  # neuron gain on their input
    info: ModelInfo
    # What reads decoder layer l's output: layer l+1, or the final norm after the last
    # layer (None where there is none). Residual captures are taken at its input, where
    # models that add to the stream between layers (Qwen3-VL's deepstack) have added.
    readers: list[nn.Module | None] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _is_block(m: nn.Module) -> bool:
    attn, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
    return (
        attn is not None
        and isinstance(getattr(attn, "o_proj", None), nn.Module)
        and mlp is not None
        and isinstance(getattr(mlp, "down_proj", None), nn.Module)
    )


def _text_config(config):
    for key in ("text_config", "llm_config"):
        sub = getattr(config, key, None)
        if sub is not None:
            return sub
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def find_decoder(model: nn.Module) -> DecoderHandles:
    """The decoder layers of ``model`` and their hook modules; ``ValueError`` if none."""
    found = find_layer_list(model, _is_block)
    if found is None:
        raise ValueError(
            f"{type(model).__name__}: found no decoder layer list (a ModuleList whose blocks "
            "have self_attn.o_proj and mlp.down_proj); emosteer.hf supports Llama-like decoders"
        )
    name, layers, parent = found
    info = ModelInfo.from_hf_config(model.config)
    if info.num_layers != len(layers):
        raise ValueError(
            f"config says {info.num_layers} decoder layers but {name} holds {len(layers)}"
        )
    o0 = layers[0].self_attn.o_proj
    if getattr(o0, "in_features", info.num_heads * info.head_dim) != info.num_heads * info.head_dim:
        raise ValueError(
            f"o_proj takes {o0.in_features} features, expected num_heads*head_dim = "
            f"{info.num_heads}*{info.head_dim}"
        )
    norm = getattr(parent, "norm", None)
    readers = list(layers)[1:] + [norm if isinstance(norm, nn.Module) else None]
    return DecoderHandles(
        path=name,
        layers=list(layers),
        o_proj=[b.self_attn.o_proj for b in layers],
        down_proj=[b.mlp.down_proj for b in layers],
        info=info,
        readers=readers,
    )


def load_hf_model(
    name_or_path: str | os.PathLike = "default",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """``(model, tokenizer)`` for ``"default"`` (SmolLM2-135M-Instruct) or a local folder
    (a causal LM, or a vision-language model through its image-text-to-text class).

    The tokenizer pads on the left (batched generation) and always has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emosteer.models import resolve_model

    path = resolve_model(name_or_path)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path))
    if getattr(cfg, "vision_config", None) is not None:  # an LVLM: its image-text class
        from transformers import AutoModelForImageTextToText as Auto
    else:
        Auto = AutoModelForCausalLM
    model = Auto.from_pretrained(str(path), dtype=dtype).to(device)
    model.eval()
    return model, tok
