"""Tiny random vision-language models (vision tower + 2-layer decoder) built offline, for tests.

Used by the extraction tests and tests/vllm (lvlm_case.py): the byte-level BPE tokenizer
of ``emosteer.models.tiny`` plus each family's vision special tokens, its processor with a
small pixel budget (a 56x56 test image gives a handful of image tokens), random fp32
weights. Every decoder: 2 layers, 4 heads x 32, 2 KV heads, hidden 128.

What differs between families lives in one table, ``KINDS`` (kind name -> ``LVLMKind``):
config builder, transformers model class, processor builder, image prompt with its
placeholder, image token, an optional fix-up of the saved weights (LLaVA's vision tower
keys for vLLM) and, for Qwen3-VL, how to read the deepstack features.
``build_tiny_lvlm(kind, path)`` builds any of them. The processors' video parts need
torchvision importable (see ``torchvision_env`` for the CPU shim).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["KINDS", "LVLMKind", "build_tiny_lvlm", "build_tiny_qwen2vl", "VISION_SPECIALS"]

VISION_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QUERY = "Describe the scene. What does the person feel?"
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _text(tok, **extra) -> dict:
    """The shared decoder: 2 layers, 4 heads x 32 (2 KV heads), hidden 128."""
    return dict(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra,
    )


def _ids(tok) -> dict:
    return dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, torch_dtype="float32", tie_word_embeddings=False)


def _qwen_vision_ids(tok) -> dict:
    v = {t: tok.convert_tokens_to_ids(t) for t in VISION_SPECIALS}
    return dict(image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
                vision_start_token_id=v["<|vision_start|>"], vision_end_token_id=v["<|vision_end|>"])


# ------------------------------------------------------------------ config builders
def _qwen2_vl_config(tok):
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=_text(tok, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=1, embed_dim=64, hidden_size=128, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        vocab_size=len(tok), **_qwen_vision_ids(tok), **_ids(tok),
    )


def _qwen2_5_vl_config(tok):
    from transformers import Qwen2_5_VLConfig

    # Vision: 2 blocks, block 1 full attention and block 0 windowed (as the real
    # model's fullatt_block_indexes), window 28 px = 1 merged token.
    return Qwen2_5_VLConfig(
        text_config=_text(tok, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                           out_hidden_size=128, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=28, fullatt_block_indexes=[1],
                           in_chans=3, hidden_act="silu"),
        vocab_size=len(tok), **_qwen_vision_ids(tok), **_ids(tok),
    )


def _qwen3_vl_config(tok):
    from transformers import Qwen3VLConfig

    # Deepstack as in the real model (vision indexes [8, 16, 24] of 27 feed decoder layers
    # 0, 1, 2 of 36): one intermediate vision block (0 of 2) feeds decoder layer 0 only.
    return Qwen3VLConfig(
        text_config=_text(tok, rope_scaling={"rope_type": "default", "mrope_section": [6, 5, 5],
                                             "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                           out_hidden_size=128, patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0], in_channels=3),
        **_qwen_vision_ids(tok), **_ids(tok),
    )


def _llava_config(tok):
    from transformers import LlavaConfig

    # CLIP tower: 56 px / 14 = 4x4 patches + CLS; the "default" strategy drops CLS and
    # layer -2 (the first of 2 blocks) feeds the projector: 16 image tokens.
    return LlavaConfig(
        text_config=dict(model_type="llama", **_text(tok)),
        vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
                           projection_dim=64, hidden_act="quick_gelu"),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16,
        vision_feature_select_strategy="default", vision_feature_layer=-2, **_ids(tok),
    )


OV_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def _llava_onevision_config(tok):
    from transformers import LlavaOnevisionConfig

    # SigLIP tower: 56 px / 14 = 4x4 patches (no CLS), last layer, "full" strategy; anyres
    # tiles of 56 px on a 2x2 grid of pinpoints; a Qwen2 decoder.
    return LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **_text(tok)),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=OV_PINPOINTS, vision_aspect_ratio="anyres_max_9", **_ids(tok),
    )


# ---------------------------------------------------------------- processor builders
def _qwen_processor(cls_name: str, patch: int, video_cls: str = "Qwen2VLVideoProcessor", **kw):
    def build(tok):
        import transformers
        from transformers import Qwen2VLImageProcessor

        unit = patch * 2  # patch x merge: the resize grid
        pixels = dict(min_pixels=(2 * unit) ** 2, max_pixels=(4 * unit) ** 2)
        image = Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2, **pixels, **kw)
        video = getattr(transformers, video_cls)(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                                 size={"shortest_edge": pixels["min_pixels"],
                                                       "longest_edge": pixels["max_pixels"]}, **kw)
        return getattr(transformers, cls_name)(image_processor=image, tokenizer=tok, video_processor=video)
    return build


def _llava_processor(tok):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


def _llava_onevision_processor(tok):
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    size = {"height": 56, "width": 56}
    image = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=OV_PINPOINTS)
    video = LlavaOnevisionVideoProcessor(size=size)
    return LlavaOnevisionProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                   num_image_tokens=16, vision_feature_select_strategy="full",
                                   vision_aspect_ratio="anyres_max_9")


def _llava_vllm_keys(state: dict) -> dict:
    """transformers saves the CLIP / SigLIP tower as ``vision_tower.{embeddings,encoder,...}``;
    vLLM's loader (and older checkpoints) want ``vision_tower.vision_model.*``. transformers
    loads either."""
    out = {}
    for k, v in state.items():
        head, sep, tail = k.partition("vision_tower.")
        if sep and head in ("", "model.") and not tail.startswith("vision_model."):
            k = f"{head}vision_tower.vision_model.{tail}"
        out[k] = v
    return out


def _qwen3_vl_deepstack(model, enc) -> list:
    import torch

    with torch.no_grad():
        out = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"], return_dict=True)
    return [torch.cat(f, 0) for f in out.deepstack_features]


@dataclass(frozen=True)
class LVLMKind:
    """Everything model-specific about one tiny LVLM family."""

    model_class: str  # transformers class (also in AutoModelForImageTextToText)
    config: Callable[[Any], Any]  # tokenizer -> config
    processor: Callable[[Any], Any]  # tokenizer -> processor
    image_token: str  # the placeholder token the processor expands per image
    prompt: str  # an image prompt: the image placeholder(s), then the query
    specials: tuple[str, ...]  # special tokens added to the tokenizer
    fix_weights: Callable[[dict], dict] | None = None  # saved state dict -> what vLLM loads
    # Qwen3-VL deepstack: (HF model, processor output) -> per decoder layer l = 0, 1, ...
    # the features [image tokens, d] the model adds to the image rows after layer l.
    deepstack: Callable[[Any, Any], list] | None = None


KINDS: dict[str, LVLMKind] = {
    "qwen2_vl": LVLMKind(
        "Qwen2VLForConditionalGeneration", _qwen2_vl_config,
        _qwen_processor("Qwen2VLProcessor", 14), "<|image_pad|>", QWEN_IMAGE + QUERY,
        tuple(VISION_SPECIALS)),
    "qwen2_5_vl": LVLMKind(
        "Qwen2_5_VLForConditionalGeneration", _qwen2_5_vl_config,
        _qwen_processor("Qwen2_5_VLProcessor", 14), "<|image_pad|>", QWEN_IMAGE + QUERY,
        tuple(VISION_SPECIALS)),
    "qwen3_vl": LVLMKind(
        "Qwen3VLForConditionalGeneration", _qwen3_vl_config,
        _qwen_processor("Qwen3VLProcessor", 16, "Qwen3VLVideoProcessor",
                        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
        "<|image_pad|>", QWEN_IMAGE + QUERY, tuple(VISION_SPECIALS), deepstack=_qwen3_vl_deepstack),
    "llava": LVLMKind(
        "LlavaForConditionalGeneration", _llava_config, _llava_processor, "<image>",
        "USER: <image>\n" + QUERY + " ASSISTANT:", ("<image>",), fix_weights=_llava_vllm_keys),
    "llava_onevision": LVLMKind(
        "LlavaOnevisionForConditionalGeneration", _llava_onevision_config, _llava_onevision_processor,
        "<image>", "<|im_start|>user <image>\n" + QUERY + "<|im_end|><|im_start|>assistant\n",
        ("<image>", "<video>"), fix_weights=_llava_vllm_keys),
}


def build_tiny_lvlm(kind: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Build (once) a random fp32 LVLM of family ``kind`` (a key of ``KINDS``) in
    ``path``: model, tokenizer, processor, generation config. Returns the folder."""
    import torch
    import transformers

    from emosteer.models.tiny import build_tokenizer

    spec = KINDS[kind]
    path = Path(path)
    if (path / "processor_config.json").exists() and (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    tok.add_special_tokens({"additional_special_tokens": list(spec.specials)})
    cfg = spec.config(tok)
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(path), safe_serialization=True)
    if spec.fix_weights is not None:
        from safetensors.torch import load_file, save_file

        f = path / "model.safetensors"
        save_file(spec.fix_weights(load_file(str(f))), str(f), metadata={"format": "pt"})
    spec.processor(tok).save_pretrained(str(path))
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def build_tiny_qwen2vl(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build (once) a random fp32 Qwen2-VL in ``path``: text 2 layers, 4 heads x 32,
    hidden 128; vision depth 1. Returns the folder."""
    return build_tiny_lvlm("qwen2_vl", path, seed)


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
