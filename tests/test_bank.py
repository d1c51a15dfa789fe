"""VectorBank: entries, safetensors round trip, bad files, model matching, TP shards."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from emosteer.request.bank import (
    FORMAT_VERSION,
    BankError,
    ModelInfo,
    VectorBank,
    head_shard,
    neuron_shard,
    shard_entry,
)

INFO = ModelInfo("LlamaForCausalLM", num_layers=3, hidden_size=48, num_heads=6, head_dim=8,
                 intermediate_size=40, num_kv_heads=2)  # fmt: skip


def make_bank(info: ModelInfo = INFO) -> VectorBank:
    g = torch.Generator().manual_seed(1)
    L, d, H, D = info.num_layers, info.hidden_size, info.num_heads, info.head_dim
    inter = info.intermediate_size
    bank = VectorBank(info)
    bank.add("joy", "residual", torch.randn(L, d, generator=g), emotion="joy", method="diffmean",
             layers=[0, 2], created="2026-11-25T18:00:00Z")  # fmt: skip
    bank.add("joy.h", "head", torch.randn(L, H, D, generator=g, dtype=torch.float64), emotion="joy")
    bank.add("joy.ena", "neurons", torch.rand(L, inter, generator=g) > 0.7)
    bank.add("joy.vee", "head_mask", torch.randint(0, 2, (L, H), generator=g))
    return bank


def test_add_get_kind_meta():
    bank = make_bank()
    assert bank.names() == ["joy", "joy.ena", "joy.h", "joy.vee"]
    assert bank.names("head") == ["joy.h"]
    assert bank.kind("joy.ena") == "neurons"
    assert bank.meta("joy") == {"emotion": "joy", "method": "diffmean", "layers": [0, 2],
                                "created": "2026-11-25T18:00:00Z"}  # fmt: skip
    assert bank.get("joy.ena").dtype == torch.float32  # masks are stored as float 0/1
    assert bank.get("joy.h", "head").dtype == torch.float64
    assert "joy" in bank and len(bank) == 4
    with pytest.raises(BankError, match="'sad'"):
        bank.get("sad")
    with pytest.raises(BankError, match="kind 'residual', expected 'head'"):
        bank.get("joy", "head")


ADD_BAD = [
    ("", "residual", torch.zeros(3, 48), {}, "name"),
    ("x", "vector", torch.zeros(3, 48), {}, "unknown kind"),
    ("x", "residual", [[0.0]], {}, "torch.Tensor"),
    ("x", "residual", torch.zeros(48), {}, "2-d"),
    ("x", "residual", torch.zeros(3, 47), {}, r"axis 1 \(hidden_size\) is 47"),
    ("x", "head", torch.zeros(3, 5, 8), {}, r"axis 1 \(num_heads\) is 5"),
    ("x", "neurons", torch.zeros(4, 40), {}, r"axis 0 \(num_layers\) is 4"),
    ("x", "residual", torch.zeros(3, 48, dtype=torch.int64), {}, "floating"),
    ("x", "residual", torch.full((3, 48), float("nan")), {}, "NaN"),
    ("x", "neurons", torch.full((3, 40), 0.5), {}, "0/1 mask"),
    ("x", "residual", torch.zeros(3, 48), {"when": object()}, "JSON"),
    ("x", "probe", torch.zeros(3, 48), {}, r"axis 1 \(hidden_size\+1\) is 48, model has 49"),
    ("x", "probe", torch.zeros(2, 49), {}, r"axis 0 \(num_layers\) is 2"),
    ("x", "probe", torch.zeros(49), {}, r"2-d tensor \[num_layers, hidden_size\+1\]"),
    ("x", "probe", torch.zeros(3, 49, dtype=torch.int64), {}, "probe.*floating"),
    ("x", "probe", torch.full((3, 49), float("inf")), {}, "NaN or inf"),
]


@pytest.mark.parametrize("name,kind,tensor,meta,match", ADD_BAD, ids=[c[-1] for c in ADD_BAD])
def test_add_rejects(name, kind, tensor, meta, match):
    with pytest.raises(BankError, match=match):
        VectorBank(INFO).add(name, kind, tensor, **meta)


def test_replace_changes_content_hash():
    bank = make_bank()
    h = bank.content_hash("joy")
    assert len(h) == 64 and h == make_bank().content_hash("joy")
    assert h != bank.content_hash("joy.h")
    bank.add("joy", "residual", bank.get("joy") + 1)
    assert bank.content_hash("joy") != h
    bank.remove("joy")
    assert "joy" not in bank
    with pytest.raises(BankError):
        bank.content_hash("joy")


def test_save_load_round_trip(tmp_path):
    bank = make_bank()
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = VectorBank.load(path)
    assert loaded.info == INFO
    assert loaded.names() == bank.names()
    for n in bank.names():
        assert loaded.kind(n) == bank.kind(n)
        assert loaded.meta(n) == bank.meta(n)
        assert torch.equal(loaded.get(n), bank.get(n)) and loaded.get(n).dtype == bank.get(n).dtype
        assert loaded.content_hash(n) == bank.content_hash(n)
    # the header is what the docs say it is
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["emosteer"])
    assert header["format_version"] == FORMAT_VERSION
    assert header["model"] == dataclasses.asdict(INFO)
    assert header["entries"]["joy"]["kind"] == "residual"


def test_bfloat16_round_trip(tmp_path):
    bank = VectorBank(INFO)
    bank.add("v", "residual", torch.randn(3, 48).to(torch.bfloat16))
    bank.save(tmp_path / "bf16.safetensors")
    loaded = VectorBank.load(tmp_path / "bf16.safetensors")
    assert loaded.get("v").dtype == torch.bfloat16 and torch.equal(loaded.get("v"), bank.get("v"))
    assert loaded.content_hash("v") == bank.content_hash("v")


def test_bank_without_model_info(tmp_path):
    bank = VectorBank()
    bank.add("v", "residual", torch.ones(2, 5))
    bank.save(tmp_path / "b.safetensors")
    loaded = VectorBank.load(tmp_path / "b.safetensors")
    assert loaded.info is None and torch.equal(loaded.get("v"), torch.ones(2, 5))
    with pytest.raises(BankError, match=r"v: shape \(2, 5\)"):
        loaded.validate_against(INFO)


@pytest.mark.parametrize("field", ["num_layers", "hidden_size", "num_heads", "head_dim",
                                   "intermediate_size", "num_kv_heads", "architecture"])  # fmt: skip
def test_validate_against_names_field(field):
    bank = make_bank()
    bank.validate_against(INFO)
    other = dataclasses.replace(INFO, **{field: "Other" if field == "architecture" else 7})
    with pytest.raises(BankError, match=field):
        bank.validate_against(other)
    if field == "architecture":
        bank.validate_against(other, check_architecture=False)


def _write(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)
    return path


def _header(**override) -> dict:
    h = {"format_version": FORMAT_VERSION, "model": dataclasses.asdict(INFO),
         "entries": {"v": {"kind": "residual"}}}  # fmt: skip
    h.update(override)
    return {"emosteer": json.dumps(h)}


LOAD_BAD = [
    ({"v": torch.zeros(3, 48)}, None, "lacks the 'emosteer'"),
    ({"v": torch.zeros(3, 48)}, {"emosteer": "{not json"}, "not valid JSON"),
    ({"v": torch.zeros(3, 48)}, {"emosteer": "[1]"}, "JSON object"),
    ({"v": torch.zeros(3, 48)}, _header(format_version=99), "format_version 99"),
    ({"v": torch.zeros(3, 48)}, _header(model={"num_layers": 3}), "model: model info lacks"),
    ({"v": torch.zeros(3, 48)}, _header(entries=[]), "entries must be"),
    ({"v": torch.zeros(3, 48)}, _header(entries={"v": {"kind": "bad"}}), "unknown kind"),
    ({"v": torch.zeros(3, 48)}, _header(entries={"v": {}}), "entries.v"),
    ({"v": torch.zeros(3, 48), "w": torch.zeros(1)}, _header(), r"tensors without an entry: \['w'\]"),
    ({}, _header(), r"entries without a tensor: \['v'\]"),
    ({"v": torch.zeros(3, 49)}, _header(), "hidden_size"),
]


@pytest.mark.parametrize("tensors,meta,match", LOAD_BAD, ids=[c[-1][:24] for c in LOAD_BAD])
def test_load_bad_file(tmp_path, tensors, meta, match):
    path = _write(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(BankError, match=match):
        VectorBank.load(path)


def test_load_corrupted_and_missing(tmp_path):
    path = tmp_path / "bank.safetensors"
    make_bank().save(path)
    raw = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    for name in ("trunc", "garbage"):
        with pytest.raises(BankError, match="not a readable safetensors file"):
            VectorBank.load(tmp_path / f"{name}.safetensors")
    with pytest.raises(BankError, match="does not exist"):
        VectorBank.load(tmp_path / "absent.safetensors")


def test_update_checks_model():
    bank = make_bank()
    other = VectorBank(dataclasses.replace(INFO, hidden_size=64))
    with pytest.raises(BankError, match="hidden_size"):
        bank.update(other)
    fresh = VectorBank(INFO)
    fresh.update(bank)
    assert fresh.names() == bank.names()


def test_model_info_from_llama_config():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=256,
                      architectures=["LlamaForCausalLM"])  # fmt: skip
    info = ModelInfo.from_hf_config(cfg)
    assert info == ModelInfo("LlamaForCausalLM", 2, 128, 4, 32, 256, 2)
    assert ModelInfo.from_hf_config(cfg.to_dict()) == info
    assert ModelInfo.from_hf_config(LlamaConfig(hidden_size=128, num_attention_heads=4,
                                                head_dim=48)).head_dim == 48  # fmt: skip


def test_model_info_from_lvlm_configs():
    from transformers import LlamaConfig, LlavaConfig, Qwen2VLConfig

    qwen = Qwen2VLConfig(
        text_config=dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=2, intermediate_size=512),  # fmt: skip
        architectures=["Qwen2VLForConditionalGeneration"],
    )
    info = ModelInfo.from_hf_config(qwen)
    assert info == ModelInfo("Qwen2VLForConditionalGeneration", 3, 256, 8, 32, 512, 2)
    text = LlamaConfig(hidden_size=96, num_hidden_layers=5, num_attention_heads=3, intermediate_size=200)
    llava = LlavaConfig(text_config=text.to_dict(), architectures=["LlavaForConditionalGeneration"])
    assert ModelInfo.from_hf_config(llava) == ModelInfo("LlavaForConditionalGeneration", 5, 96, 3, 32, 200, 3)


def test_model_info_from_namespace():
    import types

    ns = types.SimpleNamespace(num_hidden_layers=2, hidden_size=8, num_attention_heads=2,
                               intermediate_size=16, architectures=None, model_type="m")  # fmt: skip
    assert ModelInfo.from_hf_config(ns) == ModelInfo("m", 2, 8, 2, 4, 16, 2)


def test_model_info_checks():
    with pytest.raises(BankError, match="num_heads"):
        ModelInfo("x", 2, 128, 0, 32, 256, 2)
    with pytest.raises(BankError, match="config has none of"):
        ModelInfo.from_hf_config({"hidden_size": 8})
    with pytest.raises(BankError, match="unknown field"):
        ModelInfo.from_dict({**dataclasses.asdict(INFO), "vocab": 3})


def test_head_shard():
    assert head_shard(8, 1, 0) == range(0, 8)
    assert head_shard(8, 2, 0) == range(0, 4) and head_shard(8, 2, 1) == range(4, 8)
    assert [list(head_shard(6, 3, r)) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(BankError, match="not divisible"):
        head_shard(6, 4, 0)
    with pytest.raises(BankError, match="tp_rank"):
        head_shard(8, 2, 2)
    with pytest.raises(BankError, match="tp_size"):
        head_shard(8, 0, 0)
    assert neuron_shard(40, 2, 1) == range(20, 40)


def test_shard_entry():
    bank = make_bank()
    head, heads, neurons, resid = (bank.get(n) for n in ("joy.h", "joy.vee", "joy.ena", "joy"))
    parts = [shard_entry(head, "head", 3, r) for r in range(3)]
    assert all(p.shape == (3, 2, 8) for p in parts)
    assert torch.equal(torch.cat(parts, dim=1), head)
    assert torch.equal(shard_entry(heads, "head_mask", 2, 1), heads[:, 3:6])
    assert torch.equal(shard_entry(neurons, "neurons", 2, 0), neurons[:, :20])
    assert shard_entry(resid, "residual", 2, 1) is resid  # the residual stream is replicated
    with pytest.raises(BankError, match="not divisible"):
        shard_entry(head, "head", 4, 0)
    with pytest.raises(BankError, match="3-d"):
        shard_entry(resid, "head", 1, 0)


def test_versions_pinned_by_content_hash():
    bank = VectorBank(INFO, keep_versions=2)
    v1, v2, v3 = (torch.randn(3, 48) for _ in range(3))
    bank.add("joy", "residual", v1)
    h1 = bank.content_hash("joy")
    bank.add("joy", "residual", v2)
    h2 = bank.content_hash("joy")
    assert torch.equal(bank.pinned({"joy": h1}).get("joy"), v1)  # the retired version
    assert torch.equal(bank.pinned({"joy": h2}).get("joy"), v2)  # the current one
    assert bank.pinned({"joy": h1}).content_hash("joy") == h1
    bank.remove("joy")
    assert "joy" not in bank and torch.equal(bank.pinned({"joy": h2}).get("joy"), v2)
    bank.add("joy", "residual", v3)
    bank.add("joy", "residual", v1)  # keeps 2: v3 and v2 retired; h1 is current again
    with pytest.raises(KeyError, match="joy"):
        bank.pinned({"joy": "0" * 64})
    plain = VectorBank(INFO)  # keeps no versions
    plain.add("a", "residual", v1)
    ha = plain.content_hash("a")
    plain.add("a", "residual", v2)
    with pytest.raises(KeyError, match="'a'"):
        plain.pinned({"a": ha})


def test_bytes_round_trip_and_bad_bytes():
    bank = VectorBank(INFO)
    bank.add("joy", "residual", torch.randn(3, 48), note="x")
    back = VectorBank.from_bytes(bank.to_bytes())
    assert back.names() == ["joy"] and back.content_hash("joy") == bank.content_hash("joy")
    assert back.meta("joy") == {"note": "x"} and back.info == INFO
    for bad in (b"", b"1234567", bytes(range(200)), bank.to_bytes()[:100]):
        with pytest.raises(BankError, match="upload"):
            VectorBank.from_bytes(bad)


def test_presets_round_trip_and_errors(tmp_path):
    """Named request configs travel with the bank file; a bad one names its field."""
    import torch

    from emosteer.request.bank import BankError, ModelInfo, VectorBank
    from emosteer.request.spec import SpecError

    info = ModelInfo("LlamaForCausalLM", 2, 8, 2, 4, 8, 2)
    b = VectorBank(info)
    b.add("joy", "residual", torch.ones(2, 8))
    b.set_preset("joy.preset", {"steer": [{"vector": "joy", "layers": [1], "scale": 2.0}]}, chosen_on="dev")
    b.save(tmp_path / "b.safetensors")
    c = VectorBank.load(tmp_path / "b.safetensors")
    assert c.preset("joy.preset") == {"steer": [{"vector": "joy", "layers": [1], "scale": 2.0, "positions": "all"}]}
    assert c.presets["joy.preset"]["chosen_on"] == "dev"
    with pytest.raises(BankError, match="no preset 'x'.*joy.preset"):
        c.preset("x")
    with pytest.raises(SpecError, match="steer"):
        b.set_preset("bad", {"steer": 3})
    d = VectorBank(info)
    d.update(c)
    assert d.preset("joy.preset") == c.preset("joy.preset")


def test_format_1_files_read_their_head_masks_as_head_mask(tmp_path):
    """Format 1 called the [L, H] 0/1 head mask "heads" (one letter from "head"); such
    files load with the kind's new name, and adding under the old name says the new one."""
    mask = torch.zeros(INFO.num_layers, INFO.num_heads)
    mask[1, 2] = 1
    path = _write(tmp_path / "old.safetensors", {"m": mask},
                  _header(format_version=1, entries={"m": {"kind": "heads"}}))
    bank = VectorBank.load(path)
    assert bank.kind("m") == "head_mask" and torch.equal(bank.get("m", "head_mask"), mask)
    with pytest.raises(BankError, match="now called 'head_mask'"):
        VectorBank(INFO).add("m", "heads", mask)
    # a file with "heads" under the current format is refused, naming the kind
    bad = _write(tmp_path / "bad.safetensors", {"m": mask}, _header(entries={"m": {"kind": "heads"}}))
    with pytest.raises(BankError, match="unknown kind 'heads'"):
        VectorBank.load(bad)


def test_probe_kind(tmp_path):
    """A probe [L, d + 1] (row l = weights, bias) is a float entry like a residual vector:
    added, saved, loaded, hashed, listed and replicated across tensor-parallel ranks."""
    assert INFO.shape_of("probe") == (3, 49)
    bank = make_bank()
    w = torch.nn.functional.normalize(torch.randn(3, 48), dim=-1)
    probe = torch.cat([w, torch.tensor([[0.5], [-1.0], [2.0]])], dim=-1)
    acc = [0.5, 0.75, 1.0]
    bank.add("joy.probe", "probe", probe, emotion="joy", heldout_accuracy=acc, best_layer=2)
    assert bank.names("probe") == ["joy.probe"] and bank.kind("joy.probe") == "probe"
    assert torch.equal(bank.get("joy.probe", "probe")[1, :48], w[1])
    assert float(bank.get("joy.probe", "probe")[1, 48]) == -1.0
    with pytest.raises(BankError, match="kind 'probe', expected 'residual'"):
        bank.get("joy.probe", "residual")
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = VectorBank.load(path)
    assert loaded.kind("joy.probe") == "probe" and torch.equal(loaded.get("joy.probe"), probe)
    assert loaded.meta("joy.probe") == {"emotion": "joy", "heldout_accuracy": acc, "best_layer": 2}
    assert loaded.content_hash("joy.probe") == bank.content_hash("joy.probe")
    loaded.validate_against(INFO)
    # the hash covers the kind: the same numbers as another kind hash differently
    other = VectorBank()
    other.add("joy.probe", "residual", probe)
    assert other.content_hash("joy.probe") != bank.content_hash("joy.probe")
    assert shard_entry(probe, "probe", 2, 1) is probe
    with pytest.raises(BankError, match="hidden_size is 48 in the bank, 64 in the model"):
        loaded.validate_against(dataclasses.replace(INFO, hidden_size=64))
    no_info = VectorBank()
    no_info.add("p", "probe", probe)
    with pytest.raises(BankError, match=r"p: shape \(3, 49\) does not fit the model \(probe needs \(3, 65\)\)"):
        no_info.validate_against(dataclasses.replace(INFO, hidden_size=64))
