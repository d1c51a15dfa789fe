"""Reading weights straight from a model folder's safetensors files, without building the model.

The analysis needs a few matrices of a model that runs elsewhere (in vLLM's worker): the
per-layer o_proj and down_proj weights (head intention, neuron alignment) and the final
norm and LM head (logits from captured residuals). Every such read goes through
:func:`read_tensors`; names are matched on their ending, so the same code reads a plain
causal LM (``model.layers.3.mlp.down_proj.weight``) and the language model inside an
LVLM (``language_model.model.layers.3...``), and a vision tower's tensors are skipped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

__all__ = ["read_tensors", "layer_weights", "final_norm_and_head"]


def read_tensors(folder: str | os.PathLike, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Every tensor whose name ``keep`` accepts, from the ``*.safetensors`` files of
    ``folder`` (read in sorted file order, so a name repeated in a later shard wins), in
    its stored dtype."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if keep(k):
                    found[k] = st.get_tensor(k)
    return found


def layer_weights(folder: str | os.PathLike, suffix: str, num_layers: int) -> list[torch.Tensor]:
    """The text model's per-layer tensor ``...layers.<l>.<suffix>`` for l = 0..num_layers-1
    (e.g. ``suffix="mlp.down_proj.weight"``), float32."""
    found = read_tensors(folder, lambda k: k.endswith(suffix) and "vision" not in k)
    by_layer = {int(k.split("layers.")[1].split(".")[0]): t.float() for k, t in found.items()}
    return [by_layer[l] for l in range(num_layers)]


def _head_role(name: str) -> str | None:
    """Which part of the output head a tensor name is: the final ``norm`` (not a layer's,
    not the vision tower's), the ``head`` or the input ``embed``ding; None for the rest."""
    if name.endswith("norm.weight") and "layers." not in name and "vision" not in name:
        return "norm"
    if name.endswith("lm_head.weight"):
        return "head"
    if name.endswith("embed_tokens.weight"):
        return "embed"
    return None


def final_norm_and_head(folder: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """The text model's final norm weight [d] and LM head [vocab, d], float32; a model with
    tied embeddings (no ``lm_head.weight``) uses its input embedding as the head."""
    parts = {_head_role(k): t for k, t in read_tensors(folder, lambda k: _head_role(k) is not None).items()}
    head = parts["head"] if "head" in parts else parts["embed"]
    return parts["norm"].float(), head.float()
