"""A tiny random Qwen2-VL (vision tower + Llama-like decoder) that vLLM serves on a CPU.

Used by test_lvlm.py. vLLM's Qwen2-VL imports torchvision; the PyPI torchvision is a
CUDA build whose C extension cannot load beside the CPU torch, and ``import vllm``
itself imports it (through transformers) before any plugin runs. ``torchvision_shim``
writes a ``sitecustomize`` that defines the two op schemas torchvision's meta
registrations need; the test puts it on ``PYTHONPATH`` for itself and the engine
processes. Test-only: the product needs no such shim where torchvision matches torch.
"""

from __future__ import annotations

from pathlib import Path

# The model itself is built by the package helper, shared with the extraction tests.
from emosteer.testing_lvlm import build_tiny_qwen2vl as build_tiny_qwen2_vl  # noqa: F401

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
IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>Describe the scene. What does the person feel?"


def torchvision_shim(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SHIM)
    return folder


def test_image(seed: int = 0):
    """A 56x56 RGB image with structure (not constant): 4 image tokens after merging."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))
