"""The first code block of the README's "Use with vLLM" section, run verbatim."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm

DOC = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "### Use with vLLM"


def example_code() -> str:
    text = DOC.read_text()
    assert SECTION in text, f"no {SECTION!r} section in {DOC}"
    text = text.split(SECTION, 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, f"no python block in {DOC}"
    return blocks[0]


def test_readme_example(engines, tiny_model, bank_path, info, capsys):
    from vllm_support import assert_no_slots_held, engine_env

    engines.close()  # one engine at a time: the example starts its own
    engine_env()
    ns = {"MODEL": tiny_model, "BANK": bank_path, "__name__": "readme_example"}
    try:
        exec(compile(example_code(), str(DOC), "exec"), ns)
        caps = ns["caps"]
        assert caps["positions"] == [caps["positions"][0]]
        assert caps["heads"][1].shape == (1, info.num_heads, info.head_dim)
        assert caps["residual"][1].shape == (1, info.hidden_size)
        assert sorted(caps["heads"]) == list(range(info.num_layers))
        assert ns["heads"].shape == (info.num_layers, info.num_heads, info.head_dim)
        assert "joy.heads" in ns["llm"].bank.names()
        assert len(ns["patched"].outputs[0].token_ids) > 0
        assert capsys.readouterr().out.strip().endswith("steer[0].scale")
        assert_no_slots_held(ns["llm"])
    finally:
        llm = ns.get("llm")
        if llm is not None:
            llm.llm.llm_engine.engine_core.shutdown()
        ns.clear()
        import gc

        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
