"""A tiny random Qwen2-VL (vision tower + Llama-like decoder) that vLLM serves on a CPU.

Used by test_lvlm.py. vLLM's Qwen2-VL imports torchvision; the PyPI torchvision is a
CUDA build whose C extension cannot load beside the CPU torch, and ``import vllm``
itself imports it (through transformers) before any plugin runs. ``torchvision_shim``
writes a ``sitecustomize`` that defines the two op schemas torchvision's meta
registrations need; the test puts it on ``PYTHONPATH`` for itself and the engine
processes. Test-only: the product needs no such shim where torchvision matches torch.
"""

from __future__ import annotations

import json
from pathlib import Path

SHIM = '''# emosteer test shim: define torchvision's op schemas (its CUDA-only C extension cannot
# load beside a CPU torch), so that `import torchvision` succeeds.
try:
    import torch

    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
except Exception:
    pass
'''
SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>Describe the scene. What does the person feel?"


def torchvision_shim(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SHIM)
    return folder


def build_tiny_qwen2_vl(path: Path, seed: int = 0) -> Path:
    """Random fp32 Qwen2-VL: text 2 layers, 4 heads x 32, hidden 128; vision depth 1."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )

    from emosteer.testing import build_tokenizer

    path = Path(path)
    if (path / "processor_config.json").exists() and (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
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
    from transformers import Qwen2VLVideoProcessor

    video_processor = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok,
                     video_processor=video_processor).save_pretrained(str(path))
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def test_image(seed: int = 0):
    """A 56x56 RGB image with structure (not constant): 4 image tokens after merging."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))
