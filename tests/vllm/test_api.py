"""The plugin's pieces that need no engine: version gate, patch apply/revert, settings,
per-slot tables (tensor-parallel sharding included) and the front-end checks."""

from __future__ import annotations

import pytest
import torch
from vllm_support import make_bank

from emosteer.request.bank import ModelInfo
from emosteer.request.spec import SpecError, SteerSpec

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
    assert settings_from_additional(None).max_slots == 256
    assert settings_from_additional(None).pool_mib == 64
    s = settings_from_additional({"emosteer": {"max_slots": 4, "capture_rows": 64}})
    assert (s.max_slots, s.capture_rows, s.bank) == (4, 64, None)
    monkeypatch.setenv("EMOSTEER_BANK", "/x/bank.safetensors")
    assert settings_from_additional({}).bank == "/x/bank.safetensors"
    with pytest.raises(ValueError, match="max_slots"):
        settings_from_additional({"emosteer": {"max_slots": 0}})
    with pytest.raises(ValueError, match="unknown key"):
        settings_from_additional({"emosteer": {"slots": 3}})
    assert settings_from_additional(None).inline_mib == 16
    with pytest.raises(ValueError, match="inline_mib"):
        settings_from_additional({"emosteer": {"inline_mib": 257}})


def test_inline_vectors_over_the_servers_limit_name_the_field():
    import torch

    from emosteer.client import inline_vector

    fe = _frontend(make_bank(INFO), inline_mib=1)
    big = inline_vector(torch.ones(2**18 + 1))  # 1 MiB + 4 bytes
    with pytest.raises(SpecError, match="inline_mib") as e:
        fe.check({"heads": [{"layer": 0, "head": 0, "mode": "patch", "vector": big}]})
    assert e.value.field == "heads[0].vector"
    with pytest.raises(SpecError, match="inline_mib") as e:
        fe.check({"steer": [{"vector": big, "layers": [0], "scale": 1.0}]})
    assert e.value.field == "steer[0].vector"
    # under the limit, the vector's own checks come next (here: its length)
    with pytest.raises(SpecError, match="values") as e:
        fe.check({"steer": [{"vector": inline_vector(torch.ones(5)), "layers": [0], "scale": 1.0}]})
    assert e.value.field == "steer[0].vector.data"


def test_phase_split_and_fingerprints():
    from emosteer.request.compile import compile_request, phase_spec

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
    fps = compile_request(spec, bank, INFO).fingerprints()
    assert fps["prompt"] != fps["generated"]
    only_all = SteerSpec.parse({"steer": [{"vector": "joy", "layers": [0], "scale": 2.0}]}).resolve(INFO)
    fa = compile_request(only_all, bank, INFO).fingerprints()
    assert fa["prompt"] == fa["generated"]  # one slot serves both phases
    cap_only = SteerSpec.parse({"capture": {"heads": "all"}}).resolve(INFO)
    assert compile_request(cap_only, bank, INFO).fingerprints() == {"prompt": None, "generated": None}
    # Re-registering a vector under the same name changes the fingerprint and the keys.
    bank2 = make_bank(INFO, seed=1)
    prog2 = compile_request(only_all, bank2, INFO)
    assert prog2.fingerprints()["prompt"] != fa["prompt"]
    assert set(prog2.phases["prompt"].keys()).isdisjoint(compile_request(only_all, bank, INFO).phases["prompt"].keys())


def test_compiled_program_and_pool_rows():
    """Scalars + pool keys per slot; rows materialised from the bank (one compiler)."""
    from emosteer.request.compile import compile_phase, materialize

    bank = make_bank(INFO)
    spec = SteerSpec.parse({
        "steer": [{"vector": "joy", "layers": [1], "scale": 2.0},
                  {"vector": "joy", "layers": [2], "scale": 2.0}, {"vector": "sad", "layers": [2], "scale": -1.0}],
        "heads": [{"layer": 0, "head": 1, "mode": "add", "vector": "joy.h", "scale": 3.0},
                  {"layer": 2, "head": 3, "mode": "patch", "vector": "joy.h"},
                  {"layer": 1, "head": 0, "mode": "ablate"}, {"layer": 1, "head": 2, "mode": "scale", "scale": 0.5}],
        "neurons": {"set": "joy.ena", "gamma": 3.0},
    }).resolve(INFO)
    prog = compile_phase(spec, bank, INFO)
    a, b, c, key = prog.heads[(0, 1)]
    assert (a, b, c) == (1.0, 3.0, 0.0) and torch.equal(materialize(key, bank, INFO)[1], bank.get("joy.h")[0, 1])
    a, b, c, key = prog.heads[(2, 3)]
    assert (a, b, c) == (0.0, 1.0, 0.0) and torch.equal(materialize(key, bank, INFO), bank.get("joy.h")[2])
    assert prog.heads[(1, 0)] == (0.0, 0.0, 0.0, None) and prog.heads[(1, 2)] == (0.5, 0.0, 0.0, None)
    ((alpha, mode, key),) = prog.res[1]
    assert alpha == 2.0 and mode == 0 and torch.equal(materialize(key, bank, INFO), bank.get("joy")[1])
    ((alpha, mode, key),) = prog.res[2]
    assert alpha == 1.0 and mode == 0
    torch.testing.assert_close(materialize(key, bank, INFO), 2 * bank.get("joy")[2] - bank.get("sad")[2])
    mask = bank.get("joy.ena")
    assert set(prog.neu) == {l for l in range(INFO.num_layers) if bool(mask[l].any())}
    for layer, (gamma, key) in prog.neu.items():
        assert gamma == 3.0 and torch.equal(materialize(key, bank, INFO), mask[layer].float())
    # Rows are shared between configs that differ only in scale.
    other = compile_phase(SteerSpec.parse({"steer": [{"vector": "joy", "layers": [1], "scale": 5.0}]}).resolve(INFO), bank, INFO)
    assert other.res[1][0][2] == prog.res[1][0][2] and other.fingerprint != prog.fingerprint
    # A replaced vector: the old key can no longer be materialised.
    with pytest.raises(KeyError, match="replaced"):
        materialize(prog.res[1][0][2], make_bank(INFO, seed=3), INFO)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_pool_rows_tensor_parallel_shards(tp_size):
    """Each rank's head / neuron rows are its shard; ranks concatenated == one rank."""
    from emosteer.request.compile import compile_phase, materialize

    bank = make_bank(INFO)
    spec = SteerSpec.parse({
        "steer": [{"vector": "joy", "layers": "all", "scale": 1.5}],
        "heads": [{"layer": 1, "head": 0, "mode": "add", "vector": "joy.h", "scale": 0.5}],
        "neurons": {"set": "joy.ena", "gamma": 2.0},
    }).resolve(INFO)
    prog = compile_phase(spec, bank, INFO)
    for key in prog.keys():
        full = materialize(key, bank, INFO)
        parts = [materialize(key, bank, INFO, tp_size, r) for r in range(tp_size)]
        if key.startswith('["res"'):  # the residual stream is replicated on every rank
            assert all(torch.equal(p, full) for p in parts)
        else:
            assert torch.equal(torch.cat(parts, 0), full)


def test_admission_slots_pool_and_lru():
    """Admission: shared fingerprints share a slot, a full table makes requests wait,
    rows are refcounted by slots and unreferenced rows are evicted LRU-first."""
    from emosteer.vllm.admission import Admission, Capacity

    def plan(fp, *keys, cap=0):
        return {"slots": {"prompt": {"fp": fp, "keys": [f'["res",[["{k}","h",1.0]],0]' for k in keys]}},
                "capture_rows": cap}

    adm = Admission(Capacity(max_slots=2, rows={"res": 2, "head": 1, "neu": 1, "probe": 1}))
    g1 = adm.try_admit("r1", plan("A", "x"))
    assert adm.try_admit("r1", plan("A", "x")) is g1  # idempotent
    g2 = adm.try_admit("r2", plan("A", "x"))
    assert g2["slots"] == g1["slots"]  # same config, same slot
    assert adm.try_admit("r3", plan("B", "y")) is not None
    assert adm.try_admit("r4", plan("C", "z")) is None  # no slot: waits
    assert adm.status()["waiting_for_slots"] == 1
    adm.release("r3")  # slot of B free, row y idle
    g4 = adm.try_admit("r4", plan("C", "z"))  # row y evicted for z
    assert g4 is not None and g4["rows"] == {'["res",[["z","h",1.0]],0]': 1}
    adm.release("r1")
    adm.release("r2")
    adm.release("r4")
    st = adm.status()
    assert st["slots_in_use"] == 0 and st["pool_rows_in_use"]["res"] == 0 and st["pool_rows_resident"]["res"] == 2
    # Resident unreferenced rows are found again without a rewrite.
    assert adm.try_admit("r5", plan("D", "x"))["rows"] == g1["rows"]
    # A config that could never fit is refused up front.
    assert "pool rows" in Admission.fits(plan("E", "a", "b", "c"), adm.capacity)
    # Capture rows: held per request, a request waits while the buffer is spoken for.
    adm = Admission(Capacity(max_slots=4, rows={"res": 4, "head": 1, "neu": 1, "probe": 1}, capture_rows=10))
    assert adm.try_admit("c1", {"slots": {}, "capture_rows": 6}) is not None
    assert adm.try_admit("c2", {"slots": {}, "capture_rows": 6}) is None
    adm.release("c1")
    assert adm.try_admit("c2", {"slots": {}, "capture_rows": 6}) is not None
    assert adm.status()["capture_rows_in_use"] == 6
    assert "capture buffer" in Admission.fits({"slots": {}, "capture_rows": 11}, adm.capacity)


def _frontend(bank, **settings):
    from emosteer.vllm.frontend import FrontendSteering

    from emosteer.vllm.config import PluginSettings

    fe = FrontendSteering.__new__(FrontendSteering)
    fe.info, fe.bank, fe.settings = INFO, bank, PluginSettings(**settings)
    return fe


def test_frontend_check_and_cache_identity():
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
    # the cache identity: the program at each position (bank contents included)
    from emosteer.request.compile import compile_request

    ident = lambda spec: compile_request(spec, fe.bank, INFO, 12).cache_identity(12)  # noqa: E731
    assert ident(prompt) == ident(same)
    assert ident(prompt)["prompt"] == ident(prompt)["generated"] == prompt.fingerprint(fe.bank)
    assert ident(gen) == {"P": 12, "prompt": None, "generated": gen.fingerprint(fe.bank), "at": []}
    cap_all = fe.check({"capture": {"heads": [0], "positions": "all"}})
    assert ident(cap_all) is None and fe.skips_prefix_cache(cap_all)  # never served from cache
    assert ident(fe.check({"capture": {"heads": [0]}})) is None


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


def test_unsupported_version_stays_out_and_refuses_steered_requests():
    """Outside the supported range: no patch, one error logged, a request carrying a
    config is refused, a plain one passes through to vLLM unchanged."""
    from vllm import SamplingParams
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.engine.input_processor import InputProcessor

    import emosteer.vllm as plugin
    from emosteer.vllm import guard

    was = plugin.is_registered()
    plugin.unregister()
    try:
        original_forward, original_process = Attention.forward, InputProcessor.process_inputs
        plugin.register(version="0.99.0")
        assert not plugin.is_registered() and guard.is_active()
        assert Attention.forward is original_forward  # nothing of the engine patched
        steered = SamplingParams(extra_args={"emosteer": {"steer": []}})
        with pytest.raises(ValueError, match="emosteer.*supports vLLM 0.32"):
            InputProcessor.process_inputs(object(), "r1", "hi", steered)
        sentinel = object()
        try:  # a plain request reaches vLLM's own function (stood in for here)
            guard._original = lambda self, *a, **k: sentinel
            assert InputProcessor.process_inputs(object(), "r2", "hi", SamplingParams()) is sentinel
        finally:
            guard._original = original_process
        plugin.unregister()
        assert InputProcessor.process_inputs is original_process
    finally:
        plugin.unregister()
        if was:
            plugin.register()


def test_position_groups_compile():
    """Listed positions and "last" become position groups; a per-position vector reads
    its own row at each listed position; one vector at every listed position is one slot."""
    from emosteer.request.bank import VectorBank
    from emosteer.request.compile import compile_request, materialize

    bank = make_bank(INFO)
    L, H, D = INFO.num_layers, INFO.num_heads, INFO.head_dim
    pp = torch.randn(3, L, H, D)
    bank.add("pp", "head_positions", pp)
    spec = SteerSpec.parse({
        "steer": [{"vector": "joy", "layers": [0], "scale": 1.0}],
        "heads": [{"layer": 1, "head": 2, "mode": "patch", "vector": "pp", "positions": [4, 1, 6]},
                  {"layer": 0, "head": 0, "mode": "ablate", "positions": "last"}],
    }).resolve(INFO)
    spec.validate(bank, INFO, num_prompt_tokens=8)
    req = compile_request(spec, bank, INFO, num_prompt=8)
    assert req.positions() == {1: "@1", 4: "@4", 6: "@6", 7: "@7"}
    # The listed positions read the vector's rows as one run (one slot), position k of
    # the sorted list at row offset k.
    assert req.row_off == {1: 0, 4: 1, 6: 2}
    for k, p in enumerate((1, 4, 6)):
        prog = req.phases[f"@{p}"]
        assert 0 in prog.res  # the every-prompt-token steer holds there too
        key = prog.heads[(1, 2)][3]
        assert torch.equal(materialize(key, bank, INFO)[k], pp[k, 1])
    assert (0, 0) in req.phases["@7"].heads and (1, 2) not in req.phases["@7"].heads
    assert len(set(req.fingerprints().values())) == 3  # prompt == generated, @1 == @4 == @6, @7
    one = SteerSpec.parse({"heads": [{"layer": 1, "head": 2, "mode": "patch", "vector": "joy.h",
                                      "positions": [1, 4, 6]}]}).resolve(INFO)
    fps = {f for p, f in compile_request(one, bank, INFO, 8).fingerprints().items() if p.startswith("@")}
    assert len(fps) == 1
    with pytest.raises(SpecError) as e:
        SteerSpec.parse({"heads": [{"layer": 1, "head": 2, "mode": "patch", "vector": "pp", "positions": [1, 2]}]}).validate(bank, INFO)
    assert e.value.field == "heads[0].positions"
    with pytest.raises(SpecError) as e:
        spec.validate(bank, INFO, num_prompt_tokens=5)
    assert e.value.field == "heads[0].positions"
    clash = SteerSpec.parse({"heads": [{"layer": 0, "head": 0, "mode": "ablate", "positions": [7]},
                                       {"layer": 0, "head": 0, "mode": "ablate", "positions": "last"}]})
    with pytest.raises(SpecError):
        compile_request(clash.resolve(INFO), bank, INFO, num_prompt=8)


def test_http_error_body_names_emosteer():
    """The server's error for a stopped steered request names emosteer; other errors keep
    vLLM's message."""
    import vllm.entrypoints.generate.base.serving as serving
    from vllm.exceptions import GenerationError

    from emosteer.vllm.patches import input_processor, serving_errors

    serving_errors.apply()
    try:
        input_processor.remember_request("cmpl-steered-1")
        fn = serving.GenerateBaseServing._raise_if_error
        with pytest.raises(GenerationError, match="emosteer: this request's interventions"):
            fn(None, "error", "cmpl-steered-1")
        with pytest.raises(GenerationError, match="^Internal server error$"):
            fn(None, "error", "cmpl-plain-2")
        fn(None, "stop", "cmpl-steered-1")  # not an error: nothing raised
    finally:
        serving_errors.revert()


def test_result_keys_claimed_once_and_names_checked():
    from types import SimpleNamespace

    from emosteer.request.spec import SpecError
    from emosteer.vllm.frontend import FrontendSteering, check_name

    cfg = SimpleNamespace(
        additional_config=None,
        model_config=SimpleNamespace(hf_config={"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                                "num_hidden_layers": 2, "num_attention_heads": 4,
                                                "num_key_value_heads": 2, "intermediate_size": 128},
                                     dtype=torch.float32),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
    )
    fe = FrontendSteering(cfg)
    first = fe.claim_key("abc-1", 2, "req-1")
    with pytest.raises(SpecError, match="in use"):
        fe.claim_key("abc-1")
    assert fe.key_info("abc-1") == (2, "req-1")
    assert fe.worker_keys(["abc-1#1", "other"]) == {"abc-1#1": f"abc-1~{first}#1"}
    assert fe.release_key("abc-1") == 2 and fe.key_info("abc-1") is None
    again = fe.claim_key("abc-1")  # free again, bound to a new claim: the workers file
    assert again != first and fe.worker_keys(["abc-1"]) == {"abc-1": f"abc-1~{again}"}
    # the new request's results apart from any the first one left behind
    for bad in ("", "../x", "a/b", "<s>", "x" * 129, 7, None, "-leading", "a b"):
        with pytest.raises(SpecError, match="emosteer_key"):
            check_name(bad, "emosteer_key")
    assert check_name("joy.cv:v2_1-a", "name") == "joy.cv:v2_1-a"
