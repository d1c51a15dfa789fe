"""Prompt text for a chat model: one formatter for every path that feeds a model text.

Used by the runners and the batch generator (``emosteer/analysis/runners.py``,
``emosteer/apps/generate.py``), the transformers backend (``HFSteerer.encode``) and the
benchmarks, so the same prompt becomes the same tokens on every backend.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["format_prompts", "format_image_prompt", "VISION_PLACEHOLDER"]


def format_prompts(tokenizer, prompts: Sequence[str | Sequence[dict]], chat: bool = True,
                   system: str | None = None) -> list[str]:
    """The text the model is fed for each prompt: a plain text becomes a user turn (after a
    ``system`` turn when given), a list of ``{"role", "content"}`` messages is taken as is;
    with ``chat`` and a tokenizer that has a chat template, the template renders the turns
    and the generation prompt, otherwise the turns' contents are joined by newlines (a
    plain text stays unchanged)."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            p = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": p}]
        if chat and getattr(tokenizer, "chat_template", None):
            out.append(tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True))
        else:
            out.append("\n".join(m["content"] for m in p))
    return out


VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def format_image_prompt(processor, tokenizer, text: str, chat: bool = True) -> str:
    """The prompt for one image + text user turn: the processor's chat template with an
    image content item when that template renders the image token; otherwise (no
    template, or a text-only one) the Qwen2-VL vision placeholder before the text inside
    the tokenizer's chat template."""
    image_token = getattr(processor, "image_token", None) or "<|image_pad|>"
    if chat and getattr(processor, "chat_template", None):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if image_token in prompt:
            return prompt
    placeholder = (VISION_PLACEHOLDER if image_token == "<|image_pad|>" else image_token)
    return format_prompts(tokenizer, [placeholder + text], chat)[0]
