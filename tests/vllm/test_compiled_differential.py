"""Randomized differential tests: the compiled emosteer engine against an independent
oracle (tests/vllm/oracle.py: plain transformers + hooks written from the documented
semantics, full recompute per step, no code shared with emosteer's compiler, plugin or HF
backend).

Part A: ~24 seeded random configs (every item kind at every position kind, captures at
every capture position, mixes) plus capture-only and plain rows, in ONE generate call;
each row == the oracle (tokens up to the first near-tie of the oracle's top-2 logits,
chosen-token logprobs within 1e-3, captures within 1e-4).

Part B: multi-turn conversations (turn k+1 = turn k's prompt + reply + a few tokens),
interleaved in rounds with the prefix cache warm; each turn == the same turn on a cold
cache (tokens, logprobs within 1e-5) and == the oracle.

Parts A and B again with the residual modes and probe gates drawn (``features``: relative
adds, absolute and relative clamps, project-outs of one vector or a list, gates above /
below, latched or not, capture.probe scores); explicit gate and mode cases are in
test_steer_modes.py.

scripts/differential.py runs the same checks with hundreds of configs.
"""

from __future__ import annotations

import pytest

import differential_support as ds
from vllm_support import LONG_PROMPT, PROMPTS

pytestmark = pytest.mark.vllm

SEED = 20260101


@pytest.fixture(scope="module")
def llm(engines):
    return engines.get("compiled")


@pytest.fixture(scope="module")
def shape(info):
    return ds.Shape.of(info)


def test_generator_covers_every_kind(shape):
    """The 24 configs of part A hold every (item kind, position kind) pair and every
    capture position; the generator is deterministic for a seed."""
    prompts = [list(range(10, 10 + n)) for n in (25, 21, 15, 19, 13, 11, 14, 16)]
    cases = ds.batch_cases(SEED, shape, prompts, 24)
    cov = ds.coverage(c.config for c in cases)
    want = set(ds.COMBOS) | {("capture", p) for p in ds.CAPTURE_POSITIONS}
    assert want <= cov, sorted(want - cov)
    again = ds.batch_cases(SEED, shape, prompts, 24)
    assert [c.config for c in again] == [c.config for c in cases]
    # with the residual modes and gates: every mode variant, gate variant, both probes and
    # capture.probe on top
    cases = ds.batch_cases(SEED + 1, shape, prompts, 24, features=True)
    cov = ds.coverage(c.config for c in cases)
    want |= {("mode", v) for v in ds.STEER_VARIANTS}
    want |= {("gate", g) for g in ("above", "below", "above+latch", "below+latch")}
    want |= {("gate probe", p) for p, *_ in ds.GATE_VARIANTS} | {("capture", "probe")}
    want |= {("head mode", "add:relative")}
    assert want <= cov, sorted(want - cov)
    again = ds.batch_cases(SEED + 1, shape, prompts, 24, features=True)
    assert [c.config for c in again] == [c.config for c in cases]


def _mixed_batch_matches_the_oracle(llm, oracle, cases) -> list:
    """One batch of ``cases`` == the oracle row by row; most steered configs change the
    tokens and most tokens are compared (not near-ties). Returns the verdicts."""
    verdicts = ds.run_batch(llm, oracle, cases)
    table = ds.verdict_table(verdicts)
    print(table)
    bad = [v for v in verdicts if not v.ok]
    assert not bad, f"{len(bad)} of {len(verdicts)} rows differ from the oracle:\n{table}"
    steered = [v for v, c in zip(verdicts, cases) if c.config and set(c.config) - {"capture"}]
    changed = sum(v.extra["changed"] for v in steered)
    assert changed >= len(steered) // 2, f"only {changed} of {len(steered)} configs change the oracle's tokens"
    compared = sum(v.compared for v in verdicts)
    assert compared >= 0.6 * sum(c.max_tokens for c in cases), f"only {compared} tokens compared (near-ties)"
    return verdicts


def test_random_configs_in_one_mixed_batch_match_the_oracle(llm, oracle, shape):
    prompts = ds.token_prompts(llm.get_tokenizer(), PROMPTS)
    cases = ds.batch_cases(SEED, shape, prompts, 24, n_plain=3, n_capture_only=2, max_tokens=12)
    _mixed_batch_matches_the_oracle(llm, oracle, cases)


def test_residual_modes_and_gates_in_one_mixed_batch_match_the_oracle(llm, oracle, shape):
    """Part A with ``features``: 24 configs, each with one steer item of every residual-mode
    variant in turn (and the other steer items drawing modes at random), 8 of them gated
    (above / below x latch x joy / sad probe), probe scores captured."""
    prompts = ds.token_prompts(llm.get_tokenizer(), PROMPTS)
    cases = ds.batch_cases(SEED + 1, shape, prompts, 24, n_plain=2, n_capture_only=1, max_tokens=12,
                           features=True)
    verdicts = _mixed_batch_matches_the_oracle(llm, oracle, cases)
    opened = [v.extra["gate_open"] for v in verdicts if v.extra.get("gate_open") is not None]
    assert len(opened) == 8 and sum(0 < f < 1 for f in opened) >= 3, \
        f"the gates should open at some scored tokens and not at others: {opened}"


def test_conversations_warm_cache_equals_cold_and_oracle(llm, oracle, shape):
    """One conversation per kind of ds.CONVERSATION_KINDS (configs on "prompt", "last",
    "last" + "all", "generated", "generated" + "all", lists, mixed, "all", plain; their items
    act on layer 0, so they change the KV of layer 1), 3 turns each, two conversations per
    first prompt. Turn prompts are 40-125 tokens, replies 24-32 tokens, so later turns can
    reuse earlier turns' full 32-token blocks, replies included. Before the prefix-cache
    identity fix, the "prompt", "last+all", "generated+all" and mixed (with a "prompt"
    item) conversations failed at turns 1 and 2: warm turns reused blocks holding the
    earlier turn's reply or last token, computed under that turn's positions."""
    vocab = len(llm.get_tokenizer())
    convs = ds.conversations(SEED, shape, vocab, n=len(ds.CONVERSATION_KINDS), turns=3)
    records = ds.run_conversations(llm, convs, seed=SEED)
    rows = ds.check_turns(oracle, records)
    for row in rows:
        print(f"{row['label']:<28} P={row['P']:<4} cached={row['cached']:<4} "
              f"warm==cold: {row['warm_cold'] or 'yes'}; warm==oracle: {row['warm_oracle'].ok}; "
              f"cold==oracle: {row['cold_oracle'].ok}  {row['config']}")
    assert sum(row["cached"] for row in rows) > 0, "no turn reused the prefix cache"
    failures = ds.turn_failures(rows)
    assert not failures, f"{len(failures)} of {len(rows)} turns differ:\n" + "\n".join(failures)


def test_prompt_steering_follow_up_warm_equals_cold(llm, oracle):
    """Turn A: 38 prompt tokens, "joy" on every layer at prompt positions, 48 new tokens
    (not steered: they are generated). Turn B = A's prompt + reply + 4 tokens: all its 90
    tokens are prompt, so all are steered. B must not reuse A's cached blocks that hold
    A's unsteered reply tokens: warm B == cold B == the oracle."""
    cfg = {"steer": [{"vector": "joy", "layers": "all", "scale": 3, "positions": "prompt"}]}
    ids = ds.token_prompts(llm.get_tokenizer(), [LONG_PROMPT])[0]
    a_prompt = ids[:38]
    assert len(a_prompt) == 38
    llm.reset_prefix_cache()
    a = ds.engine_summary(llm.generate([{"prompt_token_ids": a_prompt}], ds.sampling(48), steer=cfg,
                                       use_tqdm=False)[0])
    b_prompt = a_prompt + a["ids"] + ids[38:42]
    warm = ds.engine_summary(llm.generate([{"prompt_token_ids": b_prompt}], ds.sampling(24), steer=cfg,
                                          use_tqdm=False)[0])
    llm.reset_prefix_cache()
    cold = ds.engine_summary(llm.generate([{"prompt_token_ids": b_prompt}], ds.sampling(24), steer=cfg,
                                          use_tqdm=False)[0])
    va = ds.compare("A", a, oracle.generate(a_prompt, cfg, 48), cfg)
    orc_b = oracle.generate(b_prompt, cfg, 24)
    vw, vc = ds.compare("B warm", warm, orc_b, cfg), ds.compare("B cold", cold, orc_b, cfg)
    report = (f"A == oracle: {va.ok} {va.message}\nB (P={len(b_prompt)}, {warm['cached']} tokens cached): "
              f"warm vs cold: {ds.compare_engines(warm, cold) or 'equal'}\n"
              f"B warm == oracle: {vw.ok} {vw.message}\nB cold == oracle: {vc.ok} {vc.message}")
    print(report)
    assert va.ok and vc.ok, report
    assert not ds.compare_engines(warm, cold), report
    assert vw.ok, report


def test_conversations_with_modes_and_gates_warm_equals_cold_and_oracle(llm, oracle, shape):
    """Part B with ``features``: 6 conversations ("prompt", "last", "last+all",
    "generated", "generated+all", "list"), 2 turns, residual modes drawn and half the
    configs gated (a latched gate never reads the prefix cache: its warm turn computes
    every token)."""
    vocab = len(llm.get_tokenizer())
    convs = ds.conversations(SEED + 1, shape, vocab, n=6, turns=2, features=True)
    records = ds.run_conversations(llm, convs, seed=SEED + 1)
    rows = ds.check_turns(oracle, records)
    for row in rows:
        print(f"{row['label']:<28} P={row['P']:<4} cached={row['cached']:<4} "
              f"warm==cold: {row['warm_cold'] or 'yes'}; warm==oracle: {row['warm_oracle'].ok}; "
              f"cold==oracle: {row['cold_oracle'].ok}  {row['config']}")
    assert any("when" in c.config for c in convs if c.config)
    latched = [row for row in rows if row["config"] and row["config"].get("when", {}).get("latch")]
    assert all(row["cached"] == 0 for row in latched), "a latched gate read the prefix cache"
    assert sum(row["cached"] for row in rows) > 0, "no turn reused the prefix cache"
    failures = ds.turn_failures(rows)
    assert not failures, f"{len(failures)} of {len(rows)} turns differ:\n" + "\n".join(failures)
