"""SteerSpec parsing, validation against a bank, fingerprints and the published schema."""

from __future__ import annotations

import json
import types
from pathlib import Path

import jsonschema
import pytest
import torch

from emosteer.request.bank import ModelInfo, VectorBank
from emosteer.request.spec import (
    MAX_CAPTURE_ROWS,
    MAX_HEAD_ITEMS,
    MAX_STEER_ITEMS,
    BoostItem,
    CaptureItem,
    HeadItem,
    SpecError,
    SteerItem,
    SteerSpec,
)
from emosteer.request.compile import compile_request
from emosteer.request.positions import block_identity
from emosteer.request.schema import json_schema

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "steer.schema.json"
INFO = ModelInfo("LlamaForCausalLM", num_layers=4, hidden_size=64, num_heads=4, head_dim=16,
                 intermediate_size=96, num_kv_heads=2)  # fmt: skip

FULL = {
    "steer": [{"vector": "joy", "layers": [2, 1], "scale": 4.0, "positions": "all"}],
    "heads": [
        {"layer": 2, "head": 3, "mode": "patch", "vector": "joy.h"},
        {"layer": 1, "head": [0, 1], "mode": "add", "vector": "joy.h", "scale": -2},
        {"layer": 0, "head": 2, "mode": "ablate", "positions": "generated"},
        {"layer": 3, "head": 0, "mode": "scale", "scale": 0.5},
    ],
    "neurons": {"set": "joy.ena", "gamma": 1.5},
    "boost": {"heads": "joy.vee", "beta": 1.4},
    "capture": {"heads": "all", "residual": [0, 3], "positions": "last"},
}


@pytest.fixture(scope="module")
def bank() -> VectorBank:
    g = torch.Generator().manual_seed(0)
    b = VectorBank(INFO)
    b.add("joy", "residual", torch.randn(4, 64, generator=g))
    b.add("joy.h", "head", torch.randn(4, 4, 16, generator=g))
    b.add("joy.ena", "neurons", (torch.rand(4, 96, generator=g) > 0.8).float())
    b.add("joy.vee", "head_mask", torch.eye(4))
    return b


def _with(path: str, value) -> dict:
    """FULL with one dotted path (``steer.0.scale``) set to value, or removed if ...."""
    obj = json.loads(json.dumps(FULL))
    *parents, last = path.split(".")
    node = obj
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    key = int(last) if isinstance(node, list) else last
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return obj


# (description, config, expected SpecError.field)
MALFORMED = [
    ("top-level list", [], "spec"),
    ("unknown top key", {**FULL, "steering": []}, "steering"),
    ("steer not a list", {"steer": {"vector": "joy"}}, "steer"),
    ("steer null", {"steer": None}, "steer"),
    ("steer item not object", {"steer": ["joy"]}, "steer[0]"),
    ("unknown steer key", _with("steer.0.alpha", 1.0), "steer[0].alpha"),
    ("missing vector", _with("steer.0.vector", ...), "steer[0].vector"),
    ("missing layers", _with("steer.0.layers", ...), "steer[0].layers"),
    ("missing scale", _with("steer.0.scale", ...), "steer[0].scale"),
    ("unknown steer mode", _with("steer.0.mode", "replace"), "steer[0].mode"),
    ("unknown scale_mode", _with("steer.0.scale_mode", "norm"), "steer[0].scale_mode"),
    ("project_out with scale", _with("steer.0.mode", "project_out"), "steer[0].scale"),
    ("clamp without value", _with("steer.0.mode", "clamp"), "steer[0].value"),
    ("add with value", _with("steer.0.value", 1.0), "steer[0].value"),
    ("vector list for add", _with("steer.0.vector", ["joy", "anger"]), "steer[0].vector"),
    ("project_out basis repeats", {"steer": [{"vector": ["joy", "joy"], "layers": [1], "mode": "project_out"}]},
     "steer[0].vector"),
    ("when above and below", {"steer": [{"vector": "joy", "layers": [3], "scale": 1}],
                              "when": {"probe": "p", "layer": 1, "above": 0, "below": 1}}, "when"),
    ("when latch not bool", {"steer": [{"vector": "joy", "layers": [3], "scale": 1}],
                             "when": {"probe": "p", "layer": 1, "above": 0, "latch": "yes"}}, "when.latch"),
    ("capture probe without when", {"capture": {"probe": True}}, "capture.probe"),
    ("empty vector name", _with("steer.0.vector", ""), "steer[0].vector"),
    ("vector name int", _with("steer.0.vector", 3), "steer[0].vector"),
    ("scale string", _with("steer.0.scale", "4"), "steer[0].scale"),
    ("scale bool", _with("steer.0.scale", True), "steer[0].scale"),
    ("scale nan", _with("steer.0.scale", float("nan")), "steer[0].scale"),
    ("scale inf", _with("steer.0.scale", float("inf")), "steer[0].scale"),
    ("scale absurd", _with("steer.0.scale", 1e5), "steer[0].scale"),
    ("scale absurd negative", _with("steer.0.scale", -2e4), "steer[0].scale"),
    ("layers empty", _with("steer.0.layers", []), "steer[0].layers"),
    ("layers duplicate", _with("steer.0.layers", [1, 1]), "steer[0].layers"),
    ("layers negative", _with("steer.0.layers", [1, -1]), "steer[0].layers[1]"),
    ("layers fraction", _with("steer.0.layers", 1.5), "steer[0].layers"),
    ("layers item fraction", _with("steer.0.layers", [1.5]), "steer[0].layers[0]"),
    ("layers word", _with("steer.0.layers", "every"), "steer[0].layers"),
    ("positions bad", _with("steer.0.positions", "first"), "steer[0].positions"),
    ("positions empty list", _with("steer.0.positions", []), "steer[0].positions"),
    ("positions negative", _with("steer.0.positions", [3, -1]), "steer[0].positions[1]"),
    ("positions not int", _with("steer.0.positions", [1.5]), "steer[0].positions[0]"),
    ("positions twice", _with("steer.0.positions", [2, 2]), "steer[0].positions"),
    ("heads not list", {"heads": {"layer": 0}}, "heads"),
    ("head missing mode", _with("heads.0.mode", ...), "heads[0].mode"),
    ("head mode bad", _with("heads.0.mode", "zero"), "heads[0].mode"),
    ("head relative patch", {"heads": [{"layer": 0, "head": 1, "mode": "patch", "vector": "v",
                                        "scale_mode": "relative"}]}, "heads[0].scale_mode"),
    ("head scale_mode bad", {"heads": [{"layer": 0, "head": 1, "mode": "add", "vector": "v",
                                        "scale_mode": "norm"}]}, "heads[0].scale_mode"),
    ("head layer negative", _with("heads.0.layer", -1), "heads[0].layer"),
    ("head list empty", _with("heads.1.head", []), "heads[1].head"),
    ("head all not allowed", _with("heads.1.head", "all"), "heads[1].head"),
    ("patch without vector", _with("heads.0.vector", ...), "heads[0].vector"),
    ("patch with scale", _with("heads.0.scale", 2.0), "heads[0].scale"),
    ("add without vector", _with("heads.1.vector", ...), "heads[1].vector"),
    ("ablate with vector", _with("heads.2.vector", "joy.h"), "heads[2].vector"),
    ("scale without scale", _with("heads.3.scale", ...), "heads[3].scale"),
    ("scale with vector", _with("heads.3.vector", "joy.h"), "heads[3].vector"),
    ("head duplicate", _with("heads.3", {"layer": 2, "head": 3, "mode": "ablate"}), "heads[3].head"),
    ("head unknown key", _with("heads.2.alpha", 1), "heads[2].alpha"),
    ("neurons not object", {"neurons": "joy.ena"}, "neurons"),
    ("neurons missing gamma", _with("neurons.gamma", ...), "neurons.gamma"),
    ("gamma zero", _with("neurons.gamma", 0), "neurons.gamma"),
    ("gamma negative", _with("neurons.gamma", -1.5), "neurons.gamma"),
    ("gamma absurd", _with("neurons.gamma", 101), "neurons.gamma"),
    ("neurons unknown key", _with("neurons.k", 10), "neurons.k"),
    ("boost beta zero", _with("boost.beta", 0.0), "boost.beta"),
    ("boost missing heads", _with("boost.heads", ...), "boost.heads"),
    ("boost positions", _with("boost.positions", "all"), "boost.positions"),
    ("boost mode bad", _with("boost.mode", "scores"), "boost.mode"),
    ("boost prefill layers empty", _with("boost.prefill_layers", []), "boost.prefill_layers"),
    ("boost decode layers bad", _with("boost.decode_layers", "deep"), "boost.decode_layers"),
    ("boost nowhere", _with("boost", {"heads": "joy.vee", "beta": 2, "prefill_layers": "none",
                                      "decode_layers": "none"}), "boost"),
    ("capture attn_image bool", _with("capture.attn_image", False), "capture.attn_image"),
    ("capture empty", {"capture": {}}, "capture"),
    ("capture only positions", {"capture": {"positions": "all"}}, "capture"),
    ("capture positions bad", _with("capture.positions", "prompt"), "capture.positions"),
    ("capture heads bool", _with("capture.heads", True), "capture.heads"),
    ("capture residual null", _with("capture.residual", None), "capture.residual"),
    ("capture unknown key", _with("capture.mlp", "all"), "capture.mlp"),
]


@pytest.mark.parametrize("desc,config,field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_names_field(desc, config, field):
    with pytest.raises(SpecError) as exc:
        SteerSpec.parse(config)
    assert exc.value.field == field, str(exc.value)
    if field != "spec":
        assert field in str(exc.value)


def test_head_twice_for_disjoint_positions():
    both = [
        {"layer": 1, "head": 2, "mode": "patch", "vector": "joy.h", "positions": "prompt"},
        {"layer": 1, "head": 2, "mode": "ablate", "positions": "generated"},
    ]
    assert len(SteerSpec.parse({"heads": both}).heads) == 2
    for pos in ("prompt", "all"):
        clash = [both[0], {**both[1], "positions": pos}]
        with pytest.raises(SpecError) as exc:
            SteerSpec.parse({"heads": clash})
        assert exc.value.field == "heads[1].head"


def test_item_limits():
    many = {"steer": [{"vector": "joy", "layers": 0, "scale": 1}] * (MAX_STEER_ITEMS + 1)}
    with pytest.raises(SpecError) as exc:
        SteerSpec.parse(many)
    assert exc.value.field == "steer"
    heads = [{"layer": layer, "head": list(range(256)), "mode": "ablate"} for layer in range(257)]
    with pytest.raises(SpecError) as exc:
        SteerSpec.parse({"heads": heads})
    assert exc.value.field == "heads" and str(MAX_HEAD_ITEMS) in str(exc.value)


def test_integral_float_is_int():
    spec = SteerSpec.parse({"steer": [{"vector": "joy", "layers": [1.0, 2], "scale": 1}]})
    assert spec.steer[0].layers == (1, 2)
    assert SteerSpec.parse(b'{"capture": {"residual": 3.0}}').capture.residual == (3,)
    with pytest.raises(SpecError) as exc:
        SteerSpec.parse(b"\xff\xfe")
    assert exc.value.field == "spec"


def test_json_string_nan_names_field():
    with pytest.raises(SpecError) as exc:
        SteerSpec.parse('{"steer": [{"vector": "joy", "layers": 1, "scale": NaN}]}')
    assert exc.value.field == "steer[0].scale"
    with pytest.raises(SpecError) as exc:
        SteerSpec.parse('{"steer": [')
    assert exc.value.field == "spec"


def test_parse_full_and_round_trip():
    spec = SteerSpec.parse(FULL)
    assert spec.steer == (SteerItem("joy", (1, 2), 4.0, "all"),)
    assert len(spec.heads) == 5  # head [0, 1] expands to two items
    assert spec.heads[1] == HeadItem(1, 0, "add", "joy.h", -2.0, "all")
    assert spec.heads[0].affine() == (0.0, 1.0)
    assert spec.heads[1].affine() == (1.0, -2.0)
    assert spec.heads[3].affine() == (0.0, 0.0)
    assert spec.heads[4].affine() == (0.5, 0.0)
    assert spec.capture == CaptureItem("all", (0, 3), "last")
    assert SteerSpec.parse(spec.to_dict()) == spec
    assert SteerSpec.parse(json.dumps(spec.to_dict())) == spec
    assert SteerSpec.parse(spec) is spec
    assert hash(spec) == hash(SteerSpec.parse(FULL))


def _changes_prompt(spec: SteerSpec, bank: VectorBank, num_prompt: int = 8) -> bool:
    """Whether the KV of some prompt token differs from the plain model's: the prefix-cache
    identity of the prompt's block is not the plain one."""
    ident = compile_request(spec.resolve(INFO), bank, INFO, num_prompt).cache_identity(num_prompt)
    return block_identity(ident, 0, num_prompt) is not None


def test_empty_and_predicates(bank):
    for empty in (None, {}, "{}"):
        spec = SteerSpec.parse(empty)
        assert spec.is_empty() and not spec.intervenes() and not _changes_prompt(spec, bank)
        assert spec.to_dict() == {}
    cap = SteerSpec.parse({"capture": {"residual": 1}})
    assert not cap.is_empty() and not cap.intervenes() and not _changes_prompt(cap, bank)
    gen = SteerSpec.parse({"steer": [{"vector": "joy", "layers": 0, "scale": 1, "positions": "generated"}]})
    assert gen.intervenes() and not _changes_prompt(gen, bank)
    for pos in ("all", "prompt"):
        s = SteerSpec.parse({"heads": [{"layer": 0, "head": 0, "mode": "ablate", "positions": pos}]})
        assert _changes_prompt(s, bank)
    assert _changes_prompt(SteerSpec.parse({"boost": {"heads": "joy.vee", "beta": 2}}), bank)
    # a boost that acts only while the narrative is written leaves the prompt's KV alone
    late = SteerSpec.parse({"boost": {"heads": "joy.vee", "beta": 2, "prefill_layers": "none",
                                      "decode_layers": [1]}})
    assert late.intervenes() and not _changes_prompt(late, bank)
    att = SteerSpec.parse({"capture": {"attn_image": [0, 1]}})
    assert not att.intervenes() and not _changes_prompt(att, bank) and not att.is_empty()
    assert _changes_prompt(SteerSpec.parse({"neurons": {"set": "joy.ena", "gamma": 2, "positions": "prompt"}}), bank)


def test_fingerprint_stability_and_sensitivity(bank):
    spec = SteerSpec.parse(FULL)
    fp = spec.fingerprint()
    assert len(fp) == 64 and fp == SteerSpec.parse(json.dumps(FULL)).fingerprint()
    # capture is not part of the intervention; item order and int/float spelling neither
    assert SteerSpec.parse({**FULL, "capture": {"residual": "all"}}).fingerprint() == fp
    assert SteerSpec.parse({k: v for k, v in FULL.items() if k != "capture"}).fingerprint() == fp
    assert SteerSpec.parse({**FULL, "heads": FULL["heads"][::-1]}).fingerprint() == fp
    assert SteerSpec.parse(_with("steer.0.scale", 4)).fingerprint() == fp
    assert SteerSpec.parse(_with("steer.0.layers", [1, 2])).fingerprint() == fp
    changed = [
        _with("steer.0.scale", 4.0001),
        _with("steer.0.layers", [1]),
        _with("steer.0.positions", "prompt"),
        _with("steer.0.vector", "sad"),
        _with("heads.0.head", 2),
        _with("heads.3.scale", 0.6),
        _with("neurons.gamma", 1.6),
        _with("boost.beta", 1.5),
        {k: v for k, v in FULL.items() if k != "boost"},
    ]
    fps = {SteerSpec.parse(c).fingerprint() for c in changed}
    assert fp not in fps and len(fps) == len(changed)
    # "all" equals the explicit list once resolved
    a = SteerSpec.parse({"steer": [{"vector": "joy", "layers": "all", "scale": 1}]})
    b = SteerSpec.parse({"steer": [{"vector": "joy", "layers": [0, 1, 2, 3], "scale": 1}]})
    assert a.fingerprint() != b.fingerprint()
    assert a.resolve(INFO).fingerprint() == b.resolve(INFO).fingerprint()


def test_fingerprint_mixes_bank_content(bank):
    spec = SteerSpec.parse(FULL)
    fp = spec.fingerprint(bank)
    assert fp != spec.fingerprint() and fp == spec.fingerprint(bank)
    other = VectorBank(INFO)
    other.update(bank)
    assert spec.fingerprint(other) == fp
    # re-registering a vector under the same name must give a new fingerprint
    other.add("joy", "residual", bank.get("joy") * 2)
    assert spec.fingerprint(other) != fp
    assert spec.fingerprint() == SteerSpec.parse(FULL).fingerprint()


def test_validate_ok(bank):
    spec = SteerSpec.parse(FULL)
    spec.validate(bank, INFO)
    spec.resolve(INFO).validate(bank, INFO)
    SteerSpec().validate(None, INFO)


@pytest.mark.parametrize(
    "config,field",
    [
        (_with("steer.0.vector", "nope"), "steer[0].vector"),
        (_with("steer.0.vector", "joy.h"), "steer[0].vector"),  # wrong kind
        (_with("steer.0.layers", [1, 4]), "steer[0].layers"),
        (_with("heads.0.layer", 4), "heads[0].layer"),
        (_with("heads.0.head", 4), "heads[0].head"),
        (_with("heads.0.vector", "joy"), "heads[0].vector"),
        (_with("neurons.set", "joy.vee"), "neurons.set"),
        (_with("boost.heads", "joy.ena"), "boost.heads"),
        (_with("capture.heads", [0, 9]), "capture.heads"),
        (_with("capture.residual", 4), "capture.residual"),
    ],
)
def test_validate_names_field(bank, config, field):
    spec = SteerSpec.parse(config)
    with pytest.raises(SpecError) as exc:
        spec.validate(bank, INFO)
    assert exc.value.field == field, str(exc.value)


def test_validate_without_bank_and_wrong_shape(bank):
    with pytest.raises(SpecError, match="no vector"):
        SteerSpec.parse(FULL).validate(None, INFO)
    loose = VectorBank()  # no model info: shapes are checked by validate
    loose.add("joy", "residual", torch.ones(3, 64))
    spec = SteerSpec.parse({"steer": [{"vector": "joy", "layers": 0, "scale": 1}]})
    with pytest.raises(SpecError) as exc:
        spec.validate(loose, INFO)
    assert exc.value.field == "steer[0].vector" and "shape" in str(exc.value)


def test_capture_row_limit(bank):
    spec = SteerSpec.parse({"capture": {"heads": "all", "residual": "all", "positions": "all"}})
    spec.validate(bank, INFO)  # token counts unknown: nothing to count yet
    spec.validate(bank, INFO, num_prompt_tokens=100, max_new_tokens=400)  # 8 x 500
    rows = MAX_CAPTURE_ROWS // 8 + 1
    with pytest.raises(SpecError) as exc:
        spec.validate(bank, INFO, num_prompt_tokens=rows, max_new_tokens=0)
    assert exc.value.field == "capture.positions" and str(MAX_CAPTURE_ROWS) in str(exc.value)
    gen = SteerSpec.parse({"capture": {"residual": [0], "positions": "generated"}})
    with pytest.raises(SpecError):
        gen.validate(bank, INFO, max_new_tokens=MAX_CAPTURE_ROWS + 1)
    huge = ModelInfo("X", 5000, 64, 4, 16, 96, 4)  # positions "last" is always counted
    with pytest.raises(SpecError):
        SteerSpec.parse({"capture": {"residual": "all"}}).validate(None, huge)


def test_resolve():
    spec = SteerSpec.parse({**FULL, "steer": [{"vector": "joy", "layers": "all", "scale": 1}]})
    r = spec.resolve(INFO)
    assert r.steer[0].layers == (0, 1, 2, 3)
    assert r.capture == CaptureItem((0, 1, 2, 3), (0, 3), "last")
    assert r.heads == spec.heads and r.resolve(INFO) == r


def test_schema_file_matches():
    on_disk = json.loads(SCHEMA_FILE.read_text())
    assert on_disk == json_schema(), (
        "docs/steer.schema.json is stale; regenerate with: python -c \"import json; "
        "from emosteer.request.schema import json_schema; print(json.dumps(json_schema(), indent=2))\" "
        "> docs/steer.schema.json"
    )


GOOD = [
    FULL,
    {},
    {"steer": [{"vector": "joy", "layers": "all", "scale": -3}]},
    {"heads": [{"layer": 1, "head": [1, 2], "mode": "add", "vector": "v"}]},
    {"heads": [{"layer": 1, "head": [1, 2], "mode": "add", "vector": "v", "scale": 0.3,
                "scale_mode": "relative"}]},
    {"capture": {"residual": 3, "positions": "generated"}},
    {"boost": {"heads": "joy.vee", "beta": 1.5, "mode": "logit", "prefill_layers": [0, 1],
               "decode_layers": "none"}},
    {"capture": {"attn_image": "all", "positions": "all"}},
    {"steer": [{"vector": "joy", "layers": [3], "scale": 0.1, "scale_mode": "relative"},
               {"vector": ["joy", "anger"], "layers": "all", "mode": "project_out"},
               {"vector": "calm", "layers": [4], "mode": "clamp", "value": 2},
               {"vector": "calm", "layers": [5], "mode": "clamp", "scale": 0.5, "scale_mode": "relative"}],
     "when": {"probe": "joy.probe", "layer": 1, "above": 0.5, "latch": True},
     "capture": {"probe": True, "positions": "all"}},
]


def test_boost_phases_and_round_trip():
    spec = SteerSpec.parse({"boost": {"heads": "joy.vee", "beta": 2.0, "decode_layers": [2, 3]},
                            "capture": {"attn_image": [1]}})
    assert spec.boost == BoostItem("joy.vee", 2.0, "weight", None, (2, 3))
    assert spec.capture.attn_image == (1,)
    assert SteerSpec.parse(spec.to_dict()) == spec
    info = types.SimpleNamespace(num_layers=4)
    r = spec.resolve(info)
    assert r.boost.prefill_layers == (0, 1, 2, 3) and r.boost.decode_layers == (2, 3)
    assert SteerSpec.parse({"boost": {"heads": "joy.vee", "beta": 2.0, "mode": "logit"}}).fingerprint() != \
        SteerSpec.parse({"boost": {"heads": "joy.vee", "beta": 2.0}}).fingerprint()


@pytest.mark.parametrize("config", GOOD)
def test_schema_accepts_good(config):
    jsonschema.Draft202012Validator.check_schema(json_schema())
    jsonschema.validate(config, json_schema())
    jsonschema.validate(SteerSpec.parse(config).to_dict(), json_schema())


# every malformed config the schema can see (not NaN: JSON has none; not duplicates of
# one head across items, which need the expansion)
SCHEMA_BLIND = {"scale nan", "scale inf", "head duplicate"}


SCHEMA_SEES = [(d, c) for d, c, _ in MALFORMED if d not in SCHEMA_BLIND]


@pytest.mark.parametrize("desc,config", SCHEMA_SEES, ids=[d for d, _ in SCHEMA_SEES])
def test_schema_rejects_bad(desc, config):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, json_schema())


def test_positions_last_and_lists(bank):
    """"last" and explicit prompt positions parse, round-trip, salt the prompt, and are
    checked against the prompt length; overlapping head items are refused."""
    spec = SteerSpec.parse({
        "steer": [{"vector": "joy", "layers": [0], "scale": 1.0, "positions": [5, 1, 3]}],
        "heads": [{"layer": 0, "head": 1, "mode": "ablate", "positions": "last"},
                  {"layer": 0, "head": 1, "mode": "scale", "scale": 2.0, "positions": "generated"}],
    })
    assert spec.steer[0].positions == (1, 3, 5)
    assert SteerSpec.parse(spec.to_dict()) == spec
    assert _changes_prompt(spec, bank)
    with pytest.raises(SpecError) as e:
        SteerSpec.parse({"heads": [{"layer": 0, "head": 1, "mode": "ablate", "positions": [2, 4]},
                                   {"layer": 0, "head": 1, "mode": "ablate", "positions": [4]}]})
    assert e.value.field == "heads[1].head"
    SteerSpec.parse({"heads": [{"layer": 0, "head": 1, "mode": "ablate", "positions": [2]},
                               {"layer": 0, "head": 1, "mode": "ablate", "positions": [3]}]})
    with pytest.raises(SpecError) as e:
        SteerSpec.parse({"heads": [{"layer": 0, "head": 1, "mode": "ablate", "positions": "prompt"},
                                   {"layer": 0, "head": 1, "mode": "ablate", "positions": "last"}]})
    assert e.value.field == "heads[1].head"


def test_boost_compiles_per_phase():
    """The prompt slot boosts at prefill_layers, the generated slot at decode_layers;
    position groups of the prompt carry the prefill boost too; heads come from the mask."""
    from emosteer.request.compile import compile_request

    info = ModelInfo("LlamaForCausalLM", num_layers=4, hidden_size=8, num_heads=3, head_dim=4,
                     intermediate_size=8, num_kv_heads=3)
    bank = VectorBank(info)
    mask = torch.zeros(4, 3)
    mask[0, 1] = mask[2, 0] = mask[3, 2] = 1
    bank.add("joy.vee", "head_mask", mask)
    bank.add("joy", "residual", torch.ones(4, 8))
    spec = SteerSpec.parse({"boost": {"heads": "joy.vee", "beta": 2.0, "mode": "logit",
                                      "prefill_layers": [0, 1], "decode_layers": [2, 3]},
                            "steer": [{"vector": "joy", "layers": [1], "scale": 1.0, "positions": "last"}]})
    spec.validate(bank, info)
    prog = compile_request(spec.resolve(info), bank, info, num_prompt=5)
    assert prog.phases["prompt"].boost == {0: {1: 2.0}}  # layer 1 has no masked head
    assert prog.phases["generated"].boost == {2: {0: 2.0}, 3: {2: 2.0}}
    assert prog.phases["prompt"].boost_mode == prog.phases["generated"].boost_mode == 1
    assert prog.phases["@4"].boost == {0: {1: 2.0}} and 1 in prog.phases["@4"].res
    assert prog.phases["prompt"].layers()["boost"] == {0}
    fps = prog.fingerprints()
    assert fps["prompt"] != fps["generated"]
    decode_only = SteerSpec.parse({"boost": {"heads": "joy.vee", "beta": 2.0, "prefill_layers": "none"}})
    p2 = compile_request(decode_only.resolve(info), bank, info, num_prompt=5)
    assert p2.phases["prompt"] is None and p2.phases["generated"].boost == {0: {1: 2.0}, 2: {0: 2.0}, 3: {2: 2.0}}


def test_residual_modes_and_gate_round_trip_and_fingerprint():
    """The new residual modes and the gate parse, round-trip, and are part of the
    fingerprint; the defaults print as before (old fingerprints unchanged)."""
    plain = SteerSpec.parse({"steer": [{"vector": "joy", "layers": [2], "scale": 1.0}]})
    assert plain.to_dict()["steer"][0] == {"vector": "joy", "layers": [2], "scale": 1.0, "positions": "all"}
    rel = SteerSpec.parse({"steer": [{"vector": "joy", "layers": [2], "scale": 1.0, "scale_mode": "relative"}]})
    gated = SteerSpec.parse({"steer": [{"vector": "joy", "layers": [2], "scale": 1.0}],
                             "when": {"probe": "p", "layer": 1, "below": -0.5}})
    latched = SteerSpec.parse({**gated.to_dict(), "when": {"probe": "p", "layer": 1, "below": -0.5, "latch": True}})
    fps = {s.fingerprint() for s in (plain, rel, gated, latched)}
    assert len(fps) == 4
    for s in (rel, gated, latched):
        assert SteerSpec.parse(s.to_dict()) == s
    assert gated.when.below and gated.when.threshold == -0.5 and not gated.when.latch
    with pytest.raises(SpecError) as e:
        SteerSpec.parse({"steer": [{"vector": "joy", "layers": [1], "scale": 1.0}],
                         "when": {"probe": "p", "layer": 1, "above": 0}})
    assert e.value.field == "when.layer"


def test_mode_numbers_match_the_kernels():
    from emosteer.ops import reference
    from emosteer.request.compile import RES_MODES, RES_RELATIVE

    assert RES_MODES == reference.RES_MODES and RES_RELATIVE == reference.RES_RELATIVE


def test_inline_head_vectors_parse_round_trip_and_join_the_bank():
    """A heads item's inline rows: per listed head, for other heads (``heads``), or the
    layer's [H, D] block; named by content, layer and heads; the dict round-trips; errors
    name the field."""
    import torch

    from emosteer.client import inline_vector
    from emosteer.request import inline as inline_vec

    g = torch.Generator().manual_seed(3)
    z = torch.randn(INFO.num_heads, INFO.head_dim, generator=g) + 0.5
    per_head = SteerSpec.parse({"heads": [{"layer": 2, "head": [1, 3], "mode": "patch",
                                           "vector": inline_vector(z[[1, 3]])}]})
    block = SteerSpec.parse({"heads": [{"layer": 2, "head": [1, 3], "mode": "patch", "vector": inline_vector(z)}]})
    chosen = SteerSpec.parse({"heads": [{"layer": 2, "head": 3, "mode": "add", "scale": 2.0,
                                         "vector": inline_vector(z[[3, 1]], heads=[3, 1])}]})
    for spec in (per_head, block, chosen):
        spec.validate(None, INFO, 8)
        (name,) = spec.inline_names()
        assert name.startswith(inline_vec.PREFIX)
        again = SteerSpec.parse(json.loads(json.dumps(spec.to_dict())))
        assert again.inline_names() == [name] and again.to_dict() == spec.to_dict()
        entry = inline_vec.overlay(None, INFO, spec.inline_items()).get(name)
        assert entry.shape == (INFO.num_layers, INFO.num_heads, INFO.head_dim)
        for h in (1, 3):  # the rows the items read
            assert torch.equal(entry[2, h], z[h])
        assert not entry[[0, 1, 3]].any()  # other layers are zero
    assert per_head.inline_names() != block.inline_names()  # other data, other name
    # the same rows on another layer are another vector
    moved = SteerSpec.parse({"heads": [{"layer": 1, "head": [1, 3], "mode": "patch",
                                        "vector": inline_vector(z[[1, 3]])}]})
    assert moved.inline_names() != per_head.inline_names()
    bad = [
        ({"data": "%%", "dtype": "float32"}, "heads[0].vector.data"),
        (inline_vector(torch.ones(3)), "heads[0].vector.data"),
        (inline_vector(torch.full((2, INFO.head_dim), float("inf"))), "heads[0].vector.data"),
        (inline_vector(z[[1]], heads=[1]), "heads[0].vector.heads"),
        ({**inline_vector(z[[1, 3]]), "layers": [2]}, "heads[0].vector.layers"),
    ]
    for vector, field in bad:
        with pytest.raises(SpecError) as e:
            s = SteerSpec.parse({"heads": [{"layer": 2, "head": [1, 3], "mode": "patch", "vector": vector}]})
            s.validate(None, INFO, 8)
        assert e.value.field == field, (field, str(e.value))
    with pytest.raises(SpecError) as e:  # head out of range in the inline object's own list
        s = SteerSpec.parse({"heads": [{"layer": 2, "head": 1, "mode": "patch",
                                        "vector": inline_vector(z[[1, 1]], heads=[1, 9])}]})
        s.validate(None, INFO, 8)
    assert e.value.field == "heads[0].vector.heads"


def test_relative_head_add_compiles_to_scale_over_the_vector_norm(bank):
    """A relative head add compiles to (a, b, c) = (1, 0, scale / |v[l, h]|) over the
    vector's pool row; it round-trips, is its own fingerprint (not the absolute add's);
    a zero vector at that head, a per-position vector or a missing bank is refused
    naming the field."""
    from emosteer.request.spec import head_norm

    cfg = {"heads": [{"layer": 2, "head": [0, 3], "mode": "add", "vector": "joy.h", "scale": 0.4,
                      "scale_mode": "relative"}]}
    spec = SteerSpec.parse(cfg)
    assert SteerSpec.parse(spec.to_dict()) == spec and spec.heads[0].relative
    spec.validate(bank, INFO)
    prog = compile_request(spec.resolve(INFO), bank, INFO).phases["prompt"]
    for h in (0, 3):
        a, b, c, key = prog.heads[(2, h)]
        want = 0.4 / float(bank.get("joy.h")[2, h].float().norm())
        assert (a, b) == (1.0, 0.0) and c == pytest.approx(want, rel=1e-6) and key is not None
        assert c == 0.4 / head_norm(bank, spec.heads[0 if h == 0 else 1])
    absolute = SteerSpec.parse({"heads": [{**cfg["heads"][0], "scale_mode": "absolute"}]})
    assert absolute.fingerprint(bank) != spec.fingerprint(bank)
    assert compile_request(absolute.resolve(INFO), bank, INFO).phases["prompt"].heads[(2, 0)][1:3] == (0.4, 0.0)
    zero = VectorBank(INFO)
    vec = torch.randn(4, 4, 16)
    vec[2, 3] = 0
    zero.add("joy.h", "head", vec)
    with pytest.raises(SpecError) as e:
        spec.validate(zero, INFO)
    assert e.value.field == "heads[1].vector" and "zero" in str(e.value)
    per_pos = VectorBank(INFO)
    per_pos.add("joy.h", "head_positions", torch.randn(2, 4, 4, 16))
    rel_pos = SteerSpec.parse({"heads": [{**cfg["heads"][0], "head": 0, "positions": [0, 1]}]})
    with pytest.raises(SpecError) as e:
        rel_pos.validate(per_pos, INFO)
    assert e.value.field == "heads[0].scale_mode"
