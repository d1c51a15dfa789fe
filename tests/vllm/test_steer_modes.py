"""Residual modes and probe gates on the compiled engine, case by case (the random configs
are in test_compiled_differential.py; both use the compiled engine of conftest.py and the
probes ``differential_support.add_gate_entries`` puts in the test bank):

* a gate that never opens (threshold +-1e6) == the config without its interventions after
  the gate's layer (== plain when they all act after it), latched or not;
* a gate that always opens == the config without the gate, with items at "last" and
  listed positions (position groups) too;
* a latch that opens mid-prompt, and the same gate unlatched: == the oracle, tokens,
  residual captures after the gate's layer and the captured probe scores; NaN scores
  where no item acts;
* a clamp sets the component, a project-out of a list removes the span (residual
  captures, no oracle);
* warm == cold prefix cache for a gated (not latched) config and a relative config
  (residual and head adds); a
  latched one never reads the cache;
* a capture of probe scores only.
"""

from __future__ import annotations

import pytest
import torch

import differential_support as ds
from vllm_support import LONG_PROMPT, PROMPTS

pytestmark = pytest.mark.vllm

HUGE = 1e6
MAX_TOKENS = 10

# interventions at layer 1 (after a layer-0 gate) and at layer 0 (never gated by it)
LATER = [
    {"vector": "joy", "layers": [1], "scale": 0.6, "scale_mode": "relative"},
    {"vector": "sad", "layers": [1], "mode": "clamp", "value": 3.0, "positions": "last"},
]
LATER_HEADS = [{"layer": 1, "head": [0, 2], "mode": "add", "vector": "joy.h", "scale": 2.5},
               {"layer": 1, "head": 1, "mode": "scale", "scale": -1.0, "positions": [1, 3]}]
EARLY = [
    {"vector": "sad", "layers": [0], "scale": 2.0},
    {"vector": ["joy", "joy.neg2"], "layers": [0], "mode": "project_out", "positions": "generated"},
]


def _cfg(early: bool, later: bool, when: dict | None = None, **extra) -> dict | None:
    cfg: dict = {}
    steer = (EARLY if early else []) + (LATER if later else [])
    if steer:
        cfg["steer"] = [dict(it) for it in steer]
    if later:
        cfg["heads"] = [dict(it) for it in LATER_HEADS]
    if when is not None:
        cfg["when"] = {"probe": "joy.probe", "layer": 0, **when}
    cfg.update(extra)
    return cfg or None


@pytest.fixture(scope="module")
def llm(engines):
    return engines.get("compiled")


@pytest.fixture(scope="module")
def prompts(llm):
    return ds.token_prompts(llm.get_tokenizer(), PROMPTS[:4])


def _generate(llm, rows: list[tuple[list[int], dict | None]], max_tokens: int = MAX_TOKENS) -> list[dict]:
    """One generate call (one mixed batch); engine summaries in order."""
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in rows], ds.sampling(max_tokens),
                        steer=[cfg for _, cfg in rows], use_tqdm=False)
    return [ds.engine_summary(o) for o in outs]


def test_gates_that_never_or_always_open(llm, oracle, prompts):
    never = [{"above": HUGE}, {"below": -HUGE, "latch": True}]
    always = [{"above": -HUGE}, {"below": HUGE}, {"above": -HUGE, "latch": True}, {"below": HUGE, "latch": False}]
    pairs = []  # (label, gated config, the config it must equal)
    for w in never:
        pairs.append((f"never {w}, all after", _cfg(False, True, w), None))
        pairs.append((f"never {w}, early+later", _cfg(True, True, w), _cfg(True, False)))
    for w in always:
        pairs.append((f"always {w}", _cfg(True, True, w), _cfg(True, True)))
    refs = [None, _cfg(True, False), _cfg(True, True)]
    ids = prompts[:2]
    rows = [(p, cfg) for p in ids for cfg in refs] + [(p, gated) for p in ids for _, gated, _ in pairs]
    got = _generate(llm, rows)
    by_row = {(tuple(p), repr(cfg)): s for (p, cfg), s in zip(rows, got)}
    bad = []
    for p in ids:
        for label, gated, want in pairs:
            diff = ds.compare_engines(by_row[(tuple(p), repr(gated))], by_row[(tuple(p), repr(want))])
            if diff:
                bad.append(f"P={len(p)} {label}: {diff}")
        for cfg in refs:  # the references themselves == the oracle
            v = ds.compare("ref", by_row[(tuple(p), repr(cfg))], oracle.generate(p, cfg, MAX_TOKENS), cfg)
            if not v.ok:
                bad.append(f"P={len(p)} {cfg} != oracle: {v.message}")
    assert not bad, "\n".join(bad)
    # the later items do change the output (else "never open" would prove nothing)
    assert any(by_row[(tuple(p), repr(_cfg(True, True)))]["ids"] != by_row[(tuple(p), repr(_cfg(True, False)))]["ids"]
               for p in ids)


def _latch_threshold(scores: list[float], P: int) -> tuple[int, float] | None:
    """A position k in the middle of the prompt where the prompt's running max of the
    probe score is beaten by a margin, and a threshold between: "above" with a latch
    opens at k."""
    for k in range(P // 3, P - 1):
        best = max(scores[:k])
        if scores[k] > best + 0.05:
            return k, round((best + scores[k]) / 2, 4)
    return None


def test_latch_opens_mid_prompt_and_probe_scores_match_the_oracle(llm, oracle, prompts):
    """The gated items act at every position; the threshold is picked from the oracle's
    prompt scores (they do not depend on the gate: the gate reads layer 0, gates layer 1)
    so that the latch opens at a prompt position k and stays open, while the unlatched
    gate opens only where the score holds. Residual captures at layer 1 show the gating
    per position; probe scores are compared too."""
    base = {"steer": [{"vector": "joy", "layers": [0, 1], "scale": 0.4, "scale_mode": "relative"},
                      {"vector": "sad", "layers": [1], "scale": 2.0}]}
    cap = {"residual": [0, 1], "probe": True, "positions": "all"}
    found = None
    for p in prompts:
        probe_all = {**base, "when": {"probe": "joy.probe", "layer": 0, "above": -HUGE}, "capture": cap}
        scores = oracle.generate(p, probe_all, 1).captures["probe"][0].tolist()
        hit = _latch_threshold(scores, len(p))
        if hit is not None:
            found = (p, *hit, scores)
            break
    assert found is not None, "no prompt whose probe score makes a new high mid-prompt"
    p, k, thr, scores = found
    latched = {**base, "when": {"probe": "joy.probe", "layer": 0, "above": thr, "latch": True}, "capture": cap}
    unlatched = {**base, "when": {"probe": "joy.probe", "layer": 0, "above": thr}, "capture": cap}
    # items only at generated positions: the prompt is not scored (NaN), the latch counts
    # generated tokens only
    gen_only = {"steer": [{"vector": "joy", "layers": [1], "scale": 2.0, "positions": "generated"}],
                "when": {"probe": "sad.probe", "layer": 0, "below": 0.0, "latch": True},
                "capture": {"probe": True, "residual": [1], "positions": "all"}}
    rows = [(p, latched), (p, unlatched), (p, gen_only)]
    got = _generate(llm, rows)
    bad = []
    results = []
    for (ids, cfg), eng in zip(rows, got):
        orc = oracle.generate(ids, cfg, MAX_TOKENS)
        results.append(orc)
        v = ds.compare(repr(cfg["when"]), eng, orc, cfg)
        if not v.ok:
            bad.append(f"{cfg['when']}: {v.message}")
        elif v.compared < MAX_TOKENS // 2:
            bad.append(f"{cfg['when']}: only {v.compared} tokens compared")
    assert not bad, "\n".join(bad)
    P = len(p)
    lat, unl, gen = results
    assert lat.gate_open[:P] == [t >= k for t in range(P)]
    assert unl.gate_open[:P] == [s > thr for s in scores[:P]] and not all(unl.gate_open[k:P])
    # the engine's own probe scores: the prompt's as the oracle's first pass found them;
    # NaN on the prompt where no item acts there
    eng_scores = got[0]["captures"]["probe"][0]
    assert torch.allclose(eng_scores[:P].double(), torch.tensor(scores[:P], dtype=torch.float64), atol=ds.CAPTURE_TOL)
    gen_scores = got[2]["captures"]["probe"][0]
    assert bool(gen_scores[:P].isnan().all()) and not bool(gen_scores[P:].isnan().any())
    # the residual after the gated layer differs between latched and unlatched exactly
    # where the latch is open and the score does not hold
    r_lat, r_unl = got[0]["captures"]["residual"][1][:P], got[1]["captures"]["residual"][1][:P]
    differs = (r_lat - r_unl).abs().amax(1) > 1e-4
    assert differs.tolist() == [t >= k and not scores[t] > thr for t in range(P)]


def test_clamp_sets_the_component_and_project_out_removes_the_span(llm, bank, prompts):
    """Residual captures, no oracle: after an absolute clamp at layer 0 the component along
    joy is the value at every position; after a project-out of [sad, joy, joy.neg2] at
    layer 1 (rank 2: joy.neg2 = -2 joy) nothing is left along sad or joy."""
    cfg = {"steer": [{"vector": "joy", "layers": [0], "mode": "clamp", "value": 2.5},
                     {"vector": ["sad", "joy", "joy.neg2"], "layers": [1], "mode": "project_out"}],
           "capture": {"residual": [0, 1], "positions": "all"}}
    eng = _generate(llm, [(prompts[0], cfg)])[0]
    assert eng["error"] is None, eng["error"]
    unit = lambda v: v.double() / v.double().norm()  # noqa: E731
    r0, r1 = eng["captures"]["residual"][0].double(), eng["captures"]["residual"][1].double()
    assert r0.shape[0] == len(prompts[0]) + MAX_TOKENS - 1
    comp = r0 @ unit(bank.get("joy")[0])
    torch.testing.assert_close(comp, torch.full_like(comp, 2.5), atol=1e-4, rtol=0)
    for name in ("sad", "joy"):
        assert float((r1 @ unit(bank.get(name)[1])).abs().max()) < 1e-4, name


def test_prefix_cache_warm_equals_cold_for_gates_and_relative_modes(llm, oracle):
    """The same long prompt twice per config: the second run reads the blocks the first
    one cached (the gate's decision at a position depends only on the tokens up to it, so
    a gate that does not latch is cacheable), and equals the first (cold) run and the
    oracle. Relative modes at layer 0 (residual terms and head adds) change the KV of
    layer 1. A latched gate never
    reads the prefix cache."""
    gated = {"steer": [{"vector": "joy", "layers": [0, 1], "scale": 0.5, "scale_mode": "relative"}],
             "heads": [{"layer": 1, "head": [0, 3], "mode": "scale", "scale": 0.3}],
             "when": {"probe": "sad.probe", "layer": 0, "below": 0.1}}
    relative = {"steer": [{"vector": "sad", "layers": [0], "scale": -0.7, "scale_mode": "relative"},
                          {"vector": "joy", "layers": [0], "mode": "clamp", "scale": 0.2, "scale_mode": "relative"},
                          {"vector": ["joy", "sad"], "layers": [1], "mode": "project_out", "positions": "prompt"}],
                "heads": [{"layer": 0, "head": [1, 2], "mode": "add", "vector": "joy.h", "scale": 0.8,
                           "scale_mode": "relative"}]}
    latched = {**gated, "when": {"probe": "sad.probe", "layer": 0, "below": 0.1, "latch": True}}
    ids = ds.token_prompts(llm.get_tokenizer(), [LONG_PROMPT])[0]
    assert len(ids) > 64  # two full 32-token blocks at least
    rows = [(ids, gated), (ids, relative), (ids, latched)]
    llm.reset_prefix_cache()
    cold = _generate(llm, rows)
    warm = _generate(llm, rows)
    bad = []
    for (p, cfg), c, w in zip(rows, cold, warm):
        name = "latched" if cfg is latched else "gated" if cfg is gated else "relative"
        if c["cached"] != 0:
            bad.append(f"{name}: the cold run read {c['cached']} cached tokens")
        if cfg is latched:
            if w["cached"] != 0:
                bad.append(f"latched: the warm run read {w['cached']} cached tokens")
        elif w["cached"] < 64:
            bad.append(f"{name}: the warm run read only {w['cached']} cached tokens")
        diff = ds.compare_engines(w, c)
        if diff:
            bad.append(f"{name}: warm != cold: {diff}")
        v = ds.compare(name, c, oracle.generate(p, cfg, MAX_TOKENS), cfg)
        if not v.ok:
            bad.append(f"{name}: cold != oracle: {v.message}")
    assert not bad, "\n".join(bad)
    # the gate is open at some positions and not at others
    orc = oracle.generate(ids, gated, MAX_TOKENS)
    frac = ds.gate_open_fraction(orc)
    assert frac is not None and 0 < frac < 1, frac


def test_a_capture_of_probe_scores_only(llm, oracle, prompts):
    cfg = {"steer": [{"vector": "joy", "layers": [1], "scale": 2.0}],
           "when": {"probe": "joy.probe", "layer": 0, "above": 0.0},
           "capture": {"probe": True, "positions": "all"}}
    eng = _generate(llm, [(prompts[1], cfg)])[0]
    v = ds.compare("probe only", eng, oracle.generate(prompts[1], cfg, MAX_TOKENS), cfg)
    assert v.ok, v.message
    assert sorted(eng["captures"]["probe"]) == [0]
