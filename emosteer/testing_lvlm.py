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


# vLLM's Qwen2-VL and the Qwen2-VL processor import torchvision, whose PyPI build is a
# CUDA build whose C extension cannot load beside a CPU torch. This `sitecustomize`
# defines the two op schemas torchvision's meta registrations need, so that
# `import torchvision` succeeds in a process that has it first on PYTHONPATH.
TORCHVISION_SHIM = '''# emosteer test shim: define torchvision's op schemas (its CUDA-only C extension cannot
# load beside a CPU torch), so that `import torchvision` succeeds.
try:
    import torch

    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
except Exception:
    pass
'''


def torchvision_dir() -> str | None:
    """Folder holding an importable ``torchvision`` package: ``$EMOSTEER_TEST_TORCHVISION``,
    else the side install of scripts/install.sh (``<venv>/torchvision-cpu``), else the
    environment's own; None when there is none."""
    import importlib.util
    import sys

    extra = os.environ.get("EMOSTEER_TEST_TORCHVISION") or str(Path(sys.prefix) / "torchvision-cpu")
    if (Path(extra) / "torchvision").is_dir():
        return extra
    spec = importlib.util.find_spec("torchvision")
    return str(Path(spec.origin).parent.parent) if spec and spec.origin else None


def torchvision_env(shim_dir: str | os.PathLike, *extra_paths: str) -> dict | None:
    """Environment for a child process that can import torchvision (shim + torchvision +
    ``extra_paths`` first on PYTHONPATH, no TRITON_INTERPRET); None without torchvision."""
    tv = torchvision_dir()
    if tv is None:
        return None
    shim = Path(shim_dir)
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "sitecustomize.py").write_text(TORCHVISION_SHIM)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(shim), tv, *extra_paths, env.get("PYTHONPATH", "")])
    return env
