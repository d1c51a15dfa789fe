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


# ------------------------------------------------------------------------------ probes
def test_probe_entry_equals_hand_computation(tiny, tmp_path):
    """``joy.probe`` [L, d + 1]: per layer the unit difference of the train pairs' class
    means and the bias at their midpoint; its held-out accuracy is the share of the
    held-out pairs' 2n residuals it puts on the right side of 0."""
    import json

    model, tok = tiny
    pairs = load_builtin("joy")[:40]
    res = extract_vectors(model, pairs, tokenizer=tok, max_new_tokens=2, batch_size=16,
                          progress=False, hit_rate_fn=lambda text, emo: 1.0)
    L, d = 2, 128
    probe = res.bank.get("joy.probe", "probe")
    assert probe.shape == (L, d + 1) and probe.dtype == torch.float32
    w, b = probe[:, :d].double(), probe[:, d].double()
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(L, dtype=torch.float64))
    meta, rep = res.bank.meta("joy.probe"), res.probes["joy"]
    assert meta["component"] == "probe" and meta["probe_fit"] == "diff_of_means_midpoint"
    assert meta["emotion"] == "joy" and meta["n_pairs"] == 40 and meta["filter"] == "hit_rate"
    assert meta["n_train"] + meta["n_heldout"] == 40 and meta["n_heldout"] >= 4
    assert not meta["few_pairs"] and "scene" in meta["split"]
    assert rep["name"] == "joy.probe" and sorted(rep["train_ids"] + rep["heldout_ids"]) == [p.id for p in pairs]
    # no scene on both sides of the split
    scene = {p.id: p.meta["scene"] for p in pairs}
    assert not {scene[i] for i in rep["train_ids"]} & {scene[i] for i in rep["heldout_ids"]}

    hand = {p.id: (by_hand(model, tok, pair_text(p.emotional, p.query))[0].double(),
                   by_hand(model, tok, pair_text(p.neutral, p.query))[0].double()) for p in pairs}
    mu_p = torch.stack([hand[i][0] for i in rep["train_ids"]]).mean(0)
    mu_n = torch.stack([hand[i][1] for i in rep["train_ids"]]).mean(0)
    torch.testing.assert_close(w, torch.nn.functional.normalize(mu_p - mu_n, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, -(w * (mu_p + mu_n) / 2).sum(-1), atol=1e-4, rtol=1e-5)
    assert ((w * mu_p).sum(-1) + b > 0).all() and ((w * mu_n).sum(-1) + b < 0).all()
    acc = []
    for l in range(L):
        right = [float(w[l] @ hand[i][0][l] + b[l] > 0) + float(w[l] @ hand[i][1][l] + b[l] <= 0)
                 for i in rep["heldout_ids"]]
        acc.append(sum(right) / (2 * len(right)))
    assert meta["heldout_accuracy"] == pytest.approx(acc)
    assert all(0.0 <= a <= 1.0 for a in meta["heldout_accuracy"] + meta["train_accuracy"])
    best = meta["best_layer"]
    assert meta["best_accuracy"] == meta["heldout_accuracy"][best] == max(meta["heldout_accuracy"])
    # Even on this random tiny Llama the two sides' texts differ in their cue words, and the
    # held-out pairs (12 pairs, 24 residuals, unseen scenes) are told apart well above chance
    # (0.875 at the best layer when written; 0.5 is chance).
    assert meta["best_accuracy"] > 0.65
    res.save(tmp_path / "b.safetensors", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["probes"]["joy"]["heldout_accuracy"] == meta["heldout_accuracy"]


def test_probe_uses_the_kept_pairs_and_says_when_few(tiny):
    model, tok = tiny
    pairs = load_builtin("joy")[:4]
    rates = iter([0.9, 0.2, None, 0.5])  # tau 0.5 keeps pairs 0 and 3: one trains, one is held out
    res = extract_vectors(model, pairs, tokenizer=tok, max_new_tokens=2, progress=False,
                          hit_rate_fn=lambda text, emo: next(rates))
    meta, rep = res.bank.meta("joy.probe"), res.probes["joy"]
    assert sorted(rep["train_ids"] + rep["heldout_ids"]) == ["joy-0000", "joy-0003"]
    assert meta["n_train"] == meta["n_heldout"] == 1 and meta["few_pairs"]
    assert "1 held-out pair" in meta["note"] and len(meta["heldout_accuracy"]) == 2
    assert all(a in (0.0, 0.5, 1.0) for a in meta["heldout_accuracy"])  # 2 residuals per layer
    rates = iter([0.9, 0.2, None])  # a single kept pair: fitted on it, nothing held out
    res = extract_vectors(model, pairs[:3], tokenizer=tok, max_new_tokens=2, progress=False,
                          hit_rate_fn=lambda text, emo: next(rates))
    meta = res.bank.meta("joy.probe")
    assert meta["n_train"] == 1 and meta["n_heldout"] == 0
    assert meta["heldout_accuracy"] is None and meta["best_accuracy"] is None
    assert meta["train_accuracy"] == [1.0, 1.0] and "no held-out pair" in meta["note"]


def test_probes_off(tiny):
    model, tok = tiny
    res = extract_vectors(model, load_builtin("joy")[:2], tokenizer=tok, max_new_tokens=2,
                          progress=False, hit_rate_fn=lambda text, emo: 1.0, probes=False)
    assert res.bank.names() == ["joy", "joy.h"] and res.probes == {}
    with pytest.raises(ValueError, match="probe_holdout"):
        extract_vectors(model, load_builtin("joy")[:2], tokenizer=tok, probe_holdout=1.0)


def test_logistic_probe_separates_where_the_mean_difference_does_not():
    """``fit_probe(method="logistic")``: on residuals whose class means differ along a
    noisy axis while a quiet axis separates them perfectly, the difference-of-means probe
    is near chance on held-out rows and the logistic one is (near) exact; it is a logit
    (w not unit), float32 [L, d + 1], and its metadata has the same fields."""
    from emosteer.analysis.extract import fit_probe

    g = torch.Generator().manual_seed(0)
    N, L, d = 80, 2, 8
    y = torch.ones(N)
    noise = torch.randn(N, L, d, generator=g) * 0.05
    pos, neg = noise.clone(), torch.randn(N, L, d, generator=g) * 0.05
    pos[:, :, 0] += 1.0 + 6.0 * torch.randn(N, L, generator=g)  # means 1 apart, spread 6
    neg[:, :, 0] += 6.0 * torch.randn(N, L, generator=g)
    pos[:, :, 1] += 0.5 * y[:, None]  # a quiet axis: +0.5 against -0.5, no overlap
    neg[:, :, 1] -= 0.5 * y[:, None]
    train, held = list(range(60)), list(range(60, N))
    mean_probe, mean_fit = fit_probe(pos, neg, train, held, "mean")
    log_probe, log_fit = fit_probe(pos, neg, train, held, "logistic")
    assert log_probe.shape == (L, d + 1) and log_probe.dtype == torch.float32
    assert min(log_fit["heldout_accuracy"]) >= 0.95, log_fit
    assert max(mean_fit["heldout_accuracy"]) < 0.8, mean_fit
    assert set(log_fit) == set(mean_fit)
    w = log_probe[:, :d]
    assert (w[:, 1].abs() > w[:, 0].abs()).all()  # it leans on the quiet axis
    with pytest.raises(ValueError, match="probe fit"):
        fit_probe(pos, neg, train, held, "svm")


def test_extract_writes_a_logistic_probe_when_asked(tiny):
    """``extract_vectors(probe_fit="logistic")`` writes ``joy.probe`` fitted by logistic
    regression (its metadata says so, with its penalty); the vectors are unchanged."""
    model, tok = tiny
    pairs = load_builtin("joy")[:16]
    kw = dict(tokenizer=tok, max_new_tokens=2, batch_size=16, progress=False,
              hit_rate_fn=lambda text, emo: 1.0)
    res = extract_vectors(model, pairs, probe_fit="logistic", **kw)
    meta = res.bank.meta("joy.probe")
    assert meta["probe_fit"] == "logistic_l2" and meta["l2"] > 0
    assert len(meta["heldout_accuracy"]) == res.bank.get("joy.probe").shape[0]
    plain = extract_vectors(model, pairs, **kw)
    assert torch.equal(plain.bank.get("joy"), res.bank.get("joy"))
    assert not torch.equal(plain.bank.get("joy.probe"), res.bank.get("joy.probe"))
    with pytest.raises(ValueError, match="probe_fit"):
        extract_vectors(model, pairs, probe_fit="tree", **kw)
