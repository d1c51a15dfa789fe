"""Residual modes (relative add, clamp, project-out) and probe gates on the transformers
backend, each against a hand computation on the unmodified model (hooks written here from
the documented formulas, sharing nothing with the backend)."""

from __future__ import annotations

import pytest
import torch

from emosteer.hf import HFSteerer
from tests.hf.test_steerer import assert_close_real, plain_logits

TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def bank(tiny, tiny_bank):
    """tiny_bank plus a second direction and a probe (random w, bias 0) for the tiny model."""
    from emosteer.request.bank import VectorBank

    info = tiny_bank.info
    g = torch.Generator().manual_seed(7)
    out = VectorBank(info)
    out.update(tiny_bank)
    out.add("anger", "residual", torch.randn(info.num_layers, info.hidden_size, generator=g))
    w = torch.randn(info.num_layers, info.hidden_size, generator=g)
    out.add("joy.probe", "probe", torch.cat([w / w.norm(dim=1, keepdim=True), torch.zeros(info.num_layers, 1)], 1))
    return out


def _unit(v):
    return v / v.norm()


@pytest.mark.parametrize("item,formula", [
    ({"scale": 0.3, "scale_mode": "relative"}, lambda h, u: h + 0.3 * h.norm(dim=-1, keepdim=True) * _unit(u)),
    ({"mode": "clamp", "value": 2.0}, lambda h, u: h + (2.0 - h @ _unit(u))[..., None] * _unit(u)),
    ({"mode": "clamp", "scale": -0.2, "scale_mode": "relative"},
     lambda h, u: h + (-0.2 * h.norm(dim=-1) - h @ _unit(u))[..., None] * _unit(u)),
    ({"mode": "project_out"}, lambda h, u: h - (h @ _unit(u))[..., None] * _unit(u)),
], ids=["add-relative", "clamp", "clamp-relative", "project_out"])
@pytest.mark.parametrize("layer", [0, 1])
def test_residual_mode_equals_hand_computation(tiny, bank, batch, item, formula, layer):
    model, tok = tiny
    ids, mask = batch
    u = bank.get("joy")[layer]
    hand = plain_logits(model, ids, mask, lambda m, a, out: formula(out, u), model.model.layers[layer])
    spec = {"steer": [{"vector": "joy", "layers": [layer], **item}],
            "capture": {"residual": [layer], "positions": "all"}}
    got, caps = HFSteerer(model, bank, tok).run(ids, mask, [spec, spec])
    assert_close_real(got, hand.logits, mask)
    assert not torch.allclose(got, plain_logits(model, ids, mask).logits)
    if layer == 0 and item.get("mode") in ("clamp", "project_out"):
        want = 0.0 if item["mode"] == "project_out" else item.get("value")
        comp = caps[0]["residual"][0] @ _unit(u)
        if want is None:  # relative clamp: the target moves with |h|
            return
        torch.testing.assert_close(comp, torch.full_like(comp, want), atol=1e-4, rtol=0)


def test_project_out_span_of_two(tiny, bank, batch):
    model, tok = tiny
    ids, mask = batch
    V = torch.stack([bank.get("joy")[1], bank.get("anger")[1]])
    Q, _ = torch.linalg.qr(V.double().T)
    Q = Q.T.float()

    def by_hand(m, a, out):
        return out - (out @ Q.T) @ Q

    hand = plain_logits(model, ids, mask, by_hand, model.model.layers[1])
    spec = {"steer": [{"vector": ["joy", "anger"], "layers": [1], "mode": "project_out"}]}
    got, _ = HFSteerer(model, bank, tok).run(ids, mask, [spec, spec])
    assert_close_real(got, hand.logits, mask)


def test_items_of_one_layer_read_the_same_residual(tiny, bank, batch):
    """An add and a clamp on one layer: both deltas from the residual entering the layer."""
    model, tok = tiny
    ids, mask = batch
    a, c = bank.get("anger")[1], _unit(bank.get("joy")[1])

    def by_hand(m, args, out):
        return out + 0.5 * a + (1.5 - out @ c)[..., None] * c

    hand = plain_logits(model, ids, mask, by_hand, model.model.layers[1])
    spec = {"steer": [{"vector": "anger", "layers": [1], "scale": 0.5},
                      {"vector": "joy", "layers": [1], "mode": "clamp", "value": 1.5}]}
    got, _ = HFSteerer(model, bank, tok).run(ids, mask, [spec, spec])
    assert_close_real(got, hand.logits, mask)


def _gate_case(model, bank, ids, mask, latch: bool):
    """Scores of the probe at layer 0 on the plain model, a threshold that splits them,
    and the hand-gated logits (steer layer 1 only where the gate is open)."""
    plain = plain_logits(model, ids, mask)
    w = bank.get("joy.probe")[0, :-1]
    scores = plain.hidden_states[1] @ w  # [B, T] (layer 0 output)
    real = mask.bool()
    thresh = float(scores[real].median())
    hold = (scores > thresh) & real
    open_ = hold.int().cumsum(1) > 0 if latch else hold
    u = bank.get("joy")[1]

    def by_hand(m, a, out):
        return out + 2.0 * u * open_[..., None]

    hand = plain_logits(model, ids, mask, by_hand, model.model.layers[1])
    return thresh, scores, open_, hand.logits, plain.logits


@pytest.mark.parametrize("latch", [False, True])
def test_gate_equals_hand_gating(tiny, bank, batch, latch):
    model, tok = tiny
    ids, mask = batch
    thresh, scores, open_, hand, plain = _gate_case(model, bank, ids, mask, latch)
    assert open_[mask.bool()].any() and not open_[mask.bool()].all()
    spec = {"steer": [{"vector": "joy", "layers": [1], "scale": 2.0}],
            "when": {"probe": "joy.probe", "layer": 0, "above": thresh, "latch": latch},
            "capture": {"probe": True, "positions": "all"}}
    got, caps = HFSteerer(model, bank, tok).run(ids, mask, [spec, spec])
    assert_close_real(got, hand, mask)
    for row in range(2):
        real = mask[row].bool()
        torch.testing.assert_close(caps[row]["probe"][0], scores[row][real], **TOL)


def test_gate_never_and_always(tiny, bank, batch):
    model, tok = tiny
    ids, mask = batch
    st = HFSteerer(model, bank, tok)
    steer = [{"vector": "joy", "layers": [1], "scale": 2.0}]
    ungated, _ = st.run(ids, mask, [{"steer": steer}] * 2)
    never, _ = st.run(ids, mask, [{"steer": steer, "when": {"probe": "joy.probe", "layer": 0, "above": 1e9}}] * 2)
    always, _ = st.run(ids, mask, [{"steer": steer, "when": {"probe": "joy.probe", "layer": 0, "below": 1e9}}] * 2)
    assert torch.equal(always, ungated)
    assert torch.equal(never, plain_logits(model, ids, mask).logits)


def test_gate_latch_over_generation_steps(tiny, bank):
    """Greedy generation with a latched gate: one that always holds == ungated, one that
    never holds == plain (the state lives in the plan across the KV-cached steps)."""
    model, tok = tiny
    st = HFSteerer(model, bank, tok)
    steer = [{"vector": "joy", "layers": [1], "scale": 3.0}]
    prompts = ["The child laughs with joy."]

    def gen(spec):
        return st.generate_text(prompts, spec, max_new_tokens=6).token_ids

    gate = {"probe": "joy.probe", "layer": 0, "latch": True}
    assert gen({"steer": steer, "when": {**gate, "below": 1e9}}) == gen({"steer": steer})
    assert gen({"steer": steer, "when": {**gate, "above": 1e9}}) == gen(None)
    assert gen({"steer": steer}) != gen(None)


def test_inline_vector_equals_registered(tiny, bank, batch):
    """An inline vector (float32 exactly, bfloat16 to its rounding) steers like the bank
    entry it copies; bad data is refused naming the field."""
    from emosteer.request.inline import encode
    from emosteer.request.spec import SpecError, SteerSpec

    model, tok = tiny
    ids, mask = batch
    st = HFSteerer(model, bank, tok)
    rows = bank.get("joy")[[0, 1]]
    registered = {"steer": [{"vector": "joy", "layers": [0, 1], "scale": 2.0, "scale_mode": "relative"}]}
    inline = {"steer": [{"vector": encode(rows), "layers": [0, 1], "scale": 2.0, "scale_mode": "relative"}]}
    a, _ = st.run(ids, mask, [registered, registered])
    b, _ = st.run(ids, mask, [inline, inline])
    assert torch.equal(a, b)
    own = {"steer": [{"vector": encode(rows[1:], layers=[1]), "scale": 1.0}]}
    c, _ = st.run(ids, mask, [own, own])
    d, _ = st.run(ids, mask, [{"steer": [{"vector": "joy", "layers": [1], "scale": 1.0}]}] * 2)
    assert torch.equal(c, d)
    half = {"steer": [{"vector": encode(rows, "bfloat16"), "layers": [0, 1], "scale": 1.0}]}
    e, _ = st.run(ids, mask, [half, half])
    assert torch.isfinite(e).all()
    info = bank.info
    bad = [
        ({"data": "not base64!", "dtype": "float32"}, "steer[0].vector.data"),
        ({"data": encode(rows)["data"], "dtype": "float16"}, "steer[0].vector.dtype"),
        ({**encode(rows[:1]), "extra": 1}, "steer[0].vector.extra"),
        (encode(torch.tensor([float("nan")] * info.hidden_size * 2)), "steer[0].vector.data"),
        (encode(rows[:1]), "steer[0].vector.data"),  # one row for two layers
        (encode(rows, layers=[0, 2]), "steer[0].vector.layers"),
    ]
    for vec, field in bad:
        with pytest.raises(SpecError) as err:
            SteerSpec.parse({"steer": [{"vector": vec, "layers": [0, 1], "scale": 1.0}]}).validate(bank, info)
        assert err.value.field == field, (field, err.value)
