"""Attribution on a tiny Llama with a PLANTED circuit (hf backend).

The weights are edited so that one head and one neuron carry the emotional signal:

- residual dims 0, 1, 2 are reserved: nothing writes them except the plant, and every
  other o_proj / down_proj weight is scaled by 0.1 (a quiet background);
- tokens that occur only in the emotional prompts of the pairs get a marker in dim 0;
- head (1, 2) attends uniformly (zero query), reads dim 0 and writes dim 1;
- neuron (2, 7) reads dim 1 (gate and up) and writes dim 2;
- the LM head maps dims 1 and 2 onto the target tokens ("joy").
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from emosteer.analysis.attribution import attribute, stage_bands, target_logmass, target_token_ids
from emosteer.data import load_builtin
from emosteer.analysis.extract import pair_text

HEAD = (1, 2)
NEURON = (2, 7)
N_PAIRS = 6


def plant(path, pairs):
    def fn(model):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        def prompt(stim, p):
            msgs = [{"role": "user", "content": pair_text(stim, p.query)}]
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

        pos = {t for p in pairs for t in tok(prompt(p.emotional, p))["input_ids"]}
        neg = {t for p in pairs for t in tok(prompt(p.neutral, p))["input_ids"]}
        marker = sorted(pos - neg)
        tids = target_token_ids(tok, "joy")
        D = model.config.head_dim
        m = model.model
        m.embed_tokens.weight[:, :3] = 0
        m.embed_tokens.weight[marker, 0] = 3.0
        for layer in m.layers:  # a quiet background: the plant carries the signal
            layer.self_attn.o_proj.weight.mul_(0.1)[:3] = 0
            layer.mlp.down_proj.weight.mul_(0.1)[:3] = 0
        l, h = HEAD
        attn = m.layers[l].self_attn
        sl = slice(h * D, (h + 1) * D)
        attn.q_proj.weight[sl] = 0
        attn.v_proj.weight[sl] = 0
        attn.v_proj.weight[h * D, 0] = 1.0
        attn.o_proj.weight[:, sl] = 0
        attn.o_proj.weight[1, h * D] = 10.0
        l, i = NEURON
        mlp = m.layers[l].mlp
        mlp.gate_proj.weight[i] = 0
        mlp.up_proj.weight[i] = 0
        mlp.gate_proj.weight[i, 1] = 1.0
        mlp.up_proj.weight[i, 1] = 1.0
        mlp.down_proj.weight[:, i] = 0
        mlp.down_proj.weight[2, i] = 0.1
        model.lm_head.weight[:, :3] = 0
        model.lm_head.weight[tids, 1] = 2.0
        model.lm_head.weight[tids, 2] = 2.0

    return fn


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emosteer.analysis.extract import extract_vectors
    from emosteer.analysis.runners import make_runner
    from emosteer.models.tiny import build_tiny_llama

    pairs = load_builtin("joy")[:N_PAIRS]
    path = tmp_path_factory.mktemp("planted")
    build_tiny_llama(path, num_layers=3, num_kv_heads=4, state_dict_fn=plant(path, pairs))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    runner = make_runner(model, "hf", tokenizer=tok, progress=False, batch_size=8)
    extract_vectors(runner, pairs, "joy", max_new_tokens=2, progress=False,
                    hit_rate_fn=lambda text, emo: 1.0)
    return runner, pairs


@pytest.fixture(scope="module")
def result(planted, tmp_path_factory):
    runner, pairs = planted
    out = tmp_path_factory.mktemp("attr_out")
    res = attribute(runner, "joy", pairs, top_heads=3, top_neurons=4, n_pairs=N_PAIRS, n_prompts=4,
                    max_new_tokens=6, progress=False, out_dir=out)
    return res, out


def test_planted_head_ranks_first(result):
    res, _ = result
    hs = res.heads
    assert hs.intention.shape == (3, 4)
    assert int(hs.intention.flatten().argmax()) == HEAD[0] * 4 + HEAD[1]
    assert hs.top[0] == HEAD
    assert hs.recovery[HEAD] > 0.5  # patching the head recovers most of the X+ effect
    assert hs.recovery[HEAD] == max(hs.recovery.values())


def test_planted_neuron_found(result):
    res, _ = result
    ns = res.neurons
    assert ns.method == "align+atp" and ns.align.shape == (3, 256) and ns.atp.shape == (3, 256)
    assert ns.top[0] == NEURON
    assert int(ns.atp.flatten().argmax()) == NEURON[0] * 256 + NEURON[1]


def test_layer_profile_and_outputs(result):
    res, out = result
    lp = res.layers
    assert len(lp.profile) == len(lp.proxy_change) == len(lp.scales) == 3
    assert all(math.isfinite(x) for x in lp.profile + lp.proxy_change + lp.scales)
    assert lp.hit_rate is not None and len(lp.hit_rate) == 3
    stages = lp.stages
    assert stages["adapt"] + stages["aggregate"] + stages["execute"] == [0, 1, 2]
    assert stages["aggregate"] and 0 <= stages["l_emo"] < 3
    # injecting S_1 (which carries the planted head's write) raises the target mass
    assert lp.proxy_change[1] > 0
    bank = res.bank
    assert bank.get("joy.vee", "head_mask")[HEAD] == 1 and bank.get("joy.vee").sum() == 3
    assert bank.get("joy.ena", "neurons")[NEURON] == 1 and bank.get("joy.ena").sum() == 4
    assert not [n for n in bank.names() if n.startswith("_attr.")]
    data = json.loads((out / "attribution.json").read_text())
    assert data["heads"]["top"][0] == list(HEAD) and data["neurons"]["top"][0] == list(NEURON)
    for name in ("layers.png", "heads.png", "bank.safetensors"):
        assert (out / name).stat().st_size > 1000


def test_stage_bands_half_maximum_rule():
    st = stage_bands([0, 0, 1, 5, 6, 5, 1, 0, 0])
    assert st["adapt"] == [0, 1, 2] and st["aggregate"] == [3, 4, 5] and st["execute"] == [6, 7, 8]
    assert st["l_emo"] == 5 and st["peak"] == 4
    flat = stage_bands([1.0, 1.0, 1.0])
    assert flat["adapt"] + flat["aggregate"] + flat["execute"] == [0, 1, 2]


def test_target_logmass():
    logits = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0]])
    got = target_logmass(logits, torch.tensor([1, 2]))
    torch.testing.assert_close(got, torch.tensor([math.log(4.0 / 6.0)]))


def test_head_patching_is_position_aligned_when_layouts_match(planted):
    """Pairs with the same token layout are patched position by position (every prompt
    position gets the X+ head output from the same position), and the planted head, which
    reads the emotional tokens at every position, recovers the whole effect."""
    from emosteer.analysis.attribution import head_attribution
    from emosteer.analysis.extract import CAPTURE_LAST, stack_captures

    runner, pairs = planted
    ids_pos = runner.encode([pair_text(p.emotional, p.query) for p in pairs])
    ids_neg = runner.encode([pair_text(p.neutral, p.query) for p in pairs])
    cut = [min(len(a), len(b)) for a, b in zip(ids_pos, ids_neg)]
    ids_pos = [a[:n] for a, n in zip(ids_pos, cut)]
    ids_neg = [b[:n] for b, n in zip(ids_neg, cut)]
    L = runner.info.num_layers
    _, cp = runner.forward(ids_pos, [CAPTURE_LAST] * len(pairs))
    _, cn = runner.forward(ids_neg, [CAPTURE_LAST] * len(pairs))
    hs = head_attribution(runner, "joy", pairs, top_k=2,
                          _captures=(ids_pos, ids_neg, stack_captures(cp, L), stack_captures(cn, L)))
    assert hs.patching == "position-aligned"
    assert hs.top[0] == HEAD and hs.recovery[HEAD] > 0.9, hs.recovery


def test_head_map_patches_the_emotional_value_at_the_last_token(planted):
    """The full head map patches each head with its output on the EMOTIONAL prompt: the
    recovery of every head equals an independent transformers-hook computation (o_proj
    input of X+ at its last token written into X- at its last token), and the planted
    head leads the map."""
    from emosteer.analysis.attribution import head_map

    runner, pairs = planted
    ids_pos = runner.encode([pair_text(p.emotional, p.query) for p in pairs])
    ids_neg = runner.encode([pair_text(p.neutral, p.query) for p in pairs])
    pairs = [p for p, a, b in zip(pairs, ids_pos, ids_neg) if len(a) != len(b)][:3]
    assert len(pairs) >= 2
    hm = head_map(runner, "joy", pairs, n_boot=200)
    assert hm.patching == "last-token"
    L, H = hm.recovery.shape
    assert max(((l, h) for l in range(L) for h in range(H)), key=lambda c: float(hm.recovery[c])) == HEAD
    assert hm.recovery[HEAD] > 0.3 and hm.ci[HEAD][0] > 0

    model, tok = runner.model, runner.tokenizer
    tids = torch.as_tensor(target_token_ids(tok, "joy"))
    D = model.config.head_dim
    o_proj = [layer.self_attn.o_proj for layer in model.model.layers]

    def run(ids, patch=None, grab=None):
        x = torch.tensor([ids])
        handles = []
        if grab is not None:
            handles.append(o_proj[grab[0]].register_forward_pre_hook(
                lambda m, a: grab[2].append(a[0][0, -1, grab[1] * D:(grab[1] + 1) * D].clone())))
        if patch is not None:
            l, h, v = patch

            def hook(m, a):
                z = a[0].clone()
                z[0, -1, h * D:(h + 1) * D] = v
                return (z,)
            handles.append(o_proj[l].register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                return float(target_logmass(model(input_ids=x).logits[0, -1].float(), tids))
        finally:
            for hd in handles:
                hd.remove()

    ip = runner.encode([pair_text(p.emotional, p.query) for p in pairs])
    ineg = runner.encode([pair_text(p.neutral, p.query) for p in pairs])
    gap = sum(run(a) - run(b) for a, b in zip(ip, ineg)) / len(pairs)
    for l, h in [HEAD, (0, 1), (2, 3)]:
        dm = 0.0
        for a, b in zip(ip, ineg):
            got: list = []
            run(a, grab=(l, h, got))
            dm += run(b, patch=(l, h, got[0])) - run(b)
        want = dm / len(pairs) / gap
        assert math.isclose(float(hm.recovery[l, h]), want, rel_tol=1e-3, abs_tol=1e-4), ((l, h), hm.recovery[l, h], want)
