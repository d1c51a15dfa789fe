"""The hallucination study's parts that need no model: its scenes, its candidate configs
and the mean emotion direction (the study itself runs in tests/test_demo.py, on both
backends, and is recomputed there from its narratives)."""

from __future__ import annotations

import pytest
import torch

from emosteer.analysis import hallucination as hal
from emosteer.data import BUILTIN_EMOTIONS, DEV_TEMPLATES, TEST_TEMPLATES, load_builtin


def test_scenes_split_by_template_and_skip_the_reserved_pairs():
    scenes = hal.study_scenes(BUILTIN_EMOTIONS, n_neutral=3, n_emotional=5, reserved_pairs=40)
    neutral = [s for s in scenes if s.emotion is None]
    emotional = [s for s in scenes if s.emotion is not None]
    assert len(neutral) == 3 * 6 and len(emotional) == 5 * 4
    assert len({s.id for s in scenes}) == len(scenes)
    for s in scenes:
        assert s.split == ("dev" if s.template in DEV_TEMPLATES else "test")
        assert s.template in DEV_TEMPLATES + TEST_TEMPLATES
    # both splits get emotional scenes of every emotion, about half each
    for emo in BUILTIN_EMOTIONS:
        mine = [s for s in emotional if s.emotion == emo]
        dev = sum(s.split == "dev" for s in mine)
        assert 2 <= dev <= 3
    devs = sum(s.split == "dev" for s in emotional)
    assert devs == len(emotional) // 2  # odd counts alternate between the emotions
    # the emotional scenes are the LAST pairs of each list, past the reserved ones
    for emo in BUILTIN_EMOTIONS:
        pairs = load_builtin(emo)
        last = {p.id for p in pairs[len(pairs) - 5:]}
        assert {s.id.split(":")[0] for s in emotional if s.emotion == emo} == last
        texts = {p.emotional.text for p in pairs[len(pairs) - 5:]}
        assert all(any(s.text.startswith(t) for t in texts) for s in emotional if s.emotion == emo)
    with pytest.raises(ValueError, match="exceed"):
        hal.study_scenes(BUILTIN_EMOTIONS, 1, 60, reserved_pairs=64)
    with pytest.raises(ValueError, match="n_neutral"):
        hal.study_scenes(BUILTIN_EMOTIONS, 17, 1, reserved_pairs=0)


def _bank(L=6, d=16, H=4, inter=32):
    from emosteer.request.bank import VectorBank

    g = torch.Generator().manual_seed(0)
    bank = VectorBank()
    for e in BUILTIN_EMOTIONS:
        bank.add(e, "residual", torch.randn(L, d, generator=g) * (1 + BUILTIN_EMOTIONS.index(e)))
    bank.add("joy.probe", "probe", torch.randn(L, d + 1, generator=g), best_layer=2)
    mask = torch.zeros(L, inter)
    mask[3, :4] = 1
    bank.add("joy.ena", "neurons", mask)
    return bank


def test_general_direction_is_the_mean_of_unit_directions():
    bank = _bank()
    name = hal.register_general_direction(bank, BUILTIN_EMOTIONS)
    v = bank.get(name, "residual")
    vs = torch.stack([bank.get(e, "residual") for e in BUILTIN_EMOTIONS])
    unit = vs / vs.norm(dim=-1, keepdim=True)
    want_dir = unit.mean(0) / unit.mean(0).norm(dim=-1, keepdim=True)
    assert torch.allclose(v / v.norm(dim=-1, keepdim=True), want_dir, atol=1e-6)
    # each emotion counts the same whatever its norm: scaling one does not turn it
    bank.add("joy", "residual", bank.get("joy", "residual") * 100)
    hal.register_general_direction(bank, BUILTIN_EMOTIONS, "again")
    a, b = bank.get("again", "residual"), v
    assert torch.allclose(a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True), atol=1e-6)


def test_general_probe_scores_the_mean_of_the_emotions_probes():
    """emotions.probe = the mean of the four probes (its score is the mean of theirs); the
    gate layer has the best mean held-out accuracy and leaves a layer after it."""
    bank = _bank()
    L, d = 6, 16
    g = torch.Generator().manual_seed(1)
    accs = {}
    for i, e in enumerate(BUILTIN_EMOTIONS):
        acc = [0.5] * L
        acc[4] = 0.9 - 0.01 * i
        acc[5] = 1.0  # the last layer: nothing after it to gate
        accs[e] = acc
        bank.add(f"{e}.probe", "probe", torch.randn(L, d + 1, generator=g), heldout_accuracy=acc)
    name, layer = hal.register_general_probe(bank, BUILTIN_EMOTIONS)
    assert name == hal.GENERAL_PROBE and layer == 4
    h = torch.randn(3, d, generator=g)
    got = h @ bank.get(name, "probe")[layer, :d] + bank.get(name, "probe")[layer, d]
    want = torch.stack([h @ bank.get(f"{e}.probe")[layer, :d] + bank.get(f"{e}.probe")[layer, d]
                        for e in BUILTIN_EMOTIONS]).mean(0)
    assert torch.allclose(got, want, atol=1e-5)
    assert bank.meta(name)["best_layer"] == 4


def test_every_candidate_is_a_valid_config():
    from emosteer.request.spec import SteerSpec

    bank = _bank()
    hal.register_general_direction(bank, BUILTIN_EMOTIONS)
    conds = hal.reduction_candidates(BUILTIN_EMOTIONS, 6, band=[3, 2], neg_strengths=(0.1, 0.2),
                                     heads=[(4, 1), (4, 3), (2, 0)], heads_source="emotion-general",
                                     probe="joy.probe", probe_layer=2, ena_set="joy.ena",
                                     ena_gammas=(0.5, 0.25))
    assert conds[0] == {"condition": "unsteered", "label": "unsteered", "spec": None}
    kinds = [c["condition"] for c in conds[1:]]
    assert kinds == ["project_out", "project_out", "clamp", "negative", "negative", "heads_scale",
                     "heads_ablate", "after_gate", "gated", "gated", "ena_down", "ena_down"]
    assert len({c["label"] for c in conds}) == len(conds)
    from emosteer.request.bank import ModelInfo

    info = ModelInfo("LlamaForCausalLM", num_layers=6, hidden_size=16, num_heads=4, head_dim=4,
                     intermediate_size=32, num_kv_heads=4)
    for c in conds[1:]:  # parses and fits the bank and the model, as the engine checks it
        SteerSpec.parse(c["spec"]).validate(bank, info)
    neg = [c for c in conds if c["condition"] == "negative"]
    # the strength is spread over the band's layers, relative to |h|, and negative
    assert neg[0]["spec"]["steer"][0]["scale"] == pytest.approx(-0.05)
    assert neg[0]["spec"]["steer"][0]["layers"] == [2, 3]
    after, *gated = [c for c in conds if c["condition"] in ("after_gate", "gated")]
    for c in (after, *gated):  # the same project-out after the gate, ungated and gated
        assert c["spec"]["steer"] == [{"vector": list(BUILTIN_EMOTIONS), "layers": [3, 4, 5],
                                       "mode": "project_out"}]
    assert "when" not in after["spec"]
    assert [g["spec"]["when"] for g in gated] == [
        {"probe": "joy.probe", "layer": 2, "above": 0.0, "latch": latch} for latch in (False, True)]
    heads = next(c for c in conds if c["condition"] == "heads_ablate")["spec"]["heads"]
    assert heads == [{"layer": 2, "head": [0], "mode": "ablate"}, {"layer": 4, "head": [1, 3], "mode": "ablate"}]
    # a gate at the last layer would gate nothing: no gated candidate then
    conds = hal.reduction_candidates(BUILTIN_EMOTIONS, 6, band=[3], probe="joy.probe", probe_layer=5)
    assert not {"gated", "after_gate"} & {c["condition"] for c in conds}
