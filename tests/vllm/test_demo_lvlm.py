"""``emosteer demo --lvlm`` end to end on the real engine: tiny random Qwen2-VL, synthetic
image pairs, attention-to-image attribution confirmed by VEE, ENA, one mixed batch.

The numbers of a random model are not effects; what is checked is the mechanics: the
VEE heads' image mass rises under VEE in the mixed batch, text-only prompts are
untouched by a boost, and every artefact of the report is written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from emosteer.request.bank import VectorBank
from emosteer.cli import app
from emosteer.models.tiny_lvlm import torchvision_dir

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
    assert mb["plain (text)"]["vee_head_mass"] is None and "ENA (text)" in mb
    assert sum(1 for _ in open(out / "narratives.jsonl")) == sum(e["n"] for e in mb.values())
    bank = VectorBank.load(out / "bank.safetensors")
    assert {"joy", "joy.vee", "joy.ena", "sadness.vee", "sadness.ena"} <= set(bank.names())


def test_generate_image_rows_with_vee(engines, tmp_path):
    """``emosteer generate`` with image rows on the tiny Qwen2-VL: VEE + ENA per row, a
    beta = 1 row equals the plain row exactly, every row is written once."""
    import subprocess
    import sys

    from emosteer.request.bank import ModelInfo
    from emosteer.data.images import build_synthetic_pairs
    from emosteer.apps.demo_lvlm import model_dir
    from emosteer.models.tiny_lvlm import build_tiny_qwen2vl, torchvision_env

    env = torchvision_env(tmp_path / "shim")
    if env is None:
        pytest.skip("torchvision not installed (pip install --no-deps torchvision==0.28.0)")
    engines.close()
    import torch
    from transformers import AutoConfig

    path = build_tiny_qwen2vl(model_dir())
    info = ModelInfo.from_hf_config(AutoConfig.from_pretrained(path))
    bank = VectorBank(info)
    vee = torch.zeros(info.num_layers, info.num_heads)
    vee[0, 1] = vee[1, 2] = 1
    bank.add("joy.vee", "head_mask", vee)
    bank.add("joy.ena", "neurons", (torch.rand(info.num_layers, info.intermediate_size,
                                               generator=torch.Generator().manual_seed(0)) < 0.2).float())
    bank.save(tmp_path / "bank.safetensors")
    pairs = build_synthetic_pairs(tmp_path / "pairs", emotions=("joy",), n_per_emotion=2, size=56)
    rows = []
    for k, p in enumerate(pairs):
        img = str(p.emotional.image)
        rows += [{"id": f"plain-{k}", "image": img, "prompt": p.query, "emotion": "joy"},
                 {"id": f"unit-{k}", "image": img, "prompt": p.query,
                  "steer": {"boost": {"heads": "joy.vee", "beta": 1.0}}},
                 {"id": f"vee-{k}", "image": img, "prompt": p.query,
                  "steer": {"boost": {"heads": "joy.vee", "beta": 4.0},
                            "neurons": {"set": "joy.ena", "gamma": 1.5}}}]
    # a text-only row: ENA (a boost there would be refused: no image to boost)
    rows.append({"id": "text", "prompt": "Describe a quiet afternoon.",
                 "steer": {"neurons": {"set": "joy.ena", "gamma": 1.5}}})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dst = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "emosteer.cli", "generate", str(src), str(dst),
                           "--model", str(path), "--bank", str(tmp_path / "bank.safetensors"),
                           "--max-tokens", "8", "--eager"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {r["id"]: r for r in map(json.loads, dst.read_text().splitlines())}
    assert sorted(got) == sorted(r["id"] for r in rows)
    for k in range(len(pairs)):
        assert got[f"unit-{k}"]["narrative"] == got[f"plain-{k}"]["narrative"]
        assert got[f"vee-{k}"]["n_tokens"] >= 1 and got[f"vee-{k}"]["narrative"] is not None
