"""The correctness contracts on an eager engine (``enforce_eager=True``)."""

from __future__ import annotations

import pytest
import vllm_checks as checks
from vllm_support import assert_no_slots_held

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def llm(plain_reference, engines):
    return engines.get("eager")


@pytest.fixture(autouse=True)
def _no_slot_left(llm):
    yield
    assert_no_slots_held(llm)


def test_engine_uses_a_compiled_kernel(llm):
    # Never the interpreted Triton path (tests/ops sets TRITON_INTERPRET per test).
    st = llm.status()[0]
    assert st["impl"] in ("cpp", "torch") and st["features"] == ["heads", "residual", "neurons", "attention"]
    assert st["attn_impl"] in ("cpp", "torch")
    assert {"joy", "sad", "joy.h", "joy.ena"} <= set(st["bank"])  # loaded at start-up (EMOSTEER_BANK)


def test_empty_and_scale0_equal_plain_vllm(llm, plain_reference):
    checks.check_plain_equivalence(llm, plain_reference, atol=0.0)


def test_isolation_in_mixed_batch(llm):
    checks.check_isolation(llm)


def test_matches_hf_reference(llm, tiny_model, bank):
    checks.check_matches_hf(llm, tiny_model, bank)


def test_capture_positions(llm, info):
    checks.check_capture_positions(llm, info)


def test_prefix_cache(llm):
    checks.check_prefix_cache(llm)


def test_malformed_configs_rejected(llm):
    checks.check_malformed(llm)


def test_admission_flood_waits_for_slots(llm, plain_reference):
    checks.check_admission_flood(llm, plain_reference)


def test_register_vectors_at_run_time(llm, info):
    checks.check_register_vectors(llm, info)


def test_worker_failure_is_an_error_and_evicts_kv(llm, info):
    checks.check_worker_failure_is_an_error(llm, info)


def test_position_indexed_interventions(llm, tiny_model, bank, info):
    checks.check_position_indexed(llm, tiny_model, bank, info)


def test_large_captures_wait_and_n2_samples(llm, info):
    checks.check_large_captures_and_samples(llm, info)


def test_a_shared_sampling_params_is_never_changed(llm):
    """One SamplingParams shared by every prompt of a call (emosteer.LLM.generate with
    per-prompt configs, and plain vLLM's generate with extra_args): each request gets its
    own config, and the caller's object comes back exactly as it was sent (the plugin
    copies it shallowly and gives the copy its own extra_args)."""
    from vllm import SamplingParams
    from vllm_support import PROMPTS

    steer = [{"steer": [{"vector": "joy", "layers": [0], "scale": s}]} for s in (2.0, -2.0)]
    sp = SamplingParams(max_tokens=6, temperature=0.0)
    before = repr(sp)
    both = llm.generate(PROMPTS[:2], sp, steer=steer, use_tqdm=False)
    assert repr(sp) == before and sp.extra_args is None
    alone = [llm.generate([p], SamplingParams(max_tokens=6, temperature=0.0), steer=c, use_tqdm=False)[0]
             for p, c in zip(PROMPTS[:2], steer)]
    assert [list(o.outputs[0].token_ids) for o in both] == [list(o.outputs[0].token_ids) for o in alone]
    key = "shared-" + "0" * 8
    xs = SamplingParams(max_tokens=6, temperature=0.0,
                        extra_args={"emosteer": steer[0], "emosteer_key": key})
    sent = dict(xs.extra_args)
    out = llm.llm.generate(PROMPTS[:1], xs, use_tqdm=False)
    assert xs.extra_args == sent, xs.extra_args  # no private key written into the caller's dict
    assert list(out[0].outputs[0].token_ids) == list(alone[0].outputs[0].token_ids)
    llm._fetch([key])
