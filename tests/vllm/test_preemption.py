"""Preemption: a KV cache too small for the batch makes vLLM preempt running requests.
A preempted request keeps its slots and pool rows; when it resumes, its prompt is
recomputed with the same interventions, so every answer equals its solo run."""

from __future__ import annotations

import pytest
from vllm_support import LONG_PROMPT, engine_env

N = 8
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def small_cache_llm(tiny_model, bank_path, engines):
    import emosteer

    engines.close()  # one engine at a time on this small machine
    engine_env()
    llm = emosteer.LLM(tiny_model, bank=bank_path, max_slots=16, dtype="float32", max_model_len=256,
                       block_size=32, seed=0, enable_prefix_caching=True, enforce_eager=True,
                       num_gpu_blocks_override=16, max_num_seqs=N, disable_log_stats=False)
    yield llm
    del llm
    import gc

    gc.collect()


def _preemptions(llm) -> float:
    for m in llm.llm.get_metrics():
        if m.name == "vllm:num_preemptions":
            return float(getattr(m, "value", 0) or 0)
    return 0.0


def test_preempted_requests_stay_steered(small_cache_llm):
    from vllm import SamplingParams

    llm = small_cache_llm
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    prompts = [f"{LONG_PROMPT} [{i}]" for i in range(N)]
    cfgs = [{"steer": [{"vector": "joy", "layers": [0, 1], "scale": 1.0 + 0.5 * i}]} for i in range(N)]
    before = _preemptions(llm)
    outs = llm.generate(prompts, sp, steer=cfgs, use_tqdm=False)
    assert _preemptions(llm) > before, "the KV cache was meant to force preemption"
    assert all(o.emosteer_error is None for o in outs)
    solo = [llm.generate([p], sp, steer=c, use_tqdm=False)[0] for p, c in zip(prompts, cfgs)]
    assert [list(o.outputs[0].token_ids) for o in outs] == [list(o.outputs[0].token_ids) for o in solo]
    plain = llm.generate(prompts[:1], sp, use_tqdm=False)[0]
    assert list(plain.outputs[0].token_ids) != list(outs[0].outputs[0].token_ids)
    st = llm.admission_status()
    assert st["slots_in_use"] == 0 and st["admitted_requests"] == 0
