"""The correctness contracts on a compiled engine (vLLM's default torch.compile mode:
Python hooks would be dropped here; the in-place custom ops are kept)."""

from __future__ import annotations

import pytest
import vllm_checks as checks
from vllm_support import assert_no_slots_held

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def llm(plain_reference, engines):
    return engines.get("compiled")


@pytest.fixture(autouse=True)
def _no_slot_left(llm):
    yield
    assert_no_slots_held(llm)


def test_compiled_mode_is_on(llm):
    cfg = llm.llm.llm_engine.vllm_config
    assert not cfg.model_config.enforce_eager
    assert cfg.compilation_config.mode != 0


def test_empty_and_scale0_equal_plain_vllm(llm, plain_reference):
    # The plain reference is eager; compiled kernels may round differently.
    checks.check_plain_equivalence(llm, plain_reference, atol=1e-4)


def test_isolation_in_mixed_batch(llm):
    checks.check_isolation(llm)


def test_matches_hf_reference(llm, tiny_model, bank):
    checks.check_matches_hf(llm, tiny_model, bank)


def test_capture_positions(llm, info):
    checks.check_capture_positions(llm, info)


def test_prefix_cache(llm):
    checks.check_prefix_cache(llm)


def test_256_distinct_configs_in_one_call(llm):
    checks.check_default_slots_one_call(llm)
