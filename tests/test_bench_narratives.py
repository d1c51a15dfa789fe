"""benchmarks/bench_narratives.py, its pure parts: configs, agreement and speed-up
arithmetic, CSV / table / plot, and the hook baseline against emosteer.hf on a tiny
model (no vLLM engine)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from emosteer.request.spec import SteerSpec

_BENCH = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)
import _common  # noqa: E402
import bench_narratives as bn  # noqa: E402
import narratives_methods as nm  # noqa: E402
import narratives_report as nr  # noqa: E402


@pytest.mark.parametrize("n,layers", [(64, 30), (200, 30), (7, 2), (1, 1)])
def test_configs_all_distinct(n, layers):
    cfgs = nm.request_configs(n, layers, seed=0)
    assert len(cfgs) == n
    specs = [SteerSpec.parse(c) for c in cfgs]
    assert len({s.fingerprint() for s in specs}) == n
    scales = [c["steer"][0]["scale"] for c in cfgs]
    assert scales == sorted(scales) and len(set(scales)) == n
    lo, hi = nm.SCALE_RANGE
    assert all(lo <= s <= hi for s in scales)
    for c in cfgs:
        ls = c["steer"][0]["layers"]
        assert ls == list(range(ls[0], ls[0] + len(ls))) and 0 <= ls[0] and ls[-1] < layers
        assert c["steer"][0]["vector"] == nm.VECTOR
    if n >= 8:  # the layers vary too
        assert len({tuple(c["steer"][0]["layers"]) for c in cfgs}) > 1
    assert nm.request_configs(n, layers, seed=0) == cfgs  # seeded
    if n > 1:
        assert nm.request_configs(n, layers, seed=1) != cfgs


def test_bank_is_seeded_and_unit_norm():
    from emosteer.request.bank import ModelInfo

    info = ModelInfo("LlamaForCausalLM", 3, 16, 2, 8, 32, 1)
    a, b = nm.make_bank(info, 0), nm.make_bank(info, 0)
    for name in (nm.VECTOR, nm.WARM_VECTOR):
        v = a.get(name, "residual")
        assert v.shape == (3, 16)
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
        assert torch.equal(v, b.get(name, "residual"))
    assert not torch.equal(a.get(nm.VECTOR), a.get(nm.WARM_VECTOR))
    assert not torch.equal(a.get(nm.VECTOR), nm.make_bank(info, 1).get(nm.VECTOR))


def test_agreement_and_prefix():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    assert nr.agreement(ref, ref) == (1.0, 1.0, 3)
    got = [[1, 2, 3, 4], [5, 6, 0, 8], [0, 9, 9, 9]]
    same, tok, n = nr.agreement(got, ref)
    assert n == 3 and same == pytest.approx(1 / 3)
    assert tok == pytest.approx((4 + 2 + 0) / 12)
    same, tok, n = nr.agreement(got[:1], ref)  # a truncated (hooks) run: its prompts only
    assert (same, tok, n) == (1.0, 1.0, 1)
    assert nr.common_prefix([1, 2], [1, 2, 3]) == 2


def test_speedups_and_extrapolation():
    tps = {"emosteer_vllm": 300.0, "hf_hooks": 12.0, "hf_batched": 60.0}
    sp = nr.speedups(tps)
    assert sp["emosteer_vllm"] == {"speedup_vs_hooks": 25.0, "speedup_vs_batched": 5.0}
    assert sp["hf_hooks"] == {"speedup_vs_hooks": 1.0, "speedup_vs_batched": 0.2}
    assert sp["hf_batched"]["speedup_vs_hooks"] == 5.0
    assert nr.speedups({"emosteer_vllm": 3.0})["emosteer_vllm"] == {
        "speedup_vs_hooks": "", "speedup_vs_batched": ""}
    assert nr.extrapolate(10.0, 80, 8, 64) == (80.0, 640)
    with pytest.raises(ValueError):
        nr.extrapolate(1.0, 1, 0, 4)


class _Args:
    prompts, max_tokens, batch_size, eager = 4, 3, 2, False


def _results():
    ref = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]]
    return {
        "emosteer_vllm": {"token_ids": ref, "seconds": 0.5, "load_s": 30.0, "warmup_s": 1.0,
                          "timed_prompts": 4},
        "hf_hooks": {"token_ids": [[1, 2, 3], [4, 0, 6]], "seconds": 2.0, "load_s": 1.0,
                     "timed_prompts": 2},  # timed on 2 of 4 prompts
        "hf_batched": {"token_ids": ref, "seconds": 1.2, "load_s": 1.0, "timed_prompts": 4},
    }


def _rows():
    meta = {"model": "m (Q4_1 GGUF dequantized to float32)", "dtype": "float32", "machine": "cpu (2/2 cores)",
            "torch": "t", "vllm": "v", "transformers": "tr", "git_commit": "abc"}
    rows = nr.build_rows(_results(), _Args(), meta)
    for r in rows:
        r["timestamp"] = "2026-01-01T00:00:00+00:00"
    return rows


def test_build_rows_extrapolates_hooks():
    rows = {r["method"]: r for r in _rows()}
    a, b, c = rows["emosteer_vllm"], rows["hf_hooks"], rows["hf_batched"]
    assert a["tok_per_s"] == 24.0 and b["tok_per_s"] == 3.0 and c["tok_per_s"] == 10.0
    assert b["extrapolated"] is True and b["timed_prompts"] == 2
    assert b["seconds"] == 4.0 and b["tokens"] == 12  # 2 prompts timed -> 4
    assert a["extrapolated"] is False and a["tokens"] == 12
    assert a["speedup_vs_hooks"] == 8.0 and a["speedup_vs_batched"] == 2.4
    assert a["agreement"] == 1.0 and c["agreement"] == 1.0
    assert b["agreement"] == 0.5 and b["agreement_prompts"] == 2
    assert b["token_agreement"] == round(4 / 6, 4)
    lines = nr.target_lines(list(rows.values()))
    assert "8.0x (target >= 20x): NOT met" in lines[0] and "2.4x (target >= 3x): NOT met" in lines[1]


def test_csv_roundtrip_table_and_plot(tmp_path):
    rows = _rows()
    path = str(tmp_path / "narratives.csv")
    _common.append_csv(rows, path, nr.COLUMNS)
    later = [{**r, "timestamp": "2026-02-01T00:00:00+00:00"} for r in rows]
    _common.append_csv(later, path, nr.COLUMNS)
    got = _common.read_csv(path)
    assert len(got) == 2 * len(rows)
    assert list(got[0]) == list(nr.COLUMNS)
    for col in ("method", "prompts", "max_tokens", "seconds", "tokens", "tok_per_s",
                "speedup_vs_hooks", "speedup_vs_batched", "agreement", "load_s", "model", "dtype",
                "machine", "torch", "vllm", "transformers", "timestamp", "extrapolated"):
        assert col in got[0]
    last = nr.latest_run(got)
    assert [r["method"] for r in last] == list(nr.METHODS)
    assert {r["timestamp"] for r in last} == {"2026-02-01T00:00:00+00:00"}
    hooks = next(r for r in last if r["method"] == "hf_hooks")
    assert hooks["extrapolated"] == "True" and float(hooks["seconds"]) == 4.0
    text = nr.table(last)
    assert "extrapolated from 2 prompts" in text and "extrapolated linearly" in text
    assert "Q4_1 GGUF dequantized to float32" in text and "8.0×" in text
    png = tmp_path / "narratives.png"
    nr.plot(last, str(png), "title")
    assert png.stat().st_size > 1000
    assert bn.main(["--table", "--out-dir", str(tmp_path)]) == 0


# ------------------------------------------------------------------ hooks vs emosteer.hf
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from emosteer.hf import load_hf_model
    from emosteer.models.tiny import build_tiny_llama

    path = build_tiny_llama(tmp_path_factory.mktemp("narr") / "tiny", num_layers=3)
    model, tok = load_hf_model(str(path))
    from emosteer.request.bank import ModelInfo

    info = ModelInfo.from_hf_config(model.config)
    return model, tok, nm.make_bank(info, 0), info


def test_hook_adds_exactly_scale_times_vector(tiny):
    from emosteer.hf import find_decoder

    model, tok, bank, info = tiny
    layers = find_decoder(model).layers
    x = torch.tensor([[5, 17, 33, 2, 90, 11]])
    vec = bank.get(nm.VECTOR, "residual")
    seen: dict[int, torch.Tensor] = {}

    def record(l):
        def hook(mod, args, out):
            seen[l] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return hook

    def outputs(cfg):
        """Every layer's output; the steering hooks (if any) registered first, so they
        run before the recording ones."""
        seen.clear()
        steer = nm.hooks_for(layers, bank, cfg) if cfg is not None else None
        hs = []
        try:
            if steer is not None:
                steer.__enter__()
            hs = [layers[l].register_forward_hook(record(l)) for l in range(info.num_layers)]
            with torch.no_grad():
                model(input_ids=x)
        finally:
            for h in hs:
                h.remove()
            if steer is not None:
                steer.__exit__(None, None, None)
        return dict(seen)

    base = outputs(None)
    cfg = {"steer": [{"vector": nm.VECTOR, "layers": [1], "scale": 3.5}]}
    steered = outputs(cfg)
    torch.testing.assert_close(steered[0], base[0], rtol=0, atol=0)  # layer 0 untouched
    torch.testing.assert_close(steered[1] - base[1], (3.5 * vec[1]).expand_as(base[1]))
    assert not torch.allclose(steered[2], base[2])  # downstream of the steered layer
    # the hooks are gone after the context
    assert all(not layers[l]._forward_hooks for l in range(info.num_layers))


@pytest.mark.parametrize("cfg", [
    {"steer": [{"vector": "joy", "layers": [0, 2], "scale": 2.25}]},
    {"steer": [{"vector": "joy", "layers": [1], "scale": 7.0}]},
])
def test_hooks_match_emosteer_hf_logits(tiny, cfg):
    from emosteer.hf import HFSteerer, find_decoder

    model, tok, bank, info = tiny
    x = torch.tensor([[5, 17, 33, 2, 90, 11, 7, 8]])
    with torch.no_grad():
        with nm.hooks_for(find_decoder(model).layers, bank, cfg):
            want = model(input_ids=x).logits
        plain = model(input_ids=x).logits
    got, _ = HFSteerer(model, bank, tok).run(x, torch.ones_like(x), [cfg], logits="all")
    torch.testing.assert_close(got, want)
    assert not torch.allclose(want, plain)


def test_hooks_and_batched_generate_the_same(tiny):
    from emosteer.analysis.runners import make_runner

    model, tok, bank, info = tiny
    ids = nm.encode_prompts(tok, ["The child laughs.", "A man sits alone in the rain, quiet.",
                                  "She shouts."])
    cfgs = nm.request_configs(len(ids), info.num_layers, seed=3)
    eos = model.generation_config.eos_token_id
    try:
        nm._no_eos(model)
        hooks = nm.generate_hooks(model, bank, ids, cfgs, 6, tok.pad_token_id)
    finally:
        model.generation_config.eos_token_id = eos
    runner = make_runner(model, "hf", tokenizer=tok, bank=bank, batch_size=2, progress=False)
    batched = nm.generate_batched(runner, ids, cfgs, 6)
    assert [len(t) for t in hooks] == [6] * 3 and [len(t) for t in batched] == [6] * 3
    assert nr.agreement(batched, hooks)[0] == 1.0
    # steering changes the narratives (the configs are not no-ops)
    plain = nm.generate_batched(runner, ids, [{}] * len(ids), 6)
    assert plain != batched
