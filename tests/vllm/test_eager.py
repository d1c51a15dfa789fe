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
