"""HFSteerer on the tiny Llama: each intervention equals a hand computation, captures equal
transformers' own hidden states, rows do not leak into each other."""

from __future__ import annotations

import pytest
import torch

from emosteer.hf import HFSteerer, find_decoder

TOL = dict(atol=1e-5, rtol=1e-5)
CAP_ALL = {"heads": "all", "residual": "all", "positions": "all"}


def plain_logits(model, ids, mask, hook=None, module=None, pre=False):
    """The unmodified model (left padding handled like HFSteerer), optionally with one
    hand-written hook: the independent computation the tests compare against."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    h = None
    if hook is not None:
        h = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    finally:
        if h is not None:
            h.remove()
    return out


def assert_close_real(got, want, mask):
    """Compare logits at real tokens only: hand hooks also touch padding, HFSteerer not."""
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **TOL)


def test_find_decoder(tiny):
    model, _ = tiny
    dec = find_decoder(model)
    assert dec.path == "model.layers" and dec.num_layers == 2
    assert dec.info.num_heads == 4 and dec.info.head_dim == 32


def test_scale_zero_is_plain_model_exactly(tiny, tiny_bank, batch):
    model, tok = tiny
    ids, mask = batch
    ref = plain_logits(model, ids, mask).logits
    st = HFSteerer(model, tiny_bank, tok)
    zero = {
        "steer": [{"vector": "joy", "layers": "all", "scale": 0.0}],
        "heads": [{"layer": 1, "head": 2, "mode": "add", "vector": "joy.h", "scale": 0.0}],
        "neurons": {"set": "joy.ena", "gamma": 1.0},
    }
    for spec in (None, {}, zero, {"capture": CAP_ALL}):
        lg, _ = st.run(ids, mask, [spec, spec])
        assert torch.equal(lg, ref), spec


@pytest.mark.parametrize("mode", ["patch", "ablate", "scale"])
def test_head_intervention_equals_hand_computation(tiny, tiny_bank, batch, mode):
    model, tok = tiny
    ids, mask = batch
    L, H, D = 1, 2, 32
    item = {"layer": L, "head": H, "mode": mode}
    if mode == "patch":
        item["vector"] = "joy.h"
    if mode == "scale":
        item["scale"] = 2.5
    v = tiny_bank.get("joy.h")[L, H]
    o_proj = model.model.layers[L].self_attn.o_proj

    def by_hand(module, args):
        z = args[0].clone().view(*args[0].shape[:-1], 4, D)
        z[..., H, :] = {"patch": v, "ablate": torch.zeros(D), "scale": 2.5 * z[..., H, :]}[mode]
        return (z.view(args[0].shape),)

    want = plain_logits(model, ids, mask, by_hand, o_proj, pre=True).logits
    st = HFSteerer(model, tiny_bank, tok)
    spec = {"heads": [item], "capture": CAP_ALL}
    got, caps = st.run(ids, mask, [spec, None])
    real = mask[0].bool()  # the hand hook also patches padding, HFSteerer does not
    torch.testing.assert_close(got[0][real], want[0][real], **TOL)
    assert torch.equal(got[1], plain_logits(model, ids, mask).logits[1])  # row 1 untouched

    # through o_proj: the output changes by exactly W_O[:, head slice] @ (new - old)
    outs = []
    hk = o_proj.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    try:
        st.run(ids, mask, [spec, None])
        st.run(ids, mask, [None, None])
    finally:
        hk.remove()
    z_old = caps[0]["heads"][L][:, H]  # captured before the intervention, [P, D]
    z_new = {"patch": v.expand_as(z_old), "ablate": torch.zeros_like(z_old), "scale": 2.5 * z_old}[mode]
    W = o_proj.weight[:, H * D:(H + 1) * D]
    diff = outs[0][0][real] - outs[1][0][real]
    torch.testing.assert_close(diff, (z_new - z_old) @ W.T, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layer", [0, 1])
def test_residual_steer_add_equals_adding_to_hidden_state(tiny, tiny_bank, batch, layer):
    model, tok = tiny
    ids, mask = batch
    u = tiny_bank.get("joy")[layer]
    alpha = 3.0

    def by_hand(module, args, out):
        return out + alpha * u

    hand = plain_logits(model, ids, mask, by_hand, model.model.layers[layer])
    plain = plain_logits(model, ids, mask)
    st = HFSteerer(model, tiny_bank, tok)
    spec = {"steer": [{"vector": "joy", "layers": [layer], "scale": alpha}],
            "capture": {"residual": [layer], "positions": "all"}}
    got, caps = st.run(ids, mask, [spec, spec])
    assert_close_real(got, hand.logits, mask)
    assert not torch.allclose(got, plain.logits)
    if layer < 1:  # hidden_states[l + 1] is the layer output (the last one is normed)
        real = mask[1].bool()
        torch.testing.assert_close(caps[1]["residual"][layer],
                                   plain.hidden_states[layer + 1][1][real] + alpha * u, **TOL)


def test_several_steer_items_add_up(tiny, tiny_bank, batch):
    model, tok = tiny
    ids, mask = batch
    u = tiny_bank.get("joy")[0]
    st = HFSteerer(model, tiny_bank, tok)
    two = {"steer": [{"vector": "joy", "layers": [0], "scale": 1.5},
                     {"vector": "joy", "layers": [0, 1], "scale": 0.5}]}
    one = {"steer": [{"vector": "joy", "layers": [0], "scale": 2.0},
                     {"vector": "joy", "layers": [1], "scale": 0.5}]}
    a, _ = st.run(ids, mask, two)
    b, _ = st.run(ids, mask, one)
    torch.testing.assert_close(a, b, **TOL)
    assert u.abs().sum() > 0


def test_neuron_gain_equals_hand_computation(tiny, tiny_bank, batch):
    model, tok = tiny
    ids, mask = batch
    gmask = tiny_bank.get("joy.ena")
    gamma = 1.7

    hooks = []
    for l, layer in enumerate(model.model.layers):
        g = 1 + (gamma - 1) * gmask[l]
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, g=g: (a[0] * g,)))
    try:
        want = plain_logits(model, ids, mask).logits
    finally:
        for h in hooks:
            h.remove()
    st = HFSteerer(model, tiny_bank, tok)
    got, _ = st.run(ids, mask, {"neurons": {"set": "joy.ena", "gamma": gamma}})
    assert_close_real(got, want, mask)


def test_captures_equal_hidden_states_and_o_proj_inputs(tiny, batch):
    model, tok = tiny
    ids, mask = batch
    seen = {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda m, a, l=l: seen.__setitem__(l, a[0].detach().clone()))
        for l, layer in enumerate(model.model.layers)]
    try:
        plain = plain_logits(model, ids, mask)
    finally:
        for h in hooks:
            h.remove()
    st = HFSteerer(model, None, tok)
    specs = [{"capture": CAP_ALL}, {"capture": {"heads": [1], "residual": [0, 1]}}]
    _, caps = st.run(ids, mask, specs)
    for row in (0, 1):
        real = mask[row].bool()
        n = int(real.sum())
        c = caps[row]
        if row == 0:
            assert c["positions"] == list(range(n))
            rows = real
        else:
            assert c["positions"] == [n - 1]
            rows = torch.zeros_like(real)
            rows[-1] = True
        for l, z in c["heads"].items():
            assert torch.equal(z, seen[l][row][rows].view(-1, 4, 32))
        assert torch.equal(c["residual"][0], plain.hidden_states[1][row][rows])
        norm = model.model.norm
        with torch.no_grad():
            torch.testing.assert_close(norm(c["residual"][1]), plain.hidden_states[2][row][rows], **TOL)


def test_rows_are_isolated(tiny, tiny_bank, batch):
    model, tok = tiny
    ids, mask = batch
    st = HFSteerer(model, tiny_bank, tok)
    spec = {"steer": [{"vector": "joy", "layers": [0], "scale": 4.0}],
            "heads": [{"layer": 1, "head": 0, "mode": "ablate"}]}
    a, _ = st.run(ids, mask, [spec, None])
    b, _ = st.run(ids, mask, [spec, spec])
    c, _ = st.run(ids, mask, [None, None])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], c[1])
    assert not torch.allclose(a[0], c[0])


def test_positions_prompt_and_generated(tiny, tiny_bank, batch):
    model, tok = tiny
    ids, mask = batch
    st = HFSteerer(model, tiny_bank, tok)
    plain, _ = st.run(ids, mask)
    gen_only = {"steer": [{"vector": "joy", "layers": [0], "scale": 4.0, "positions": "generated"}]}
    lg, _ = st.run(ids, mask, gen_only)
    assert torch.equal(lg, plain)  # a single forward pass has no generated tokens
    g_plain = st.generate(ids, mask, None, max_new_tokens=6)
    g_prompt = st.generate(ids, mask, {**gen_only, "steer": [{**gen_only["steer"][0], "positions": "prompt"}]},
                           max_new_tokens=6)
    g_gen = st.generate(ids, mask, {**gen_only, "steer": [{**gen_only["steer"][0], "scale": 40.0}]},
                        max_new_tokens=6)
    # generated-only steering keeps the first token (computed from the prompt)
    assert [t[0] for t in g_gen.token_ids] == [t[0] for t in g_plain.token_ids]
    assert g_gen.token_ids != g_plain.token_ids or g_prompt.token_ids != g_plain.token_ids


def test_generate_matches_transformers_generate(tiny, tiny_bank, batch):
    model, tok = tiny
    ids, mask = batch
    st = HFSteerer(model, tiny_bank, tok)
    u = tiny_bank.get("joy")[0]
    h = model.model.layers[0].register_forward_hook(lambda m, a, o: o + 2.0 * u)
    try:
        with torch.no_grad():
            want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                  do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    finally:
        h.remove()
    got = st.generate(ids, mask, {"steer": [{"vector": "joy", "layers": [0], "scale": 2.0}]},
                      max_new_tokens=8, eos_token_id=[])
    assert got.token_ids == want[:, ids.shape[1]:].tolist()
    plain = st.generate(ids, mask, None, max_new_tokens=8, eos_token_id=[])
    assert plain.token_ids != got.token_ids


def test_generate_captures_generated_positions(tiny, batch):
    model, tok = tiny
    ids, mask = batch
    st = HFSteerer(model, None, tok)
    out = st.generate(ids, mask, {"capture": {"residual": [0], "heads": [1], "positions": "generated"}},
                      max_new_tokens=5, eos_token_id=[])
    n = mask.sum(1).tolist()
    for row in (0, 1):
        c = out.captures[row]
        assert c["positions"] == [n[row] + k for k in range(4)]  # the 5th token is never fed
        assert c["residual"][0].shape == (4, 128) and c["heads"][1].shape == (4, 4, 32)
        # the same tokens through a plain forward pass give the same residuals
        full = torch.tensor([ids[row][mask[row].bool()].tolist() + out.token_ids[row][:4]])
        _, caps = st.run(full, None, {"capture": {"residual": [0], "positions": "all"}})
        torch.testing.assert_close(caps[0]["residual"][0][n[row]:], c["residual"][0], **TOL)


def test_run_grad_gives_gradients(tiny, tiny_bank, batch):
    model, tok = tiny
    ids, mask = batch
    st = HFSteerer(model, tiny_bank, tok)
    spec = {"steer": [{"vector": "joy", "layers": [0], "scale": 1.0}]}
    lg, _ = st.run(ids, mask, spec, logits="last")
    lg2, _, acts = st.run_grad(ids, mask, spec, keep={"mlp": [0, 1], "heads": [1], "residual": [0]},
                               logits="last")
    torch.testing.assert_close(lg2.detach(), lg, **TOL)
    lg2[:, 5].sum().backward()
    assert acts["mlp"][0].grad.shape == (2, ids.shape[1], 256)
    assert acts["heads"][1].grad.abs().sum() > 0 and acts["residual"][0].grad.abs().sum() > 0
    # activations only: no weight gradients, and the parameters' flags are restored
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_bad_specs_are_rejected(tiny, tiny_bank, batch):
    from emosteer.request.spec import SpecError

    model, tok = tiny
    ids, mask = batch
    st = HFSteerer(model, tiny_bank, tok)
    with pytest.raises(SpecError, match="steer"):
        st.run(ids, mask, {"steer": [{"vector": "nope", "layers": [0], "scale": 1.0}]})
    with pytest.raises(ValueError, match="one per row"):
        st.run(ids, mask, [None, None, None])
    with pytest.raises(SpecError, match="boost.heads"):
        st.run(ids, mask, {"boost": {"heads": "x", "beta": 1.2}})
