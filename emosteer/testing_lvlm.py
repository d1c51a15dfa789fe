"""A tiny random Qwen2-VL (vision tower + 2-layer decoder) built offline, for tests.

Used by the extraction tests and tests/vllm/vllm_lvlm.py: the byte-level BPE tokenizer of
``emosteer.testing`` plus the Qwen2-VL vision special tokens, a Qwen2VLProcessor with a
small pixel budget (56x56 .. 112x112), random fp32 weights. The processor's video part
needs torchvision importable (see tests/vllm/vllm_lvlm.py for the CPU shim).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["build_tiny_qwen2vl", "VISION_SPECIALS"]

VISION_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def build_tiny_qwen2vl(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build (once) a random fp32 Qwen2-VL in ``path``: text 2 layers, 4 heads x 32,
    hidden 128; vision depth 1. Returns the folder."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from emosteer.testing import build_tokenizer

    path = Path(path)
    if (path / "processor_config.json").exists() and (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    tok.add_special_tokens({"additional_special_tokens": VISION_SPECIALS})
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_SPECIALS}
    text = dict(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=1, embed_dim=64, hidden_size=128, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        vocab_size=len(tok),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        torch_dtype="float32", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(path), safe_serialization=True)
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                            merge_size=2, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok,
                     video_processor=video_processor).save_pretrained(str(path))
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path
