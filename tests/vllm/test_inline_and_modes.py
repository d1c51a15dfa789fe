"""Inline vectors and the residual modes on the eager engine: inline == registered (same
tokens and logprobs), and relative / clamp / project-out configs equal
emosteer's transformers backend (whose formulas tests/hf/test_residual_modes.py holds
against hand computations; the independent oracle runs them in the differential suite)."""

from __future__ import annotations

import pytest
import torch
import vllm_checks as checks
from vllm_support import PROMPTS, assert_no_slots_held, greedy, summarize

from emosteer.client import inline_vector

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def llm(plain_reference, engines):
    return engines.get("eager")


@pytest.fixture(autouse=True)
def _no_slot_left(llm):
    yield
    assert_no_slots_held(llm)


def test_inline_equals_registered(llm, bank):
    rows = bank.get("joy")[[0, 1]]
    registered = {"steer": [{"vector": "joy", "layers": [0, 1], "scale": 0.5, "scale_mode": "relative"}]}
    inline = {"steer": [{"vector": inline_vector(rows), "layers": [0, 1], "scale": 0.5, "scale_mode": "relative"}]}
    other = {"steer": [{"vector": inline_vector(-rows), "layers": [0, 1], "scale": 0.5, "scale_mode": "relative"}]}
    prompts = PROMPTS[:2]
    a = llm.generate(prompts, greedy(), steer=registered, use_tqdm=False)
    # Inline twice (one slot), registered and a negated inline vector in one batch.
    b = llm.generate(prompts * 2, greedy(), steer=[inline, inline, registered, other], use_tqdm=False)
    plain = llm.generate(prompts, greedy(), use_tqdm=False)
    for i in range(2):
        assert b[i].emosteer_error is None
        checks.assert_logprobs_close(summarize(b[i]), summarize(a[i]), 1e-5)
    checks.assert_logprobs_close(summarize(b[2]), summarize(a[0]), 1e-5)
    # the negated inline vector is another config: other outputs
    assert summarize(b[3])["ids"] != summarize(a[1])["ids"]
    assert summarize(a[0])["ids"] != summarize(plain[0])["ids"]


def test_inline_head_vectors_equal_registered(llm, bank, info):
    """A heads item's inline rows (per listed head, or the layer's whole [H, D] block)
    == the registered head vector, alone and side by side in one batch."""
    v = bank.get("joy.h")
    registered = {"heads": [{"layer": 1, "head": [0, 2], "mode": "add", "vector": "joy.h", "scale": 3.0},
                            {"layer": 0, "head": 1, "mode": "patch", "vector": "joy.h"}]}
    rows = {"heads": [{"layer": 1, "head": [0, 2], "mode": "add", "vector": inline_vector(v[1, [0, 2]]), "scale": 3.0},
                      {"layer": 0, "head": 1, "mode": "patch", "vector": inline_vector(v[0, [1]])}]}
    block = {"heads": [{"layer": 1, "head": [0, 2], "mode": "add", "vector": inline_vector(v[1]), "scale": 3.0},
                       {"layer": 0, "head": 1, "mode": "patch",
                        "vector": inline_vector(v[0, [3, 1]], heads=[3, 1])}]}
    prompts = PROMPTS[:2]
    a = llm.generate(prompts, greedy(), steer=registered, use_tqdm=False)
    b = llm.generate(prompts * 2, greedy(), steer=[rows, rows, block, block], use_tqdm=False)
    plain = llm.generate(prompts, greedy(), use_tqdm=False)
    for i, got in enumerate(b):
        assert got.emosteer_error is None
        checks.assert_logprobs_close(summarize(got), summarize(a[i % 2]), 1e-5)
    assert summarize(a[0])["ids"] != summarize(plain[0])["ids"]
    # Other rows on the same prompts, after the cache holds the rows' blocks: another
    # vector (its own name), never served from those blocks; warm == cold.
    neg = {"heads": [{**rows["heads"][0], "vector": inline_vector(-v[1, [0, 2]])}, rows["heads"][1]]}
    cold = llm.generate(prompts, greedy(), steer=neg, use_tqdm=False)
    warm = llm.generate(prompts, greedy(), steer=neg, use_tqdm=False)
    for c, w, r in zip(cold, warm, b):
        checks.assert_logprobs_close(summarize(w), summarize(c), 1e-5)
        assert summarize(c)["ids"] != summarize(r)["ids"]


def test_inline_errors_name_the_field(llm, info):
    bad = {"steer": [{"vector": {"data": "@@", "dtype": "float32"}, "layers": [0], "scale": 1.0}]}
    with pytest.raises(Exception) as e:
        llm.generate(PROMPTS[:1], greedy(), steer=bad, use_tqdm=False)
    assert "steer[0].vector.data" in str(e.value)
    short = {"steer": [{"vector": inline_vector(torch.ones(info.hidden_size - 1)), "layers": [0], "scale": 1.0}]}
    with pytest.raises(Exception) as e:
        llm.generate(PROMPTS[:1], greedy(), steer=short, use_tqdm=False)
    assert "steer[0].vector.data" in str(e.value)
    head = {"heads": [{"layer": 0, "head": [0, 1], "mode": "patch", "vector": inline_vector(torch.ones(3))}]}
    with pytest.raises(Exception) as e:
        llm.generate(PROMPTS[:1], greedy(), steer=head, use_tqdm=False)
    assert "heads[0].vector.data" in str(e.value)


MODE_CONFIGS = [
    {"steer": [{"vector": "joy", "layers": [0, 1], "scale": 0.3, "scale_mode": "relative"}]},
    {"steer": [{"vector": "sad", "layers": [1], "mode": "clamp", "value": 3.0},
               {"vector": "joy", "layers": [1], "scale": 1.5}]},
    {"steer": [{"vector": "sad", "layers": "all", "mode": "clamp", "scale": -0.2, "scale_mode": "relative",
                "positions": "generated"}]},
    {"steer": [{"vector": ["joy", "sad"], "layers": [0], "mode": "project_out"}]},
    {"heads": [{"layer": 0, "head": [0, 3], "mode": "add", "vector": "joy.h", "scale": 0.6,
                "scale_mode": "relative"},
               {"layer": 1, "head": 1, "mode": "add", "vector": "joy.h", "scale": -0.4,
                "scale_mode": "relative", "positions": "generated"}]},
]


def test_modes_match_hf(llm, tiny_model, bank):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = checks.token_prompts(llm, PROMPTS[:2])
    capture = {"residual": "all", "positions": "all"}
    checks.assert_matches_hf(llm, model, bank, prompts, MODE_CONFIGS, capture)
