"""``emosteer demo --lvlm`` end to end on the real engine: tiny random Qwen2-VL, synthetic
image pairs, attention-to-image attribution confirmed by VEE, ENA, one mixed batch.

The numbers of a random model are not effects; what is checked is the mechanics: the
VEE heads' image mass rises under VEE in the mixed batch, text-only prompts are
untouched by a boost, and every artefact of the report is written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from emosteer.bank import VectorBank
from emosteer.cli import app
from emosteer.testing_lvlm import torchvision_dir

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_demo_lvlm(engines, tmp_path):
    if torchvision_dir() is None:
        pytest.skip("torchvision not installed (pip install --no-deps torchvision==0.28.0)")
    engines.close()  # one engine at a time
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["demo", "--lvlm", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())
    assert "RANDOM" in r["note"] and "GPU" in r["note"]
    assert r["note"] in (out / "report.md").read_text()
    assert set(r["attention"]) == {"joy", "sadness"}
    for emo, a in r["attention"].items():
        assert len(a["top"]) == 3 and len(a["effect"]) == 6, a
        assert (out / f"attn_{emo}.png").stat().st_size > 1000
    t = r["head_types"]
    tops = {e: {tuple(c) for c in a["top"]} for e, a in r["attention"].items()}
    assert {tuple(c) for c in t["general"]} == tops["joy"] & tops["sadness"]
    assert {tuple(c) for c in t["specific"]["joy"]} == tops["joy"] - tops["sadness"]
    mb = r["mixed_batch"]
    assert mb["VEE (image)"]["vee_head_mass"] > mb["plain (image)"]["vee_head_mass"] > 0
    assert mb["VEE+ENA (image)"]["vee_head_mass"] > mb["ENA (image)"]["vee_head_mass"]
    assert mb["plain (text)"]["vee_head_mass"] is None and r["text_boost_is_plain"]
    assert sum(1 for _ in open(out / "narratives.jsonl")) == sum(e["n"] for e in mb.values())
    bank = VectorBank.load(out / "bank.safetensors")
    assert {"joy", "joy.vee", "joy.ena", "sadness.vee", "sadness.ena"} <= set(bank.names())
