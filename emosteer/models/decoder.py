"""Where a model keeps its decoder layers: one search for both backends.

The decoder is the longest ``ModuleList`` of blocks that pass a backend's test: blocks
with ``self_attn.o_proj`` and ``mlp.down_proj`` in a transformers model
(``emosteer/hf/layers.py``), blocks holding a vLLM ``Attention`` in a vLLM model
(``emosteer/vllm/worker/model.py``). Vision towers never pass either test, so the same
search finds the language model inside a vision-language model.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["find_layer_list"]


def find_layer_list(model: nn.Module, is_block: Callable[[nn.Module], bool],
                    length: int | None = None) -> tuple[str, nn.ModuleList, nn.Module] | None:
    """``(dotted name, layer list, its parent)`` of the longest non-empty ``ModuleList``
    in ``model`` (of ``length`` blocks, when given) whose every block passes
    ``is_block``; None when there is none."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if (isinstance(mod, nn.ModuleList) and len(mod) > 0 and length in (None, len(mod))
                and all(is_block(b) for b in mod)):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        return None
    name, layers = best
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return name, layers, parent
