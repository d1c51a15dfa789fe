"""The correctness contracts, written once and run on the eager and the compiled engine.

Each ``check_*`` takes an ``emosteer.LLM`` (and fixtures) and asserts one contract of
docs/DESIGN.md §5: scale 0 / empty == plain vLLM, isolation in a mixed batch, vLLM == the HF
reference (tokens, steered logprobs, captures), prefix cache warm == cold and no reuse
across configs, malformed configs rejected by field, slot exhaustion contained.
"""

from __future__ import annotations

import math
import uuid

import pytest
import torch

from vllm_support import LONG_PROMPT, MAX_SLOTS, MAX_TOKENS, PROMPTS, assert_no_slots_held, greedy, summarize

# One config per kind of intervention, plus mixes and phase splits (all on the bank of
# conftest.make_bank). Index 0 is plain.
CONFIGS = [
    None,
    {"steer": [{"vector": "joy", "layers": [0], "scale": 4.0}]},
    {"steer": [{"vector": "sad", "layers": "all", "scale": 3.0, "positions": "generated"}]},
    {"heads": [{"layer": 1, "head": [0, 2], "mode": "add", "vector": "joy.h", "scale": 3.0}]},
    {"heads": [{"layer": 0, "head": 1, "mode": "patch", "vector": "joy.h"},
               {"layer": 1, "head": 3, "mode": "ablate"}]},
    {"neurons": {"set": "joy.ena", "gamma": 4.0}},
    {"heads": [{"layer": 0, "head": [0, 1, 2, 3], "mode": "scale", "scale": 0.25, "positions": "prompt"}],
     "steer": [{"vector": "joy", "layers": [1], "scale": 2.0}, {"vector": "sad", "layers": [1], "scale": -1.5}]},
    {"steer": [{"vector": "joy", "layers": [0, 1], "scale": 2.5}],
     "neurons": {"set": "joy.ena", "gamma": 0.5, "positions": "prompt"},
     "capture": {"heads": [1], "residual": "all", "positions": "all"}},
]
ZERO_CONFIGS = [
    {},
    {"steer": [{"vector": "joy", "layers": "all", "scale": 0.0}]},
    {"heads": [{"layer": 1, "head": [0, 1], "mode": "add", "vector": "joy.h", "scale": 0.0}],
     "neurons": {"set": "joy.ena", "gamma": 1.0}},
    {"heads": [{"layer": 0, "head": 2, "mode": "scale", "scale": 1.0}]},
    {"capture": {"heads": "all", "residual": "all", "positions": "all"}},
]


def token_prompts(llm, texts):
    tok = llm.get_tokenizer()
    return [{"prompt_token_ids": tok(t)["input_ids"]} for t in texts]


def assert_logprobs_close(got: dict, want: dict, atol: float) -> None:
    assert got["ids"] == want["ids"]
    for step, (g, w) in enumerate(zip(got["logprobs"], want["logprobs"])):
        for t in set(g) & set(w):
            assert math.isclose(g[t], w[t], abs_tol=atol), (step, t, g[t], w[t])


def check_plain_equivalence(llm, plain_reference, atol: float) -> None:
    """Empty and scale-0 configs give plain vLLM's tokens and logprobs."""
    prompts = PROMPTS[:3]
    for cfg in [None, *ZERO_CONFIGS]:
        outs = llm.generate(prompts, greedy(), steer=cfg, use_tqdm=False)
        for p, o in zip(prompts, outs):
            assert_logprobs_close(summarize(o), plain_reference[p], atol)


def check_isolation(llm) -> None:
    """Each request of a batch of 8 different configs == the same request alone."""
    batch = llm.generate(PROMPTS, greedy(), steer=CONFIGS, use_tqdm=False)
    plain = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    changed = 0
    for i, (p, cfg) in enumerate(zip(PROMPTS, CONFIGS)):
        solo = llm.generate([p], greedy(), steer=[cfg], use_tqdm=False)[0]
        assert_logprobs_close(summarize(batch[i]), summarize(solo), 1e-4)
        changed += summarize(batch[i])["ids"] != summarize(plain[i])["ids"]
        if cfg and "capture" in cfg:
            for kind in ("heads", "residual"):
                for layer, t in batch[i].emosteer_captures[kind].items():
                    torch.testing.assert_close(t, solo.emosteer_captures[kind][layer], atol=1e-5, rtol=0)
    assert changed >= 5, "the interventions should change most outputs"


def assert_matches_hf(llm, model, bank, prompts, cfgs, capture, atol: float = 1e-4) -> None:
    """Each config (+ ``capture``) on vLLM == on the HF reference backend with ``bank``:
    no error, same tokens, first-step logprobs, capture positions and captured rows."""
    from emosteer.hf import HFSteerer

    for cfg in cfgs:
        spec = {**cfg, "capture": capture}
        outs = llm.generate(prompts, greedy(ignore_eos=True), steer=spec, use_tqdm=False)
        with HFSteerer(model, bank) as hf:
            for prompt, out in zip(prompts, outs):
                assert out.emosteer_error is None, out.emosteer_error
                ids = torch.tensor([prompt["prompt_token_ids"]])
                ref = hf.generate(ids, specs=[spec], max_new_tokens=MAX_TOKENS, eos_token_id=-1)
                assert list(out.outputs[0].token_ids) == ref.token_ids[0], cfg
                logits, _ = hf.run(ids, specs=[spec], logits="last")
                lp = torch.log_softmax(logits[0].float(), -1)
                for t, v in out.outputs[0].logprobs[0].items():
                    assert math.isclose(v.logprob, float(lp[t]), abs_tol=atol), (cfg, t)
                got, want = out.emosteer_captures, ref.captures[0]
                assert got["positions"] == want["positions"]
                for kind in ("heads", "residual"):
                    assert sorted(got[kind]) == sorted(want[kind])
                    for layer in got[kind]:
                        torch.testing.assert_close(got[kind][layer], want[kind][layer].float(), atol=atol, rtol=1e-4)


def check_matches_hf(llm, tiny_model, bank, atol: float = 1e-4) -> None:
    """Same tokens, first-step logprobs and captures as the HF reference backend."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = token_prompts(llm, PROMPTS[:2])
    capture = {"heads": "all", "residual": "all", "positions": "all"}
    assert_matches_hf(llm, model, bank, prompts, CONFIGS[1:], capture, atol)


def check_capture_positions(llm, info) -> None:
    """"last" is the last prompt row of "all"; "generated" the rows after the prompt."""
    prompt = token_prompts(llm, PROMPTS[:1])[0]
    P = len(prompt["prompt_token_ids"])
    steer = {"steer": [{"vector": "joy", "layers": [0], "scale": 2.0}]}
    res = {}
    for pos in ("last", "all", "generated"):
        spec = {**steer, "capture": {"heads": [0, 1], "residual": [1], "positions": pos}}
        res[pos] = llm.generate([prompt], greedy(ignore_eos=True), steer=spec, use_tqdm=False)[0].emosteer_captures
    assert res["last"]["positions"] == [P - 1]
    assert res["all"]["positions"] == list(range(P + MAX_TOKENS - 1))
    assert res["generated"]["positions"] == list(range(P, P + MAX_TOKENS - 1))
    H, D, d = info.num_heads, info.head_dim, info.hidden_size
    assert res["all"]["heads"][0].shape == (P + MAX_TOKENS - 1, H, D)
    assert res["all"]["residual"][1].shape == (P + MAX_TOKENS - 1, d)
    for kind, layer in (("heads", 0), ("heads", 1), ("residual", 1)):
        full = res["all"][kind][layer]
        assert torch.equal(res["last"][kind][layer], full[P - 1 : P])
        assert torch.equal(res["generated"][kind][layer], full[P:])
        assert torch.isfinite(full).all() and full.abs().sum() > 0


def check_prefix_cache(llm) -> None:
    """Warm == cold; a steered prompt never reuses unsteered KV (nor the reverse)."""
    prompt = token_prompts(llm, [LONG_PROMPT])[0]
    assert len(prompt["prompt_token_ids"]) > 32
    steer = {"steer": [{"vector": "joy", "layers": [0], "scale": 4.0}]}

    def run(cfg):
        o = llm.generate([prompt], greedy(), steer=cfg, use_tqdm=False)[0]
        return summarize(o), o.num_cached_tokens or 0

    llm.reset_prefix_cache()
    cold, n = run(steer)
    assert n == 0
    warm, n = run(steer)
    assert n > 0, "the second identical steered request should hit the prefix cache"
    assert_logprobs_close(warm, cold, 1e-5)
    llm.reset_prefix_cache()
    plain_cold, _ = run(None)
    after, n = run(steer)
    assert n == 0, "a steered request must not reuse KV computed without steering"
    assert_logprobs_close(after, cold, 1e-5)
    plain_after, n = run(None)
    assert n > 0  # it reuses its own earlier KV ...
    assert_logprobs_close(plain_after, plain_cold, 1e-5)  # ... not the steered one
    assert plain_cold["ids"] != cold["ids"]
    gen_only = {"steer": [{"vector": "joy", "layers": [0], "scale": 4.0, "positions": "generated"}]}
    _, n = run(gen_only)
    assert n > 0, "a generated-only config shares the unsteered prompt KV"
    check_prefix_sharing_by_position(llm, prompt, gen_only)
    check_prefix_reuse_across_prompt_lengths(llm, prompt)


def check_prefix_reuse_across_prompt_lengths(llm, prompt) -> None:
    """Warm == cold where the cached blocks come from a request whose prompt ended
    elsewhere: a conversation continued under a config whose program depends on where
    the prompt ends, and a longer prompt sharing a block with a shorter one's last token."""
    ids = list(prompt["prompt_token_ids"])
    bs = llm.llm.llm_engine.vllm_config.cache_config.block_size
    assert len(ids) >= bs + 10

    def run(p, cfg, max_tokens):
        o = llm.generate([{"prompt_token_ids": p}], greedy(max_tokens), steer=cfg, use_tqdm=False)[0]
        assert o.emosteer_error is None, o.emosteer_error
        return summarize(o), o.num_cached_tokens or 0

    cases = [
        # turn A's reply fills whole blocks that turn B reads as prompt tokens
        ({"steer": [{"vector": "joy", "layers": "all", "scale": 3.0, "positions": "prompt"}]}, True),
        ({"steer": [{"vector": "joy", "layers": [1], "scale": 2.0, "positions": "last"}],
          "heads": [{"layer": 0, "head": 1, "mode": "scale", "scale": 0.5, "positions": "generated"}]}, True),
        # a shorter prompt's last-token block under a longer prompt
        ({"steer": [{"vector": "sad", "layers": "all", "scale": 1.5, "positions": "all"}],
          "heads": [{"layer": 1, "head": [0, 2], "mode": "add", "vector": "joy.h", "scale": 3.0,
                     "positions": "last"}]}, False),
    ]
    # a client salt can never look like the plugin's (offline path; the server too)
    for cfg in (None, cases[0][0]):
        with pytest.raises(ValueError, match="cache_salt") as e:
            llm.generate([{"prompt_token_ids": ids, "cache_salt": "emosteer@0:" + "0" * 64}],
                         greedy(), steer=cfg, use_tqdm=False)
        assert "reserved" in str(e.value)
    for cfg, conversation in cases:
        llm.reset_prefix_cache()
        if conversation:
            a = ids[: bs + 6]
            reply, _ = run(a, cfg, 2 * bs - 6)
            b = a + reply["ids"] + ids[bs + 6 : bs + 9]
        else:
            a, b = ids[:bs], ids[: bs + 10]
            run(a, cfg, 2)
        warm, n = run(b, cfg, MAX_TOKENS)
        llm.reset_prefix_cache()
        cold, _ = run(b, cfg, MAX_TOKENS)
        assert_logprobs_close(warm, cold, 1e-5)
        # what may still be shared: blocks computed under the same program everywhere
        assert n <= (bs if conversation else 0), (cfg, n)


def check_prefix_sharing_by_position(llm, prompt, gen_only) -> None:
    """The salt sits at the first position a config can change: blocks before it are
    shared with unsteered requests (results equal a cold run), blocks from it on, the
    generated ones included, are never reused by anyone else."""
    ids = list(prompt["prompt_token_ids"])
    bs = llm.llm.llm_engine.vllm_config.cache_config.block_size
    assert len(ids) > bs
    shared = (len(ids) - 1) // bs * bs  # the full blocks before the last prompt token

    def run(p, cfg, max_tokens=MAX_TOKENS):
        o = llm.generate([p], greedy(max_tokens), steer=cfg, use_tqdm=False)[0]
        return summarize(o), o.num_cached_tokens or 0

    last = {"heads": [{"layer": 1, "head": [0, 2], "mode": "add", "vector": "joy.h", "scale": 3.0,
                       "positions": "last"}]}
    llm.reset_prefix_cache()
    cold, n = run(prompt, last)
    assert n == 0
    llm.reset_prefix_cache()
    plain, _ = run(prompt, None)
    warm, n = run(prompt, last)
    assert n == shared, f"a last-token config reuses the {shared} unsteered tokens before it, got {n}"
    assert_logprobs_close(warm, cold, 1e-5)
    assert warm["ids"] != plain["ids"]
    again, n = run(prompt, None)
    assert_logprobs_close(again, plain, 1e-5)  # the unsteered answer is unchanged
    # A generated-only config: a follow-up prompt holding the steered answer must not
    # reuse the steered answer's KV (vLLM caches full generated blocks too).
    llm.reset_prefix_cache()
    steered, _ = run(prompt, gen_only, max_tokens=2 * bs)
    follow = {"prompt_token_ids": ids + steered["ids"] + ids[:3]}
    warm_f, n = run(follow, None)
    assert n <= len(ids) // bs * bs, f"reused {n} tokens: the steered answer's KV leaked"
    llm.reset_prefix_cache()
    cold_f, _ = run(follow, None)
    assert_logprobs_close(warm_f, cold_f, 1e-5)


MALFORMED = [
    ({"steer": [{"vector": "joy", "layers": [0], "scale": float("nan")}]}, "steer[0].scale"),
    ({"steer": [{"vector": "nope", "layers": [0], "scale": 1.0}]}, "steer[0].vector"),
    ({"steer": [{"vector": "joy.h", "layers": [0], "scale": 1.0}]}, "steer[0].vector"),
    ({"steer": [{"vector": "joy", "layers": [7], "scale": 1.0}]}, "steer[0].layers"),
    ({"steer": [{"vector": "joy", "layers": [0], "scale": 1e9}]}, "steer[0].scale"),
    ({"steer": [{"vector": "joy", "scale": 1.0}]}, "steer[0].layers"),
    ({"heads": [{"layer": 0, "head": 9, "mode": "ablate"}]}, "heads[0].head"),
    ({"heads": [{"layer": 0, "head": 1, "mode": "fly"}]}, "heads[0].mode"),
    ({"heads": [{"layer": 0, "head": 1, "mode": "patch"}]}, "heads[0].vector"),
    ({"neurons": {"set": "joy.ena", "gamma": -1}}, "neurons.gamma"),
    ({"neurons": {"set": "joy", "gamma": 2}}, "neurons.set"),
    ({"capture": {"positions": "all"}}, "capture"),
    ({"capture": {"heads": "all", "positions": "sometimes"}}, "capture.positions"),
    ({"boost": {"heads": "nope", "beta": 1.5}}, "boost.heads"),
    ({"capture": {"attn_image": [0], "positions": "last"}}, "capture.attn_image"),  # no image
    ({"colour": "red"}, "colour"),
    ("{not json", "spec"),
]


def check_malformed(llm) -> None:
    """Each bad config is refused naming its field, through emosteer.LLM and through
    plain vLLM's generate with extra_args (the input-processor patch); the engine goes on."""
    from emosteer.request.spec import SpecError

    for cfg, field in MALFORMED:
        with pytest.raises(SpecError) as e:
            llm.generate(PROMPTS[:2], greedy(), steer=[None, cfg], use_tqdm=False)
        assert e.value.field == field, (cfg, e.value)
        sp = greedy()
        sp.extra_args = {"emosteer": cfg}
        with pytest.raises(ValueError) as e2:
            llm.llm.generate(PROMPTS[:1], sp, use_tqdm=False)
        assert field in str(e2.value)
    out = llm.generate(PROMPTS[:2], greedy(), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) > 0 for o in out)


def check_admission_flood(llm, plain_reference) -> None:
    """4 x max_slots distinct configs at once through plain vLLM's generate (no waves
    anywhere): the scheduler admits them as slots free, every answer equals that
    config's answer run alone, none is the unsteered text; afterwards each config alone
    (prefix cache warm with the flood's blocks) still gives it; every slot is freed."""
    n = 4 * MAX_SLOTS
    cfgs = [{"steer": [{"vector": "joy", "layers": [0, 1], "scale": 1.0 + 0.5 * i}],
             "heads": [{"layer": i % 2, "head": i % 4, "mode": "add", "vector": "joy.h", "scale": 1.0}]}
            for i in range(n)]
    prompts = [f"{LONG_PROMPT} ({i % 3})" for i in range(n)]  # several KV blocks each
    sps = []
    for cfg in cfgs:
        sp = greedy(logprobs=None)
        sp.extra_args = {"emosteer": cfg}
        sps.append(sp)
    flood = [list(o.outputs[0].token_ids) for o in llm.llm.generate(prompts, sps, use_tqdm=False)]
    assert all(o.outputs[0].finish_reason != "error" for o in llm.llm.generate(prompts[:1], sps[:1], use_tqdm=False))
    plain = {p: list(o.outputs[0].token_ids)
             for p, o in zip(prompts[:3], llm.generate(prompts[:3], greedy(logprobs=None), use_tqdm=False))}
    solo = [list(llm.generate([p], greedy(logprobs=None), steer=c, use_tqdm=False)[0].outputs[0].token_ids)
            for p, c in zip(prompts, cfgs)]
    assert flood == solo
    assert all(f != plain[p] for f, p in zip(flood, prompts)), "a steered answer equals the unsteered text"
    again = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy(logprobs=None), steer=cfgs, use_tqdm=False)]
    assert again == solo
    assert_no_slots_held(llm)
    st = llm.admission_status()
    assert st["max_slots"] == MAX_SLOTS and st["waiting_for_slots"] == 0, st
    out = llm.generate(PROMPTS[:1], greedy(), use_tqdm=False)[0]
    assert summarize(out)["ids"] == plain_reference[PROMPTS[0]]["ids"]


def check_register_vectors(llm, info) -> None:
    """Vectors registered at run time work; re-registering a name with new values
    changes the output (the slot of the old values is not reused)."""
    from emosteer.request.bank import VectorBank

    cfg = {"steer": [{"vector": "calm", "layers": [0, 1], "scale": 3.0}]}
    outs = []
    for seed in (1, 2):
        b = VectorBank(info)
        b.add("calm", "residual", torch.randn(info.num_layers, info.hidden_size, generator=torch.Generator().manual_seed(seed)))
        assert llm.register_vectors(b) == ["calm"]
        outs.append(summarize(llm.generate(PROMPTS[:1], greedy(), steer=cfg, use_tqdm=False)[0]))
    plain = summarize(llm.generate(PROMPTS[:1], greedy(), use_tqdm=False)[0])
    assert outs[0]["ids"] != plain["ids"] and outs[1]["ids"] != outs[0]["ids"]
    assert "calm" in llm.status()[0]["bank"]


def check_worker_failure_is_an_error(llm, info) -> None:
    """A request the worker cannot apply comes back as an error, never as unsteered text,
    and its prompt's KV is evicted: the same config sent again after the banks agree
    equals a run on a cold prefix cache. Here the vector is replaced in the workers
    behind the front end's back more times than they keep old versions (KEEP_VERSIONS),
    so the contents the front end admitted the request with are gone."""
    from vllm_support import make_bank

    cfg = {"steer": [{"vector": "joy", "layers": [0, 1], "scale": 2.0}]}
    prompt = f"{LONG_PROMPT} (worker failure case)"
    plain = list(llm.generate([prompt], greedy(logprobs=None), use_tqdm=False)[0].outputs[0].token_ids)
    from emosteer.vllm.worker import KEEP_VERSIONS

    original = make_bank(info)  # what the engine was started with (see conftest)
    want = list(llm.generate([prompt], greedy(logprobs=None), steer=cfg, use_tqdm=False)[0].outputs[0].token_ids)
    # Replaced once in the workers only: they still hold the version the front end
    # admits with, and the request runs with exactly it.
    llm.llm.collective_rpc("emosteer_rpc", args=("register", make_bank(info, seed=5).to_bytes()))
    again = llm.generate([prompt], greedy(logprobs=None), steer=cfg, use_tqdm=False)[0]
    assert again.emosteer_error is None and list(again.outputs[0].token_ids) == want
    for seed in range(6, 6 + KEEP_VERSIONS):
        llm.llm.collective_rpc("emosteer_rpc", args=("register", make_bank(info, seed=seed).to_bytes()))
    try:
        out = llm.generate([prompt, PROMPTS[0]], greedy(logprobs=None), steer=[cfg, None], use_tqdm=False)
        bad, other = out
        assert bad.emosteer_error is not None and "no longer held" in bad.emosteer_error, bad.emosteer_error
        assert bad.outputs[0].finish_reason == "error"
        assert list(bad.outputs[0].token_ids) != plain or not bad.outputs[0].token_ids
        assert other.emosteer_error is None and other.outputs[0].finish_reason != "error"
        with pytest.raises(Exception, match="no longer held"):
            llm.generate([prompt], greedy(logprobs=None), steer=cfg, use_tqdm=False, raise_on_error=True)
    finally:
        llm.llm.collective_rpc("emosteer_rpc", args=("register", original.to_bytes()))
    warm = list(llm.generate([prompt], greedy(logprobs=None), steer=cfg, use_tqdm=False)[0].outputs[0].token_ids)
    llm.llm.reset_prefix_cache()
    cold = list(llm.generate([prompt], greedy(logprobs=None), steer=cfg, use_tqdm=False)[0].outputs[0].token_ids)
    assert warm == cold and warm != plain
    assert_no_slots_held(llm)


def check_position_indexed(llm, tiny_model, bank, info, atol: float = 1e-4) -> None:
    """Position-indexed interventions: a head patch with one vector per listed prompt
    position, and "last", on vLLM == the same configs on the HF backend (tokens,
    logprobs, captures); "last" touches only the last prompt token."""
    from transformers import AutoModelForCausalLM

    from emosteer.request.bank import VectorBank

    L, H, D = info.num_layers, info.num_heads, info.head_dim
    listed = [0, 2, 3]
    extra = VectorBank(info)
    extra.add("pp", "head_positions", torch.randn(len(listed), L, H, D, generator=torch.Generator().manual_seed(7)))
    llm.register_vectors(extra)
    full = VectorBank(info)
    full.update(bank)
    full.update(extra)
    capture = {"heads": [1], "residual": [0, 1], "positions": "all"}
    cfgs = [
        {"heads": [{"layer": 1, "head": h, "mode": "patch", "vector": "pp", "positions": listed} for h in (0, 2)]},
        {"steer": [{"vector": "joy", "layers": [0], "scale": 3.0, "positions": "last"}],
         "heads": [{"layer": 0, "head": 1, "mode": "add", "vector": "joy.h", "scale": 2.0, "positions": [1]}]},
    ]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = token_prompts(llm, PROMPTS[:2])
    plain = llm.generate(prompts, greedy(ignore_eos=True), steer={"capture": capture}, use_tqdm=False)
    assert_matches_hf(llm, model, full, prompts, cfgs, capture, atol)
    # "last" alone: residual rows before the last prompt token are plain vLLM's, bit for
    # bit; the last one carries the steering add.
    last = {"steer": [{"vector": "joy", "layers": [0], "scale": 3.0, "positions": "last"}], "capture": capture}
    outs = llm.generate(prompts, greedy(ignore_eos=True), steer=last, use_tqdm=False)
    for prompt, out, ref in zip(prompts, outs, plain):
        P = len(prompt["prompt_token_ids"])
        got, want = out.emosteer_captures["residual"][0], ref.emosteer_captures["residual"][0]
        assert torch.equal(got[: P - 1], want[: P - 1])
        torch.testing.assert_close(got[P - 1] - want[P - 1], 3.0 * bank.get("joy")[0], atol=1e-4, rtol=1e-4)


def check_large_captures_and_samples(llm, info) -> None:
    """Captures whose rows in one step exceed the capture buffer (32 long prompts, every
    head and residual at every position) all succeed, each equal to its solo run: the
    scheduler admits capturing requests while their rows fit. ``n = 2`` sampling returns
    each sample's own captures."""
    from vllm import SamplingParams

    cap = {"capture": {"heads": "all", "residual": "all", "positions": "all"}}
    prompts = token_prompts(llm, [f"{LONG_PROMPT} ({i})" for i in range(32)])
    L = info.num_layers
    rows = sum(2 * L * len(p["prompt_token_ids"]) for p in prompts)
    assert rows > llm.admission_status()["capture_rows"] > 4096
    sp = greedy(logprobs=None, ignore_eos=True)
    outs = llm.generate(prompts, sp, steer=cap, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.emosteer_error is None, o.emosteer_error
        P = len(p["prompt_token_ids"])
        assert o.emosteer_captures["positions"] == list(range(P + MAX_TOKENS - 1))
    for i in (0, 31):
        solo = llm.generate([prompts[i]], sp, steer=cap, use_tqdm=False)[0].emosteer_captures
        for kind in ("heads", "residual"):
            for layer in range(L):
                torch.testing.assert_close(outs[i].emosteer_captures[kind][layer], solo[kind][layer],
                                           atol=1e-5, rtol=1e-5)
    assert_no_slots_held(llm)
    assert llm.admission_status()["capture_rows_in_use"] == 0
    # n = 2: one capture set per sample
    prompt = prompts[0]
    P = len(prompt["prompt_token_ids"])
    sp2 = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = llm.generate([prompt], sp2, steer={"capture": {"residual": [1], "positions": "all"}},
                       use_tqdm=False)[0]
    assert out.emosteer_error is None and isinstance(out.emosteer_captures, list)
    assert len(out.emosteer_captures) == 2 and len(out.outputs) == 2
    per = {}
    for c in out.outputs:
        caps = c.emosteer_captures
        assert caps is out.emosteer_captures[c.index]
        assert caps["positions"] == list(range(P + len(c.token_ids) - 1)), (c.index, caps["positions"], P, len(c.token_ids))
        per[c.index] = (list(c.token_ids), caps["residual"][1])
    (t0, r0), (t1, r1) = per[0], per[1]
    torch.testing.assert_close(r0[:P], r1[:P], atol=1e-5, rtol=1e-5)  # the same prompt
    if t0 != t1:  # different samples: their generated rows differ after the first divergence
        k = next(j for j in range(len(t0)) if t0[j] != t1[j])
        if P + k < r0.shape[0]:
            assert not torch.equal(r0[P + k], r1[P + k])
    assert_no_slots_held(llm)


def check_default_slots_one_call(llm) -> None:
    """256 distinct configs in one generate call at default settings: one pass, no waves,
    each equal to its solo run."""
    from emosteer.vllm.config import PluginSettings

    n = PluginSettings().max_slots
    assert llm.admission_status()["max_slots"] == n == 256
    cfgs = [{"steer": [{"vector": "joy", "layers": [i % 2], "scale": 0.5 + 0.01 * i}]} for i in range(n)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    sp = greedy(logprobs=None)
    outs = llm.generate(prompts, sp, steer=cfgs, use_tqdm=False)
    assert all(o.emosteer_error is None for o in outs)
    for i in range(n):
        solo = llm.generate([prompts[i]], sp, steer=cfgs[i], use_tqdm=False)[0]
        assert list(outs[i].outputs[0].token_ids) == list(solo.outputs[0].token_ids), i
