"""Shared fixtures for the HF reference backend tests: one tiny Llama and a bank for it."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model, tokenizer) of the tiny random fp32 Llama (2 layers, 4 heads, head_dim 32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emosteer.models.tiny import build_tiny_llama

    path = build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    return model, tok


@pytest.fixture(scope="session")
def tiny_bank(tiny):
    """Random non-zero residual / head vectors and a neuron mask for the tiny model."""
    from emosteer.request.bank import ModelInfo, VectorBank

    model, _ = tiny
    info = ModelInfo.from_hf_config(model.config)
    g = torch.Generator().manual_seed(1)
    bank = VectorBank(info)
    bank.add("joy", "residual", torch.randn(info.num_layers, info.hidden_size, generator=g))
    bank.add("joy.h", "head", torch.randn(info.num_layers, info.num_heads, info.head_dim, generator=g))
    mask = (torch.rand(info.num_layers, info.intermediate_size, generator=g) < 0.1).float()
    bank.add("joy.ena", "neurons", mask)
    return bank


@pytest.fixture()
def batch(tiny):
    """Two left-padded chat prompts of different lengths."""
    from emosteer.hf import HFSteerer

    model, tok = tiny
    return HFSteerer(model, None, tok).encode(
        ["The child laughs with joy.", "A man sits alone in the rain, quiet and sad."]
    )
