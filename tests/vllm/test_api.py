"""The plugin's pieces that need no engine: version gate, patch apply/revert, settings,
per-slot tables (tensor-parallel sharding included) and the front-end checks."""

from __future__ import annotations

import pytest
import torch
from vllm_support import make_bank

from emosteer.bank import ModelInfo
from emosteer.spec import SpecError, SteerSpec

INFO = ModelInfo("LlamaForCausalLM", num_layers=3, hidden_size=64, num_heads=4, head_dim=16,
                 intermediate_size=96, num_kv_heads=2)


def test_version_gate():
    from emosteer.vllm import UnsupportedVLLMVersion, check_vllm_version

    assert check_vllm_version("0.32.0") == (0, 32)
    assert check_vllm_version("0.32.7+cpu") == (0, 32)
    for bad in ("0.31.2", "0.33.0", "1.0.0", "garbage"):
        with pytest.raises(UnsupportedVLLMVersion):
            check_vllm_version(bad)
    check_vllm_version()  # the installed vLLM is supported


def test_register_is_idempotent_and_revertible():
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    import emosteer.vllm as plugin

    was = plugin.is_registered()
    plugin.unregister()
    originals = (Attention.forward, RMSNorm.forward, SiluAndMul.forward, GPUModelRunner._model_forward)
    assert not hasattr(WorkerBase, "emosteer_rpc")
    plugin.register()
    plugin.register()
    patched = (Attention.forward, RMSNorm.forward, SiluAndMul.forward, GPUModelRunner._model_forward)
    assert all(p is not o for p, o in zip(patched, originals))
    assert Attention.forward.__wrapped__ is originals[0]  # one layer, not two
    assert hasattr(WorkerBase, "emosteer_rpc")
    import vllm.envs as envs

    assert "EMOSTEER_PLUGIN" in envs.compile_factors()
    plugin.unregister()
    assert (Attention.forward, RMSNorm.forward, SiluAndMul.forward, GPUModelRunner._model_forward) == originals
    assert "EMOSTEER_PLUGIN" not in envs.compile_factors()
    if was:
        plugin.register()


def test_settings(monkeypatch):
    from emosteer.vllm.config import settings_from_additional

    monkeypatch.delenv("EMOSTEER_BANK", raising=False)
    monkeypatch.delenv("EMOSTEER_IMPL", raising=False)
    assert settings_from_additional(None).max_slots == 32
    s = settings_from_additional({"emosteer": {"max_slots": 4, "capture_rows": 64}})
    assert (s.max_slots, s.capture_rows, s.bank) == (4, 64, None)
    monkeypatch.setenv("EMOSTEER_BANK", "/x/bank.safetensors")
    assert settings_from_additional({}).bank == "/x/bank.safetensors"
    with pytest.raises(ValueError, match="max_slots"):
        settings_from_additional({"emosteer": {"max_slots": 0}})
    with pytest.raises(ValueError, match="unknown key"):
        settings_from_additional({"emosteer": {"slots": 3}})


def test_phase_split_and_fingerprints():
    from emosteer.vllm.tables import phase_fingerprints, phase_spec

    bank = make_bank(INFO)
    spec = SteerSpec.parse({
        "steer": [{"vector": "joy", "layers": [0], "scale": 2.0, "positions": "prompt"},
                  {"vector": "sad", "layers": [1], "scale": 1.0}],
        "neurons": {"set": "joy.ena", "gamma": 2.0, "positions": "generated"},
        "capture": {"heads": "all"},
    }).resolve(INFO)
    p, g = phase_spec(spec, "prompt"), phase_spec(spec, "generated")
    assert [s.vector for s in p.steer] == ["joy", "sad"] and p.neurons is None
    assert [s.vector for s in g.steer] == ["sad"] and g.neurons is not None
    fps = phase_fingerprints(spec, bank)
    assert fps["prompt"] != fps["generated"]
    only_all = SteerSpec.parse({"steer": [{"vector": "joy", "layers": [0], "scale": 2.0}]}).resolve(INFO)
    fa = phase_fingerprints(only_all, bank)
    assert fa["prompt"] == fa["generated"]  # one slot serves both phases
    assert phase_fingerprints(SteerSpec.parse({"capture": {"heads": "all"}}), bank) == {
        "prompt": None, "generated": None}
    # Re-registering a vector under the same name changes the fingerprint.
    bank2 = make_bank(INFO, seed=1)
    assert phase_fingerprints(only_all, bank2)["prompt"] != fa["prompt"]


def test_slot_tables_values():
    from emosteer.vllm.tables import slot_tables

    bank = make_bank(INFO)
    spec = SteerSpec.parse({
        "steer": [{"vector": "joy", "layers": [1], "scale": 2.0},
                  {"vector": "joy", "layers": [2], "scale": 2.0}, {"vector": "sad", "layers": [2], "scale": -1.0}],
        "heads": [{"layer": 0, "head": 1, "mode": "add", "vector": "joy.h", "scale": 3.0},
                  {"layer": 2, "head": 3, "mode": "patch", "vector": "joy.h"},
                  {"layer": 1, "head": 0, "mode": "ablate"}, {"layer": 1, "head": 2, "mode": "scale", "scale": 0.5}],
        "neurons": {"set": "joy.ena", "gamma": 3.0},
    }).resolve(INFO)
    r = slot_tables(spec, bank, INFO)
    assert r.a[0, 1] == 1 and r.b[0, 1] == 3 and torch.equal(r.v[0, 1], bank.get("joy.h")[0, 1])
    assert r.a[2, 3] == 0 and r.b[2, 3] == 1 and torch.equal(r.v[2, 3], bank.get("joy.h")[2, 3])
    assert (r.a[1, 0], r.b[1, 0]) == (0, 0) and (r.a[1, 2], r.b[1, 2]) == (0.5, 0)
    untouched = torch.ones_like(r.a, dtype=torch.bool)
    untouched[0, 1] = untouched[2, 3] = untouched[1, 0] = untouched[1, 2] = False
    assert (r.a[untouched] == 1).all() and (r.b[untouched] == 0).all()
    assert r.alpha[0] == 0 and r.alpha[1] == 2 and torch.equal(r.u[1], bank.get("joy")[1])
    assert r.alpha[2] == 1
    torch.testing.assert_close(r.u[2], 2 * bank.get("joy")[2] - bank.get("sad")[2])
    torch.testing.assert_close(r.g, 1 + 2 * bank.get("joy.ena"))


@pytest.mark.parametrize("tp_size", [2, 4])
def test_slot_tables_tensor_parallel_shards(tp_size):
    """Each rank gets its own heads / neurons; ranks concatenated == one rank."""
    from emosteer.vllm.tables import slot_tables

    bank = make_bank(INFO)
    spec = SteerSpec.parse({
        "steer": [{"vector": "joy", "layers": "all", "scale": 1.5}],
        "heads": [{"layer": l, "head": h, "mode": "add", "vector": "joy.h", "scale": 0.5 + h}
                  for l in range(3) for h in range(4)],
        "neurons": {"set": "joy.ena", "gamma": 2.0},
    }).resolve(INFO)
    full = slot_tables(spec, bank, INFO)
    parts = [slot_tables(spec, bank, INFO, tp_size, r) for r in range(tp_size)]
    for name, dim in (("a", 1), ("b", 1), ("v", 1), ("g", 1)):
        torch.testing.assert_close(torch.cat([getattr(p, name) for p in parts], dim), getattr(full, name), rtol=0, atol=0)
    for p in parts:  # the residual stream is replicated on every rank
        assert torch.equal(p.u, full.u) and torch.equal(p.alpha, full.alpha)
        assert p.a.shape[1] == INFO.num_heads // tp_size
        assert p.g.shape[1] == INFO.intermediate_size // tp_size


def _frontend(bank):
    from emosteer.vllm.frontend import FrontendSteering

    fe = FrontendSteering.__new__(FrontendSteering)
    fe.info, fe.bank = INFO, bank
    return fe


def test_frontend_check_and_salt():
    bank = make_bank(INFO)
    fe = _frontend(bank)
    with pytest.raises(SpecError) as e:
        fe.check({"heads": [{"layer": 5, "head": 0, "mode": "ablate"}]})
    assert e.value.field == "heads[0].layer"
    with pytest.raises(SpecError) as e:
        fe.check({"boost": {"heads": "joy.vee", "beta": 1.5}})
    assert e.value.field == "boost.heads"
    with pytest.raises(SpecError) as e:
        fe.check({"capture": {"heads": "all", "positions": "all"}}, num_prompt_tokens=1000, max_tokens=1000)
    assert e.value.field == "capture.positions"
    prompt = fe.check({"steer": [{"vector": "joy", "layers": [0], "scale": 1.0}]})
    same = fe.check('{"steer": [{"vector": "joy", "layers": 0, "scale": 1.0, "positions": "all"}]}')
    gen = fe.check({"steer": [{"vector": "joy", "layers": [0], "scale": 1.0, "positions": "generated"}]})
    assert fe.salt(prompt, "r1") == fe.salt(same, "r2") and fe.salt(prompt, "r1").startswith("emosteer:")
    assert fe.salt(gen, "r1") is None
    cap_all = fe.check({"capture": {"heads": [0], "positions": "all"}})
    assert fe.salt(cap_all, "r1") != fe.salt(cap_all, "r2")  # never served from cache
    assert fe.salt(fe.check({"capture": {"heads": [0]}}), "r1") is None


def test_server_maps_spec_errors_to_400():
    """A bad config raised while the server adds a request is a VLLMValidationError
    (vLLM answers 400 naming the parameter; a plain ValueError there becomes a 500)."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import VLLMValidationError

    from emosteer.vllm.patches.input_processor import validation_error_class

    err = validation_error_class()("heads[0].mode", "must be one of 'add', ...")
    assert isinstance(err, SpecError) and isinstance(err, VLLMValidationError)
    assert err.field == "heads[0].mode"
    resp = create_error_response(err)
    assert resp.error.code == 400 and resp.error.param == "emosteer.heads[0].mode"
    assert "heads[0].mode" in resp.error.message
