"""Position-aligned head patches in one slot (issue 17, part 3).

A ``head_positions`` vector holds one head vector per listed prompt position. Its patch
used to take one slot per listed position (a 40-position patch: 40 slots); it now holds
ONE slot, whose tables name the first of the vector's consecutive pool rows, and each
token reads its own row through the head op's per-token offset (``row_off``).

Checked here, on the eager engine (``max_slots`` 16, so a patch that still took a slot
per position could never be admitted), and last on the compiled engine:

- the accounting: a 40-position aligned patch compiles to one slot fingerprint and one
  run of 40 pool rows; the scheduler's admission grants it one slot;
- 16 such patches (16 different vectors, two heads each) run in ONE generate call and
  each matches the independent oracle (tests/vllm/oracle.py: plain transformers hooks,
  no code shared with the compiler) in tokens, logprobs and captured head outputs;
- the prefix cache: the same patch again reuses its blocks and gives the cold answer; the
  same vector listed one position later, or another vector at the same positions, on
  the same prompt shares no steered block and gives the oracle's answer;
- the compiled engine (the offsets read inside its graph) in a mixed batch == the oracle.
"""

from __future__ import annotations

import random

import pytest
import torch

import differential_support as ds

pytestmark = pytest.mark.vllm

N_POS = 40  # listed positions of each patch
FIRST = 4  # the first listed position
PROMPT_LEN = 48
N_PATCHES = 16  # == the eager engine's max_slots (vllm_support.MAX_SLOTS)
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def llm(engines):
    return engines.get("eager")


@pytest.fixture(scope="module")
def aligned(llm, bank, info, tiny_model):
    """The bank plus ``pp.<i>`` head_positions vectors [N_POS, L, H, D] (registered in
    the engine) and the oracle over both."""
    from oracle import Oracle

    from emosteer.request.bank import VectorBank

    L, H, D = info.num_layers, info.num_heads, info.head_dim
    g = torch.Generator().manual_seed(17)
    extra = VectorBank(info)
    for i in range(N_PATCHES + 1):
        extra.add(f"pp.{i}", "head_positions", 2.0 * torch.randn(N_POS, L, H, D, generator=g))
    llm.register_vectors(extra)
    full = VectorBank(info)
    full.update(bank)
    full.update(extra)
    return full, Oracle(tiny_model, full)


def _patch(i: int, first: int = FIRST, capture: bool = False) -> dict:
    cfg = {"heads": [{"layer": l, "head": h, "mode": "patch", "vector": f"pp.{i}",
                      "positions": list(range(first, first + N_POS))} for l, h in ((1, 0), (0, 2))]}
    if capture:
        cfg["capture"] = {"heads": "all", "positions": "all"}
    return cfg


def _prompts(seed: int, n: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [ds.random_ids(rng, PROMPT_LEN, vocab) for _ in range(n)]


def test_a_40_position_patch_holds_one_slot_and_one_run_of_rows(aligned, info):
    from emosteer.request.compile import compile_request, key_rows
    from emosteer.request.spec import SteerSpec
    from emosteer.vllm.admission import Admission, Capacity

    full, _ = aligned
    spec = SteerSpec.parse(_patch(0)).resolve(info)
    spec.validate(full, info, PROMPT_LEN)
    req = compile_request(spec, full, info, PROMPT_LEN)
    plan = req.to_plan(0, PROMPT_LEN)
    fps = {ph["fp"] for ph in plan["slots"].values()}
    assert len(plan["slots"]) == N_POS and len(fps) == 1  # 40 groups, one program
    assert req.row_off == {FIRST + k: k for k in range(N_POS)}
    keys = {k for ph in plan["slots"].values() for k in ph["keys"]}
    assert sorted(key_rows(k) for k in keys) == [N_POS, N_POS]  # one run per layer
    rows = {"res": 4, "head": 2 * N_POS, "neu": 4, "probe": 4}
    assert Admission.fits(plan, Capacity(1, rows)) is None
    adm = Admission(Capacity(1, rows))
    grant = adm.try_admit("r", plan)
    assert grant is not None and set(grant["slots"].values()) == {0}
    st = adm.status()
    assert st["slots_in_use"] == 1 and st["pool_rows_in_use"]["head"] == 2 * N_POS
    # The KV identity names each position's row of the run: the same program, another row.
    ident = req.cache_identity(PROMPT_LEN)
    assert [fp for _, fp in ident["at"]] == [f"{next(iter(fps))}#{k}" for k in range(N_POS)]
    adm.release("r")
    assert adm.status()["slots_in_use"] == 0 and adm.status()["pool_rows_in_use"]["head"] == 0


def test_16_aligned_patches_run_in_one_batch_and_match_the_oracle(llm, aligned, info):
    """16 aligned 40-position patches in one generate call on an engine with 16 slots:
    each holds one slot (a slot per position could not be admitted at all), and each
    row equals the oracle; the patches change the plain answer."""
    full, oracle = aligned
    vocab = oracle.model.config.vocab_size
    prompts = _prompts(3, N_PATCHES, vocab)
    cases = [ds.Case(f"pp.{i}", prompts[i], _patch(i, capture=(i % 4 == 0)), MAX_TOKENS)
             for i in range(N_PATCHES)]
    before = llm.admission_status()
    verdicts = ds.run_batch(llm, oracle, cases)
    bad = [v for v in verdicts if not v.ok]
    assert not bad, ds.verdict_table(bad)
    assert sum(v.extra["changed"] for v in verdicts) >= N_PATCHES // 2
    after = llm.admission_status()
    assert after["slots_in_use"] == before["slots_in_use"] == 0
    assert after["pool_rows_in_use"] == before["pool_rows_in_use"]


def test_prefix_cache_keeps_aligned_rows_apart(llm, aligned):
    """Warm == cold for an aligned patch (its blocks reused by the same config on the
    same prompt); the same vector one position later and another vector at the same
    positions share no steered block with it and equal the oracle."""
    full, oracle = aligned
    prompt = _prompts(11, 1, oracle.model.config.vocab_size)[0]
    sp = ds.sampling(MAX_TOKENS)

    def run(cfg):
        out = llm.generate([{"prompt_token_ids": prompt}], sp, steer=cfg, use_tqdm=False)[0]
        return ds.engine_summary(out)

    cfg = _patch(N_PATCHES)
    cold = run(cfg)
    warm = run(cfg)
    assert warm["cached"] > 0, "the same aligned patch on the same prompt reuses its blocks"
    assert ds.compare_engines(warm, cold) == ""
    v = ds.compare("aligned", cold, oracle.generate(prompt, cfg, MAX_TOKENS), cfg)
    assert v.ok, v.message
    for other in (_patch(N_PATCHES, first=FIRST + 1), _patch(0)):
        got = run(other)
        assert got["cached"] <= FIRST, "a block with other rows at its positions was reused"
        v = ds.compare("other rows", got, oracle.generate(prompt, other, MAX_TOKENS), other)
        assert v.ok, v.message
    again = run(cfg)  # and the first config still gets its own answer
    assert ds.compare_engines(again, cold) == ""


def test_compiled_engine_reads_the_offsets_inside_its_graph(engines, aligned, info):
    """The compiled engine (torch.compile; the head op and its row_off[:T] slice inside
    the graph): aligned patches mixed with a last-token patch, a capture-only row and a
    plain row in one batch, each == the oracle."""
    from emosteer.request.bank import VectorBank

    full, oracle = aligned
    llm = engines.get("compiled")
    extra = VectorBank(info)
    for name in full.names("head_positions"):
        extra.add(name, "head_positions", full.get(name))
    llm.register_vectors(extra)
    vocab = oracle.model.config.vocab_size
    prompts = _prompts(5, 6, vocab)
    cases = [ds.Case(f"pp.{i}", prompts[i], _patch(i, capture=(i == 0)), MAX_TOKENS) for i in range(3)]
    cases.append(ds.Case("shifted", prompts[3], _patch(3, first=FIRST + 2), MAX_TOKENS))
    cases.append(ds.Case("last", prompts[4], {"heads": [{"layer": 1, "head": 1, "mode": "patch",
                                                        "vector": "joy.h", "positions": "last"}]}, MAX_TOKENS))
    cases.append(ds.Case("capture", prompts[5], {"capture": {"heads": [0], "positions": "all"}}, MAX_TOKENS))
    cases.append(ds.Case("plain", prompts[0], None, MAX_TOKENS))
    verdicts = ds.run_batch(llm, oracle, cases)
    bad = [v for v in verdicts if not v.ok]
    assert not bad, ds.verdict_table(bad)
