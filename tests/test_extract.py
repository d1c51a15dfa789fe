"""Extraction on the tiny Llama (hf backend) equals a hand computation: per-pair runs of
the plain model, residuals and o_proj inputs read with hand-written hooks."""

from __future__ import annotations

import pytest
import torch

from emosteer.data import load_builtin
from emosteer.analysis.extract import extract_vectors, pair_text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emosteer.models.tiny import build_tiny_llama

    path = build_tiny_llama(tmp_path_factory.mktemp("tiny_extract"))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def by_hand(model, tok, text):
    """Last-token residual [L, d] and head outputs [L, H, D] of one unpadded run."""
    msgs = [{"role": "user", "content": text}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    res, heads, hooks = {}, {}, []
    for l, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, o, l=l: res.__setitem__(l, o[0, -1])))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, l=l: heads.__setitem__(l, a[0][0, -1].view(4, 32))))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    L = len(model.model.layers)
    return torch.stack([res[l] for l in range(L)]), torch.stack([heads[l] for l in range(L)])


def expected(model, tok, pairs, keep):
    s, t = [], []
    for p, k in zip(pairs, keep):
        if not k:
            continue
        hp, zp = by_hand(model, tok, pair_text(p.emotional, p.query))
        hn, zn = by_hand(model, tok, pair_text(p.neutral, p.query))
        s.append(hp - hn)
        t.append(zp - zn)
    return torch.stack(s).mean(0), torch.stack(t).mean(0)


def test_extraction_equals_hand_computation_with_filter(tiny):
    model, tok = tiny
    pairs = load_builtin("joy")[:4]
    rates = iter([0.9, 0.2, None, 0.5])  # tau 0.5 keeps pairs 0 and 3
    res = extract_vectors(model, pairs, tokenizer=tok, tau=0.5, max_new_tokens=4, batch_size=3,
                          progress=False, hit_rate_fn=lambda text, emo: next(rates))
    S, Sh = expected(model, tok, pairs, [True, False, False, True])
    torch.testing.assert_close(res.bank.get("joy", "residual"), S, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.bank.get("joy.h", "head"), Sh, atol=1e-5, rtol=1e-5)
    meta = res.bank.meta("joy")
    assert meta["n_pairs"] == 4 and meta["n_kept"] == 2 and meta["tau"] == 0.5
    assert meta["filter"] == "hit_rate" and meta["method"] == "diff_of_means"
    assert res.kept["joy"] == [True, False, False, True]
    assert len(meta["residual_norm"]) == 2 and len(res.narratives["joy"]) == 4


def test_extraction_falls_back_when_no_pair_passes(tiny, tmp_path):
    from emosteer.request.bank import VectorBank

    model, tok = tiny
    pairs = load_builtin("sadness")[:3]
    with pytest.warns(UserWarning, match="fallback_all_pairs"):
        res = extract_vectors(model, pairs, tokenizer=tok, max_new_tokens=3, progress=False,
                              hit_rate_fn=lambda text, emo: None)
    S, Sh = expected(model, tok, pairs, [True] * 3)
    torch.testing.assert_close(res.bank.get("sadness"), S, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.bank.get("sadness.h"), Sh, atol=1e-5, rtol=1e-5)
    assert res.bank.meta("sadness")["filter"] == "fallback_all_pairs"
    assert res.bank.meta("sadness")["n_kept"] == 0
    res.save(tmp_path / "bank.safetensors", tmp_path / "report.json")
    again = VectorBank.load(tmp_path / "bank.safetensors")
    assert torch.equal(again.get("sadness.h"), res.bank.get("sadness.h"))
