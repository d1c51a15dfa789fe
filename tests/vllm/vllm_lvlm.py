"""The tiny LVLM cases of test_lvlm.py: model builders, image prompts and the test image.

vLLM's Qwen2-VL imports torchvision, and ``import vllm`` imports it (through
transformers) before any plugin runs; the child process therefore starts with the
``sitecustomize`` shim of ``emosteer.models.tiny_lvlm.torchvision_env`` on PYTHONPATH.
Test-only: the product needs no such shim where torchvision matches torch.
"""

from __future__ import annotations

# The models are built by the package helper, shared with the extraction tests; what is
# model-specific (config, class, processor, prompt, image token) is its KINDS table.
from emosteer.models.tiny_lvlm import KINDS, build_tiny_lvlm  # noqa: F401
from emosteer.models.tiny_lvlm import build_tiny_qwen2vl as build_tiny_qwen2_vl  # noqa: F401

IMAGE_PROMPT = KINDS["qwen2_vl"].prompt  # the Qwen2-VL image prompt (placeholder + query)


def test_image(seed: int = 0):
    """A 56x56 RGB image with structure (not constant): 4 image tokens after merging."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))
