"""Fluency guards: repetition, distinct-n, perplexity under the unsteered model, and the
guard rule the demo applies (perplexity <= 1.25x, repeated 3-grams <= 2x unsteered)."""

from __future__ import annotations

import math

import pytest
import torch

from emosteer.analysis.fluency import distinct_n, guards, perplexities, repeated_ngram_share


def test_repeated_ngram_share():
    assert repeated_ngram_share("") == 0.0 and repeated_ngram_share("two words") == 0.0
    assert repeated_ngram_share("the cat sat on the mat") == 0.0
    loop = "the smile is infectious, and the smile is infectious, and the smile is infectious"
    # 14 words, 12 3-grams: 5 distinct ("the smile is" .. "and the smile"), 7 repeats
    assert repeated_ngram_share(loop) == pytest.approx(7 / 12)
    assert repeated_ngram_share("a a a a a", n=1) == pytest.approx(4 / 5)
    assert repeated_ngram_share("It’s fine. IT'S FINE it's fine", n=2) == pytest.approx(3 / 5)


def test_distinct_n():
    assert distinct_n([]) == 0.0 and distinct_n("one") == 0.0
    assert distinct_n(["a b a b", "c d"], 2) == pytest.approx(3 / 4)
    assert distinct_n("a b c d", 1) == 1.0


def test_guards():
    base = {"ppl_mean": 10.0, "rep3_mean": 0.05}
    assert guards({"ppl_mean": 12.5, "rep3_mean": 0.10}, base)["ok"]
    g = guards({"ppl_mean": 12.6, "rep3_mean": 0.01}, base)
    assert not g["ok"] and g["ppl_ratio"] == pytest.approx(1.26)
    assert not guards({"ppl_mean": 9.0, "rep3_mean": 0.11}, base)["ok"]
    # a baseline that never repeats allows 0.02
    assert guards({"ppl_mean": 9.0, "rep3_mean": 0.02}, {"ppl_mean": 10.0, "rep3_mean": 0.0})["ok"]
    assert not guards({"ppl_mean": None, "rep3_mean": 0.0}, base)["ok"]


def test_perplexities_equal_a_plain_forward(tmp_path):
    """On the HF runner: exp(-mean log p) of each narrative given its prompt, computed
    by hand with the plain model, left padding and an empty narrative included."""
    from emosteer.analysis.runners import make_runner
    from emosteer.models.tiny import build_tiny_llama

    path = build_tiny_llama(tmp_path / "tiny")
    runner = make_runner(str(path), "hf", progress=False)
    prompts = [[5, 6, 7, 8], [9, 10]]
    narr = [[11, 12, 13], [14, 15, 16, 17, 18]]
    got = perplexities(runner, prompts + [[3, 4]], narr + [[]])
    assert got[2] is None
    model = runner.steerer.model
    for p, n, g in zip(prompts, narr, got):
        ids = torch.tensor([p + n])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        want = math.exp(-float(torch.stack([lp[len(p) - 1 + k, t] for k, t in enumerate(n)]).mean()))
        assert g == pytest.approx(want, rel=1e-4)
