"""The "vllm" backend of extraction and attribution equals the "hf" backend (fp32) on the
planted tiny Llama: same vectors, same layer proxy, same head intention and recovery.
One engine for the module (start-up dominates)."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from test_attribution import N_PAIRS, plant  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import emosteer
    from emosteer.data import load_builtin
    from emosteer.analysis.runners import make_runner
    from emosteer.models.tiny import build_tiny_llama

    pairs = load_builtin("joy")[:N_PAIRS]
    path = tmp_path_factory.mktemp("planted_vllm")
    build_tiny_llama(path, num_layers=3, num_kv_heads=4, state_dict_fn=plant(path, pairs))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    hf = make_runner(model, "hf", tokenizer=tok, progress=False)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("EMOSTEER_IMPL", None)
    llm = emosteer.LLM(str(path), dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    vl = make_runner(llm, "vllm", progress=False)
    yield hf, vl, pairs
    try:
        llm.llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm, vl
    gc.collect()


def test_vllm_backend_matches_hf(both):
    from emosteer.analysis.attribution import head_attribution, layer_attribution, neuron_attribution
    from emosteer.analysis.extract import extract_vectors

    hf, vl, pairs = both
    always = lambda text, emo: 1.0  # noqa: E731
    a = extract_vectors(hf, pairs, "joy", max_new_tokens=3, progress=False, hit_rate_fn=always)
    b = extract_vectors(vl, pairs, "joy", backend="vllm", max_new_tokens=3, progress=False,
                        hit_rate_fn=always)
    for name in ("joy", "joy.h"):
        torch.testing.assert_close(b.bank.get(name), a.bank.get(name), atol=1e-4, rtol=1e-4)
    assert b.bank.meta("joy")["backend"] == "vllm"

    prompts = [f"{p.neutral.text} {p.query}" for p in pairs[:2]]
    la = layer_attribution(hf, "joy", prompts, max_new_tokens=4, narratives=False)
    lb = layer_attribution(vl, "joy", prompts, max_new_tokens=4, narratives=False)
    torch.testing.assert_close(torch.tensor(lb.proxy_change), torch.tensor(la.proxy_change),
                               atol=1e-3, rtol=1e-3)

    ha = head_attribution(hf, "joy", pairs, top_k=2)
    hb = head_attribution(vl, "joy", pairs, top_k=2)
    torch.testing.assert_close(hb.intention, ha.intention, atol=1e-4, rtol=1e-4)
    assert hb.top == ha.top and hb.top[0] == (1, 2)
    for c in ha.candidates:
        assert abs(hb.recovery[c] - ha.recovery[c]) < 1e-3

    nb = neuron_attribution(vl, "joy", pairs, top_k=4)
    assert nb.method == "align" and nb.atp is None
    assert nb.top[0] == (2, 7)  # the planted neuron also has the best alignment


def test_reduced_logits_equal_full_logits_on_both_backends(both):
    """forward(reduce=...) keeps only what the reduction returns, group by group (the
    vLLM runner's LM head runs over about 512 positions at a time: 40 rows of 16
    positions span two groups); perplexities use it and equal the full logits' numbers,
    and the two backends agree."""
    import math

    from emosteer.analysis.fluency import perplexities

    hf, vl, pairs = both
    ids = hf.encode([f"{p.neutral.text} {p.query}" for p in pairs[:4]]) * 10
    narr = [list(x[-16:]) for x in ids]  # valid token ids of the tiny vocabulary
    full = [list(i) + list(n[:-1]) for i, n in zip(ids, narr)]
    pos = [list(range(len(i) - 1, len(i) - 1 + len(n))) for i, n in zip(ids, narr)]
    logits, _ = vl.forward(full, [None] * len(full), positions=pos)
    want = [math.exp(-float(torch.log_softmax(lg, -1).gather(1, torch.tensor(n).view(-1, 1)).mean()))
            for lg, n in zip(logits, narr)]
    got_vl = perplexities(vl, ids, narr)
    got_hf = perplexities(hf, ids, narr)
    assert got_vl == pytest.approx(want, rel=1e-5)
    assert got_hf == pytest.approx(want, rel=1e-3)
    firsts, _ = vl.forward(full, [None] * len(full), positions=pos, reduce=lambda i, lg: (i, lg.shape))
    assert firsts == [(i, (16, logits[0].shape[-1])) for i in range(len(full))]


def test_next_token_logmass_from_engine_logprobs(both):
    """The vLLM runner reads the target log-mass from the engine's log-probabilities of
    the listed ids (no residual, no LM head here); it equals the log-mass of the full
    logits that forward() computes through the LM head, for plain and steered rows, and
    the hf backend's; duplicate ids count twice, as in target_logmass."""
    from emosteer.analysis.attribution.metrics import target_logmass

    hf, vl, pairs = both
    prompts = hf.encode([f"{p.neutral.text} {p.query}" for p in pairs[:2]])
    ids = [prompts[0], prompts[0], prompts[1]]
    tids = [5, 17, 17, 40, 3]
    scaled = {"heads": [{"layer": l, "head": h, "mode": "scale", "scale": 3.0}
                        for l in range(3) for h in range(4)]}
    specs = [None, scaled, scaled]
    logits, _ = vl.forward(ids, specs)
    want = torch.stack([target_logmass(lg, torch.tensor(tids)) for lg in logits])
    assert vl._logprobs_mode() == "raw_logprobs"  # so the engine path runs
    got = vl.next_token_logmass(ids, specs, tids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(hf.next_token_logmass(ids, specs, tids), want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[0], got[1])  # the heads' scale changes the score
    # Engine logprobs were used: more ids than vLLM returns per request take the LM head.
    many = list(range(200))
    torch.testing.assert_close(vl.next_token_logmass(ids[:1], [None], many),
                               target_logmass(logits[0], torch.tensor(many)).view(1), atol=2e-5, rtol=1e-5)
    # A cache_salt per row (the sweep benchmark's plain condition) changes which blocks
    # are reused, never the score; a salt list of the wrong length, or salts on the
    # LM-head path (which cannot take them), is refused.
    torch.testing.assert_close(vl.next_token_logmass(ids, specs, tids, salts=["a", "b", "a"]), want,
                               atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="2 salts for 3 rows"):
        vl.next_token_logmass(ids, specs, tids, salts=["a", "b"])
    with pytest.raises(ValueError, match="salts need the engine"):
        vl.next_token_logmass(ids[:1], [None], many, salts=["a"])
    # last_cached_tokens: the prompt tokens the prefix cache served in the last call (the
    # sweep benchmark checks both conditions equal with it). A prompt of several full
    # blocks is served from the cache the second time; a new salt shares nothing.
    long = (prompts[0] * 40)[:300]
    vl.next_token_logmass([long], [None], tids)
    vl.next_token_logmass([long], [None], tids)
    assert vl.last_cached_tokens >= 128, vl.last_cached_tokens
    vl.next_token_logmass([long], [None], tids, salts=["fresh-salt"])
    assert vl.last_cached_tokens == 0
    vl.next_token_logmass([long], [None], tids, salts=["fresh-salt"])
    assert vl.last_cached_tokens >= 128, vl.last_cached_tokens
